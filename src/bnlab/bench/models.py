"""``bnlab bench models``: whole models with bnlab's BatchNorm against the same models with
``torch.nn.BatchNorm2d``, measured in one run.

Rows:

* ``train_step``: one SGD training step (forward, cross-entropy, backward, ``optimizer.step``)
  of ``vgg_digits`` on 8x8 digits and ``vgg11`` / ``vgg16`` on 32x32 inputs, eager and under
  ``torch.compile`` (inductor; the model compiled with ``fullgraph=True``, the optimizer eager).
  The first compiled call (compilation) is reported apart and not timed with the steps.
* ``hvp / gradient``: on the Hessian benchmark's small CNN (512 digits, train mode), a
  Hessian-vector product by double backward (forward, gradient with ``create_graph=True``, then
  the gradient of g.v) over a gradient (forward and backward) of the same model, for bnlab and
  for torch.nn.

The torch.nn twin is a copy of the bnlab model whose BatchNorm layers are ``torch.nn``'s with
the same state (bnlab's are drop-ins). Both are timed interleaved on the same tensors
(:func:`bnlab.bench.layers.time_interleaved`): the ratios are bnlab / torch.nn of the same run.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab.bench.curvature_tools import digits, small_cnn
from bnlab.bench.layers import Clock, _parse_list, set_threads, time_interleaved
from bnlab.models import build_model

__all__ = ["ModelTiming", "command", "run_benchmark", "torch_twin"]

MODELS: dict[str, tuple[tuple[int, int, int], int]] = {
    "vgg_digits": ((1, 8, 8), 64),
    "vgg11": ((3, 32, 32), 16),
    "vgg16": ((3, 32, 32), 16),
}
"""Model name -> (input shape, default batch size)."""


@dataclass(frozen=True)
class ModelTiming:
    """Median seconds per call of one measurement, bnlab and torch.nn."""

    model: str
    what: str
    ours_s: float
    torch_s: float

    @property
    def ratio(self) -> float:
        return self.ours_s / self.torch_s


def torch_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose bnlab BatchNorm layers are ``torch.nn.BatchNorm1d/2d/3d`` with
    the same parameters, buffers and settings."""
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        torch_cls = next(
            (
                cls
                for ours, cls in (
                    (bnn.BatchNorm1d, nn.BatchNorm1d),
                    (bnn.BatchNorm2d, nn.BatchNorm2d),
                    (bnn.BatchNorm3d, nn.BatchNorm3d),
                )
                if type(layer) is ours
            ),
            None,
        )
        if torch_cls is None:
            continue
        new = torch_cls(
            layer.num_features,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
        )
        new.load_state_dict(layer.state_dict())
        new.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, new)
    return twin


def _step(model: nn.Module, x: Tensor, y: Tensor, compiled: bool) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward: Callable[[Tensor], Tensor] = (
        torch.compile(model, fullgraph=True) if compiled else model
    )

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _inputs(name: str, batch: int | None) -> tuple[Tensor, Tensor]:
    shape, default = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    n = batch or default
    return torch.randn(n, *shape, generator=generator), torch.randint(10, (n,), generator=generator)


def train_steps(
    name: str, batch: int | None, compiled: bool, timer: Callable[..., dict[str, float]]
) -> tuple[ModelTiming, dict[str, float]]:
    """A training step of model ``name`` with bnlab's and torch.nn's BatchNorm (compiled: both
    under ``torch.compile(fullgraph=True)``): the timing and the first call's seconds."""
    x, y = _inputs(name, batch)
    ours = build_model(name, x.shape[1:], 10, norm="bn")
    models = {"ours": ours, "torch": torch_twin(ours)}
    first = {}
    steps = {}
    for key, model in models.items():
        step = _step(model, x, y, compiled)
        start = time.perf_counter()
        step()
        first[key] = time.perf_counter() - start
        steps[key] = step
    medians = timer(steps)
    what = "train_step compiled" if compiled else "train_step"
    return ModelTiming(name, what, medians["ours"], medians["torch"]), first


