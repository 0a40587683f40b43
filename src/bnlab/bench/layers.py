"""``bnlab bench layers``: bnlab's normalization layers against ``torch.nn.BatchNorm*``.

Every layer is timed against torch.nn's BatchNorm of the same shape, interleaved in one run:
each repeat times torch and every bnlab layer once, in turn, so all of them see the same machine
load; the reported time is the median over repeats (warm-up calls excluded), each repeat running
enough calls for about ``min_sample_s`` seconds. Modes:

* ``train_fwd``: training forward with grad enabled (x and the parameters require grad);
* ``train_fwd_bwd``: that forward and ``torch.autograd.grad`` of (x, weight, bias) (no ``.grad``
  accumulation, so neither side pays for an extra add);
* ``eval_fwd``: eval mode under ``torch.no_grad()``.

Bandwidth: bytes that must move are 2 tensors for a forward (read x, write y) and 5 for forward
and backward (also read dy and x, write dx); the floor is those bytes at this machine's copy
bandwidth (``Tensor.copy_`` of a 256 MiB buffer, measured in the same run). The first-call
compile time of the kernels is measured in a fresh process with an empty numba cache and an empty
torch extension directory (so the native glue is built too), and again in a second process that
loads both.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab.functional.kernels import native

__all__ = ["LayerTiming", "command", "copy_bandwidth", "format_table", "run_benchmark"]

SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 16, 4, 4),
    (128, 32, 8, 8),
    (32, 64, 32, 32),
    (64, 128, 16, 16),
    (128, 64, 56, 56),
    (256, 256, 8, 8),
    (1024, 4096),
)
QUICK_SHAPES = SHAPES[:4] + SHAPES[5:]
# constructor options the benchmark gives a kind (a fixed noise seed, the virtual batch); a kind
# not named here is built with its registry defaults
LAYER_OPTIONS: dict[str, dict[str, Any]] = {
    "noisy_bn": {"seed": 0},
    "ghost": {"virtual_batch_size": 32},
}


def benchmarked_kinds() -> tuple[str, ...]:
    """The kinds of :data:`bnlab.nn.VARIANTS` with batch statistics (the ones torch.nn's
    BatchNorm is the yardstick for), in registry order: "bn" first, then its variants."""
    return tuple(
        name
        for name, kind in bnn.VARIANTS.items()
        if kind.statistics is not None and kind.statistics.over == "batch"
    )


LAYERS = benchmarked_kinds()
"""The default layers (the registry's batch-statistics kinds when bnlab was imported)."""
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
FORMATS = ("nchw", "channels_last")
_TENSORS_MOVED = {"train_fwd": 2, "train_fwd_bwd": 5, "eval_fwd": 2}


@dataclass(frozen=True)
class LayerTiming:
    """One (layer, shape, format, mode): median seconds per call of bnlab and torch.nn."""

    layer: str
    shape: tuple[int, ...]
    format: str
    mode: str
    ours_s: float
    torch_s: float
    floor_s: float
    """Bytes that must move at the copy bandwidth."""

    @property
    def ratio(self) -> float:
        return self.ours_s / self.torch_s

    @property
    def ours_gb_s(self) -> float:
        return _bytes_moved(self.shape, self.mode) / self.ours_s / 1e9

    @property
    def over_floor(self) -> float:
        return self.ours_s / self.floor_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": self.ratio,
            "ours_gb_s": self.ours_gb_s,
            "torch_gb_s": _bytes_moved(self.shape, self.mode) / self.torch_s / 1e9,
            "over_floor": self.over_floor,
        }


@dataclass
class LayerBenchmark:
    """A whole run: timings, the machine, the copy bandwidth and the compile times."""

    timings: list[LayerTiming]
    copy_gb_s: float
    machine: dict[str, Any]
    compile_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "copy_gb_s": self.copy_gb_s,
            "compile_s": self.compile_s,
            "timings": [t.to_dict() for t in self.timings],
            "summary": summary(self.timings),
        }