def hvp_over_gradient(timer: Callable[..., dict[str, float]]) -> dict[str, float]:
    """HVP / gradient seconds on the small CNN (512 digits, train mode), bnlab and torch.nn."""
    x, y = digits()
    x, y = x[:512], y[:512]
    torch.manual_seed(0)
    ours = small_cnn()
    fns: dict[str, Callable[[], object]] = {}
    for key, model in (("ours", ours), ("torch", torch_twin(ours))):
        params: list[Tensor] = list(model.parameters())
        vector = [torch.randn_like(p) for p in params]

        def gradient(model: nn.Module = model, params: list[Tensor] = params) -> object:
            loss = nn.functional.cross_entropy(model(x), y)
            return torch.autograd.grad(loss, params)

        def hvp(
            model: nn.Module = model, params: list[Tensor] = params, vector: list[Tensor] = vector
        ) -> object:
            loss = nn.functional.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return torch.autograd.grad(grads, params, vector)

        fns[f"gradient {key}"], fns[f"hvp {key}"] = gradient, hvp
    medians = timer(fns)
    return {
        "ours": medians["hvp ours"] / medians["gradient ours"],
        "torch": medians["hvp torch"] / medians["gradient torch"],
        "hvp_ratio": medians["hvp ours"] / medians["hvp torch"],
        "gradient_ratio": medians["gradient ours"] / medians["gradient torch"],
    }


@dataclass
class ModelBenchmark:
    timings: list[ModelTiming]
    first_call_s: dict[str, dict[str, float]]
    hvp_over_gradient: dict[str, float] | None
    machine: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "timings": [{**asdict(t), "ratio": t.ratio} for t in self.timings],
        }


def run_benchmark(
    models: tuple[str, ...] = tuple(MODELS),
    batch: int | None = None,
    compiled: bool = True,
    hvp: bool = True,
    repeats: int = 7,
    min_sample_s: float = 0.2,
    clock: Clock = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> ModelBenchmark:
    """Every row of the module docstring; ``batch`` overrides the 32x32 models' batch size."""

    def timer(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        return time_interleaved(fns, repeats, 2, min_sample_s, clock)

    timings, first = [], {}
    for name in models:
        for mode in (False, True) if compiled else (False,):
            size = batch if name != "vgg_digits" else None
            timing, first_call = train_steps(name, size, mode, timer)
            timings.append(timing)
            if mode:
                first[name] = first_call
            if progress is not None:
                progress(f"{timing.model} {timing.what}: {timing.ratio:.2f}")
    ratios = hvp_over_gradient(timer) if hvp else None
    machine = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "clock": "thread CPU time" if clock is time.thread_time else "wall",
    }
    return ModelBenchmark(timings, first, ratios, machine)


def format_table(result: ModelBenchmark) -> str:
    """Markdown: one row per (model, measurement); ratio bnlab / torch.nn."""
    lines = [
        "| model | measurement | bnlab ms | torch.nn ms | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for t in result.timings:
        lines.append(
            f"| {t.model} | {t.what} | {t.ours_s * 1e3:.2f} | {t.torch_s * 1e3:.2f} "
            f"| {t.ratio:.2f} |"
        )
    for name, first in result.first_call_s.items():
        lines.append(
            f"- {name}: first compiled call (compilation) {first['ours']:.1f} s with bnlab, "
            f"{first['torch']:.1f} s with torch.nn"
        )
    h = result.hvp_over_gradient
    if h is not None:
        lines.append(
            f"- small CNN, 512 digits: HVP / gradient {h['ours']:.2f} with bnlab, "
            f"{h['torch']:.2f} with torch.nn (HVP bnlab / torch.nn {h['hvp_ratio']:.2f}, "
            f"gradient {h['gradient_ratio']:.2f})"
        )
    lines.append(f"machine: {result.machine}")
    return "\n".join(lines)


@click.command("models")
@click.option("--models", "model_text", default=",".join(MODELS), show_default=True)
@click.option("--batch", type=click.IntRange(min=2), default=None, help="Batch of vgg11/16.")
@click.option("--no-compile", is_flag=True, help="Eager rows only (compiling takes minutes).")
@click.option("--no-hvp", is_flag=True, help="Skip the HVP / gradient row.")
@click.option("--repeats", default=7, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=int, help="torch intra-op threads.")
@click.option("--cpu-clock", is_flag=True, help="Thread CPU time (needs --threads 1).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write JSON here.")
def command(
    model_text: str,
    batch: int | None,
    no_compile: bool,
    no_hvp: bool,
    repeats: int,
    threads: int | None,
    cpu_clock: bool,
    out: str | None,
) -> None:
    """Whole-model training steps (eager and compiled) and HVP / gradient, bnlab vs torch.nn."""
    set_threads(threads, cpu_clock)
    names = _parse_list(model_text, tuple(MODELS), "model")
    result = run_benchmark(
        names,
        batch,
        compiled=not no_compile,
        hvp=not no_hvp,
        repeats=repeats,
        clock=time.thread_time if cpu_clock else time.perf_counter,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(format_table(result))
    if out is not None:
        Path(out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {out}")