def _bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return _TENSORS_MOVED[mode] * numel * 4


def make_layer(kind: str, channels: int, rank: int) -> nn.Module:
    """A bnlab layer of ``kind`` (one of :func:`benchmarked_kinds`) for inputs of rank 2 or 4,
    built from its registry description with :data:`LAYER_OPTIONS`."""
    if kind not in benchmarked_kinds():
        raise ValueError(f"unknown layer {kind!r}; choose from {', '.join(benchmarked_kinds())}")
    return bnn.variant(kind).layer(channels, 2 if rank == 4 else 1, **LAYER_OPTIONS.get(kind, {}))


def _torch_layer(channels: int, rank: int) -> nn.Module:
    return (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(channels)


def _call(layer: nn.Module, x: Tensor, dy: Tensor, mode: str) -> Callable[[], object]:
    if mode == "eval_fwd":
        layer.eval()

        def eval_fwd() -> object:
            with torch.no_grad():
                return layer(x)

        return eval_fwd
    layer.train()
    if mode == "train_fwd":
        return lambda: layer(x)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return lambda: torch.autograd.grad(layer(x), params, dy)


Clock = Callable[[], float]


def _calls_per_sample(fn: Callable[[], object], min_sample_s: float, clock: Clock) -> int:
    """Calls that take about ``min_sample_s``, from the fastest of five single calls (one call
    slowed by the machine's load would otherwise make every sample a single noisy call)."""
    times = []
    for _ in range(5):
        start = clock()
        fn()
        times.append(clock() - start)
    return max(1, round(min_sample_s / max(min(times), 1e-7)))


def _sample(fn: Callable[[], object], calls: int, clock: Clock) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    min_sample_s: float,
    clock: Clock = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn within every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {k: _calls_per_sample(fn, min_sample_s, clock) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else reversed(order):
            samples[k].append(_sample(fns[k], calls[k], clock))
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted), median of repeats."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import numba

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "native_glue": native.status()[1],
        "python": platform.python_version(),
    }


def _threading_layer() -> str:
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel region run yet
        return "not started"


_COMPILE_SCRIPT = """
import time, torch
start = time.perf_counter()
import bnlab.nn as bnn
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(8, 4, 6, 6).contiguous(memory_format=fmt).requires_grad_()
    layer = bnn.BatchNorm2d(4)
    layer(x).sum().backward()
    layer.eval()
    layer(x)
print(time.perf_counter() - start)
"""


def compile_times() -> dict[str, float]:
    """Seconds for a fresh process to run BatchNorm2d train forward+backward and eval in float32
    (NCHW and channels-last): with an empty numba cache and no built native glue (compiling
    both), then with those caches."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "TORCH_EXTENSIONS_DIR": cache}
        for name in ("first_process_s", "cached_process_s"):
            out = subprocess.run(
                [sys.executable, "-c", _COMPILE_SCRIPT],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            result[name] = float(out.stdout.strip().splitlines()[-1])
    return result


def run_benchmark(
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    layers: tuple[str, ...] | None = None,
    formats: tuple[str, ...] = FORMATS,
    modes: tuple[str, ...] = MODES,
    repeats: int = 15,
    warmup: int = 3,
    min_sample_s: float = 0.02,
    measure_compile: bool = True,
    progress: Callable[[str], None] | None = None,
    cpu_clock: bool = False,
) -> LayerBenchmark:
    """Time every (shape, format, mode) for torch.nn and each bnlab layer (default: every kind
    of :func:`benchmarked_kinds`), interleaved.

    ``cpu_clock``: measure the calling thread's CPU time instead of wall time; meaningful with
    one intra-op thread only (everything then runs on the calling thread), and robust to other
    processes taking the cores.
    """
    if cpu_clock and torch.get_num_threads() != 1:
        raise ValueError(
            "cpu_clock needs torch.set_num_threads(1): other threads' work is not counted"
        )
    clock: Clock = time.thread_time if cpu_clock else time.perf_counter
    known = benchmarked_kinds()
    layers = known if layers is None else layers
    for kind in layers:
        if kind not in known:
            raise ValueError(f"unknown layer {kind!r}; choose from {', '.join(known)}")
    compile_s = compile_times() if measure_compile else {}
    copy = copy_bandwidth()
    timings = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        rank, channels = len(shape), shape[1]
        for fmt in formats:
            if fmt == "channels_last" and rank != 4:
                continue
            memory_format = torch.channels_last if fmt == "channels_last" else None
            x = torch.randn(shape, generator=generator) * 2 + 1
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            x.requires_grad_()
            dy = torch.randn(shape, generator=generator)
            if memory_format is not None:
                dy = dy.contiguous(memory_format=memory_format)
            for mode in modes:
                fns = {"torch": _call(_torch_layer(channels, rank), x, dy, mode)}
                for kind in layers:
                    fns[kind] = _call(make_layer(kind, channels, rank), x, dy, mode)
                medians = time_interleaved(fns, repeats, warmup, min_sample_s, clock)
                floor = _bytes_moved(shape, mode) / copy
                for kind in layers:
                    timing = LayerTiming(
                        kind, shape, fmt, mode, medians[kind], medians["torch"], floor
                    )
                    timings.append(timing)
                if progress is not None:
                    ratios = ", ".join(f"{k} {medians[k] / medians['torch']:.2f}" for k in layers)
                    progress(
                        f"{shape} {fmt} {mode}: torch {medians['torch'] * 1e3:.3f} ms; {ratios}"
                    )
    machine = {**_machine(), "clock": "thread CPU time" if cpu_clock else "wall"}
    return LayerBenchmark(timings, copy / 1e9, machine, compile_s)


def summary(timings: list[LayerTiming]) -> dict[str, Any]:
    """The issue's targets, computed from the timings (ratios are bnlab / torch.nn)."""
    out: dict[str, Any] = {}
    bn = [t for t in timings if t.layer == "bn" and t.mode == "train_fwd_bwd"]
    if bn:
        out["bn_fwd_bwd_median_ratio"] = statistics.median(t.ratio for t in bn)
        small = [t for t in bn if t.shape in SHAPES[:2]]
        large = [t for t in bn if t not in small]
        out["bn_fwd_bwd_max_ratio_small"] = max((t.ratio for t in small), default=None)
        out["bn_fwd_bwd_max_ratio_large"] = max((t.ratio for t in large), default=None)
    bn_eval = [t for t in timings if t.layer == "bn" and t.mode == "eval_fwd"]
    if bn_eval:
        out["bn_eval_max_ratio"] = max(t.ratio for t in bn_eval)
    for kind in [k for k in bnn.VARIANTS if k != "bn"]:
        rows = [t for t in timings if t.layer == kind and t.mode == "train_fwd_bwd"]
        if rows:
            out[f"{kind}_fwd_bwd_max_ratio"] = max(t.ratio for t in rows)
            out[f"{kind}_fwd_bwd_median_ratio"] = statistics.median(t.ratio for t in rows)
    big = [t for t in timings if t.shape == (128, 64, 56, 56) and t.layer == "bn"]
    if big:
        out["largest_shape_bn_over_floor"] = {f"{t.format}/{t.mode}": t.over_floor for t in big}
    return out


def format_table(result: LayerBenchmark) -> str:
    """Markdown: one row per (layer, shape, format); ratios bnlab / torch.nn per mode."""
    by_key: dict[tuple[str, tuple[int, ...], str], dict[str, LayerTiming]] = {}
    for t in result.timings:
        by_key.setdefault((t.layer, t.shape, t.format), {})[t.mode] = t
    lines = [
        "| layer | shape | format | train fwd | train fwd+bwd | eval fwd "
        "| fwd+bwd ms (ours / torch) | GB/s fwd+bwd | x floor |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (layer, shape, fmt), modes in by_key.items():
        cells = [f"{modes[m].ratio:.2f}" if m in modes else "-" for m in MODES]
        fb = modes.get("train_fwd_bwd")
        ms = f"{fb.ours_s * 1e3:.3f} / {fb.torch_s * 1e3:.3f}" if fb else "-"
        gbs = f"{fb.ours_gb_s:.1f}" if fb else "-"
        floor = f"{fb.over_floor:.2f}" if fb else "-"
        shape_text = "x".join(map(str, shape))
        lines.append(
            f"| {layer} | {shape_text} | {fmt} | {' | '.join(cells)} | {ms} | {gbs} | {floor} |"
        )
    lines.append("")
    lines.append(f"copy bandwidth: {result.copy_gb_s:.1f} GB/s; machine: {result.machine}")
    if result.compile_s:
        c = result.compile_s
        lines.append(
            f"first call in a fresh process (empty numba cache, glue not built): "
            f"{c['first_process_s']:.1f} s; "
            f"with the cache: {c['cached_process_s']:.1f} s"
        )
    for key, value in summary(result.timings).items():
        lines.append(f"- {key}: {_fmt(value)}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in value.items())
    return str(value)


def set_threads(threads: int | None, cpu_clock: bool) -> None:
    """The CLI's ``--threads`` and ``--cpu-clock``: torch's intra-op threads, and the check that
    a CPU clock runs on one thread."""
    if threads is not None:
        torch.set_num_threads(threads)
    if cpu_clock and torch.get_num_threads() != 1:
        raise click.BadParameter("--cpu-clock needs --threads 1", param_hint="--cpu-clock")


def _parse_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in allowed]
    if bad:
        raise click.BadParameter(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


@click.command("layers")
@click.option("--quick", is_flag=True, help="Fewer repeats, no (128,64,56,56), no compile time.")
@click.option("--repeats", default=None, type=int, help="Timed repeats (median); default 15.")
@click.option("--layers", "layer_text", default=",".join(LAYERS), show_default=True)
@click.option("--formats", "format_text", default=",".join(FORMATS), show_default=True)
@click.option("--modes", "mode_text", default=",".join(MODES), show_default=True)
@click.option(
    "--shapes",
    "shape_text",
    default=None,
    help="Only these of the benchmark's shapes, e.g. 64x16x4x4,128x32x8x8 (default: all).",
)
@click.option("--no-compile-time", is_flag=True, help="Skip the fresh-process compile timing.")
@click.option(
    "--threads",
    default=None,
    type=int,
    help="torch intra-op threads (the kernels follow torch); default: torch's own.",
)
@click.option(
    "--cpu-clock",
    is_flag=True,
    help="Time the thread's CPU time, not wall time (needs --threads 1; robust to a busy machine).",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write JSON here.")
def command(
    quick: bool,
    repeats: int | None,
    layer_text: str,
    format_text: str,
    mode_text: str,
    shape_text: str | None,
    no_compile_time: bool,
    threads: int | None,
    cpu_clock: bool,
    out: str | None,
) -> None:
    """Time bnlab's layers against torch.nn.BatchNorm* (interleaved, medians) and print a table."""
    set_threads(threads, cpu_clock)
    layers = _parse_list(layer_text, benchmarked_kinds(), "layer")
    formats = _parse_list(format_text, FORMATS, "format")
    modes = _parse_list(mode_text, MODES, "mode")
    shapes = QUICK_SHAPES if quick else SHAPES
    if shape_text is not None:
        names = {"x".join(map(str, shape)): shape for shape in SHAPES}
        shapes = tuple(names[name] for name in _parse_list(shape_text, tuple(names), "shape"))
    result = run_benchmark(
        shapes=shapes,
        layers=layers,
        formats=formats,
        modes=modes,
        repeats=repeats if repeats is not None else (5 if quick else 15),
        min_sample_s=0.01 if quick else 0.02,
        measure_compile=not (quick or no_compile_time),
        progress=lambda line: click.echo(line, err=True),
        cpu_clock=cpu_clock,
    )
    click.echo(format_table(result))
    if out is not None:
        Path(out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {out}")
