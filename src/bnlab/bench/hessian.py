"""``bnlab bench hessian``: bnlab's Hessian probes side by side with PyHessian.

Both tools measure the same small CNN with BatchNorm, trained briefly on scikit-learn's digits
(8x8 images, embedded in scikit-learn: nothing is downloaded), on the same batch (the whole data
set, 1797 images). PyHessian puts the model in eval mode (its constructor calls
``model.eval()``), so the comparison uses ``mode="eval"`` for bnlab: BN with running statistics.
bnlab's default, ``mode="train"`` (batch statistics, the landscape SGD sees), is reported next to
it. The reference top eigenvalue comes from bnlab's Lanczos in float64 to a residual of 1e-10
relative; both tools then run in float32 (PyHessian's vectors are float32).

PyHessian (0.1) also writes to the model it is given (eval mode, and ``.grad`` tensors that
keep a graph alive); it runs on a deep copy here. Its ``hessian_vector_product`` is wrapped to
count products; nothing in site-packages is patched.

Also reported: the cost of :func:`bnlab.landscape.gradient_path` in units of one training step
(forward, backward and SGD update) on a batch of the same size.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import click
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab import landscape

__all__ = ["HessianBenchmark", "command", "run_benchmark"]


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (1797, 1, 8, 8) float32 images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def small_cnn() -> nn.Sequential:
    """Two 3x3 conv layers with bnlab BatchNorm, a max-pool and a linear classifier (~3.9k
    parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        bnn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        bnn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def train_briefly(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, seed: int
) -> float:
    """SGD with momentum for a few epochs; returns the seconds per training step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
    return (time.perf_counter() - start) / max(steps, 1)


def _pyhessian_counted() -> tuple[Any, dict[str, int]]:
    """PyHessian's ``hessian`` class, with its module's HVP function wrapped by a counter."""
    import importlib

    # ``pyhessian.hessian`` the attribute is the class (its __init__ re-exports it); the module
    # is what holds the HVP function the class calls.
    ph: Any = importlib.import_module("pyhessian.hessian")
    counter = {"hvp": 0}
    original = getattr(ph.hessian_vector_product, "__wrapped__", ph.hessian_vector_product)

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        counter["hvp"] += 1
        return original(gradsH, params, v)

    counted.__wrapped__ = original  # type: ignore[attr-defined]
    ph.hessian_vector_product = counted
    return ph.hessian, counter


@dataclass
class EigenRun:
    """One tool's top-k eigenvalues on one start vector."""

    eigenvalues: list[float]
    hvps: int
    seconds: float
    relative_errors: list[float]


@dataclass
class TraceRun:
    trace: float
    standard_error: float
    samples: int
    seconds: float


@dataclass
class HessianBenchmark:
    """Everything one run measured (seconds; HVP = Hessian-vector product), eval mode unless
    named otherwise."""

    parameters: int
    samples: int
    train_accuracy: float
    tol: float
    reference_eigenvalues: list[float]
    pyhessian_top: list[EigenRun]
    bnlab_top: list[EigenRun]
    pyhessian_top_k: EigenRun
    bnlab_top_k: EigenRun
    pyhessian_trace: TraceRun
    bnlab_trace: TraceRun
    pyhessian_hvps_to_tol: int | None
    """HVPs after which PyHessian's answer (started like ``pyhessian_top[0]``) is first within
    ``tol`` of the reference: its run capped at 1, 2, ... iterations (None: not within 30)."""
    bnlab_hvps_to_tol: int | None
    """The same for bnlab's Lanczos, capped at 1, 2, ... iterations."""
    bnlab_train_mode_top_eigenvalue: float
    bnlab_train_mode_trace: TraceRun
    training_step_seconds: float
    gradient_path_seconds: float
    gradient_path_gradient_evaluations: int
    gradient_path_batch_size: int

    def hvp_ratio(self) -> float:
        """bnlab's HVPs over PyHessian's for the top eigenvalue, summed over the start vectors."""
        return sum(r.hvps for r in self.bnlab_top) / sum(r.hvps for r in self.pyhessian_top)

    def top_agreement(self) -> float:
        """Largest relative difference between the tools' top eigenvalues (same start seed)."""
        return max(
            abs(b.eigenvalues[0] - p.eigenvalues[0]) / abs(p.eigenvalues[0])
            for b, p in zip(self.bnlab_top, self.pyhessian_top, strict=True)
        )

    def trace_agreement(self) -> float:
        return abs(self.bnlab_trace.trace - self.pyhessian_trace.trace) / abs(
            self.pyhessian_trace.trace
        )

    def gradient_path_cost_in_steps(self) -> float:
        return self.gradient_path_seconds / self.training_step_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "hvp_ratio": self.hvp_ratio(),
            "top_agreement": self.top_agreement(),
            "trace_agreement": self.trace_agreement(),
            "gradient_path_cost_in_steps": self.gradient_path_cost_in_steps(),
        }


def _errors(values: list[float], reference: list[float]) -> list[float]:
    return [abs(v - r) / abs(r) for v, r in zip(values, reference, strict=False)]


def run_benchmark(
    *,
    tol: float = 1e-3,
    top_k: int = 5,
    seeds: int = 3,
    trace_samples: int = 100,
    epochs: int = 3,
    batch_size: int = 64,
    gradient_path_batch_size: int = 128,
    seed: int = 0,
) -> HessianBenchmark:
    """Train the CNN, then measure with both tools on the whole digits set in eval mode:
    the top eigenvalue from ``seeds`` start vectors, the top ``top_k``, and the trace from
    ``trace_samples`` Rademacher vectors (the same vectors for both: same seed, same order)."""
    x, y = digits()
    torch.manual_seed(seed)
    model = small_cnn()
    train_briefly(model, x, y, epochs=epochs, batch_size=batch_size, seed=seed)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    loss_fn = nn.functional.cross_entropy
    batch = (x, y)
    dim = sum(p.numel() for p in model.parameters())

    # The truth: float64 Lanczos, residuals <= 1e-10 |lambda|.
    reference = landscape.top_eigenvalues(
        copy.deepcopy(model).double(),
        loss_fn,
        (x.double(), y),
        k=top_k,
        mode="eval",
        tol=1e-10,
        max_iterations=400,
    ).eigenvalues

    hessian_cls, counter = _pyhessian_counted()

    def pyhessian_eigen(k: int, start_seed: int) -> EigenRun:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its backward(create_graph=True) cycle note
            torch.manual_seed(start_seed)
            counter["hvp"] = 0
            copied = copy.deepcopy(model)
            start = time.perf_counter()
            h = hessian_cls(copied, loss_fn, data=batch, cuda=False)
            values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=k)
            seconds = time.perf_counter() - start
        values = [float(v) for v in values]
        return EigenRun(values, counter["hvp"], seconds, _errors(values, reference))

    def bnlab_eigen(k: int, start_seed: int) -> EigenRun:
        start = time.perf_counter()
        found = landscape.top_eigenvalues(
            model, loss_fn, batch, k=k, mode="eval", tol=tol, seed=start_seed
        )
        seconds = time.perf_counter() - start
        values = found.eigenvalues
        return EigenRun(values, found.hvp_count, seconds, _errors(values, reference))

    pyhessian_top = [pyhessian_eigen(1, seed + i) for i in range(seeds)]
    bnlab_top = [bnlab_eigen(1, seed + i) for i in range(seeds)]
    pyhessian_top_k = pyhessian_eigen(top_k, seed)
    bnlab_top_k = bnlab_eigen(top_k, seed)

    def first_within_tol(run: Callable[[int], EigenRun]) -> int | None:
        for cap in range(1, 31):
            if run(cap).relative_errors[0] <= tol:
                return cap
        return None

    def pyhessian_capped(cap: int) -> EigenRun:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            h = hessian_cls(copy.deepcopy(model), loss_fn, data=batch, cuda=False)
            values, _ = h.eigenvalues(maxIter=cap, tol=tol, top_n=1)
        return EigenRun([float(values[0])], cap, 0.0, _errors([float(values[0])], reference))

    def bnlab_capped(cap: int) -> EigenRun:
        found = landscape.top_eigenvalues(
            model, loss_fn, batch, mode="eval", tol=1e-12, max_iterations=cap, seed=seed
        )
        return EigenRun(found.eigenvalues, cap, 0.0, _errors(found.eigenvalues, reference))

    pyhessian_hvps_to_tol = first_within_tol(pyhessian_capped)
    bnlab_hvps_to_tol = first_within_tol(bnlab_capped)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        h = hessian_cls(copy.deepcopy(model), loss_fn, data=batch, cuda=False)
        torch.manual_seed(seed)  # PyHessian draws its Rademacher vectors from the global RNG
        ph_samples = h.trace(maxIter=trace_samples, tol=0.0)  # tol 0: exactly maxIter samples
        ph_seconds = time.perf_counter() - start
    ph_mean = sum(ph_samples) / len(ph_samples)
    ph_error = math.sqrt(
        sum((s - ph_mean) ** 2 for s in ph_samples) / (len(ph_samples) - 1) / len(ph_samples)
    )
    pyhessian_trace = TraceRun(ph_mean, ph_error, len(ph_samples), ph_seconds)

    def bnlab_trace_run(mode: Literal["train", "eval"]) -> TraceRun:
        start = time.perf_counter()
        # A generator seeded like the global RNG draws the same Rademacher vectors in the same
        # order as PyHessian (one flat draw = its per-parameter draws in sequence).
        t = landscape.hutchinson_trace(
            model, loss_fn, batch, mode=mode, samples=trace_samples, seed=seed
        )
        return TraceRun(t.trace, t.standard_error, t.samples, time.perf_counter() - start)

    bnlab_trace = bnlab_trace_run("eval")
    train_trace = bnlab_trace_run("train")
    train_top = landscape.top_eigenvalues(model, loss_fn, batch, tol=tol, seed=seed)

    # gradient_path against a training step (forward, backward, SGD update) on equal batches
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=gen)[:gradient_path_batch_size]
    small = (x[idx], y[idx])
    trainee = copy.deepcopy(model).train()
    opt = torch.optim.SGD(trainee.parameters(), lr=0.05, momentum=0.9)

    def training_step() -> None:
        opt.zero_grad()
        loss_fn(trainee(small[0]), small[1]).backward()
        opt.step()

    repeats = 20
    training_step()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        training_step()
    step_seconds = (time.perf_counter() - start) / repeats
    path = landscape.gradient_path(model, loss_fn, small)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        landscape.gradient_path(model, loss_fn, small)
    path_seconds = (time.perf_counter() - start) / repeats

    return HessianBenchmark(
        parameters=dim,
        samples=int(x.shape[0]),
        train_accuracy=accuracy,
        tol=tol,
        reference_eigenvalues=reference,
        pyhessian_top=pyhessian_top,
        bnlab_top=bnlab_top,
        pyhessian_top_k=pyhessian_top_k,
        bnlab_top_k=bnlab_top_k,
        pyhessian_hvps_to_tol=pyhessian_hvps_to_tol,
        bnlab_hvps_to_tol=bnlab_hvps_to_tol,
        pyhessian_trace=pyhessian_trace,
        bnlab_trace=bnlab_trace,
        bnlab_train_mode_top_eigenvalue=train_top.eigenvalues[0],
        bnlab_train_mode_trace=train_trace,
        training_step_seconds=step_seconds,
        gradient_path_seconds=path_seconds,
        gradient_path_gradient_evaluations=path.gradient_evaluations,
        gradient_path_batch_size=gradient_path_batch_size,
    )


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in rows]


def format_report(r: HessianBenchmark) -> str:
    """The benchmark as text: both tools' values, HVP counts and times side by side."""
    rows: list[tuple[str, ...]] = [
        ("eval mode", "PyHessian 0.1", "", "", "bnlab", "", ""),
        ("", "value", "HVPs", "seconds", "value", "HVPs", "seconds"),
    ]
    for i, (p, b) in enumerate(zip(r.pyhessian_top, r.bnlab_top, strict=True)):
        rows.append(
            (
                f"top eigenvalue, start {i}",
                f"{p.eigenvalues[0]:.6g} ({p.relative_errors[0]:.1e})",
                str(p.hvps),
                f"{p.seconds:.2f}",
                f"{b.eigenvalues[0]:.6g} ({b.relative_errors[0]:.1e})",
                str(b.hvps),
                f"{b.seconds:.2f}",
            )
        )
    k = len(r.bnlab_top_k.eigenvalues)
    p, b = r.pyhessian_top_k, r.bnlab_top_k
    rows.append(
        (
            f"top {k}: largest rel. error",
            f"{max(p.relative_errors):.1e}",
            str(p.hvps),
            f"{p.seconds:.2f}",
            f"{max(b.relative_errors):.1e}",
            str(b.hvps),
            f"{b.seconds:.2f}",
        )
    )
    pt, bt = r.pyhessian_trace, r.bnlab_trace
    rows.append(
        (
            "trace (same vectors)",
            f"{pt.trace:.6g} +- {pt.standard_error:.2g}",
            str(pt.samples),
            f"{pt.seconds:.2f}",
            f"{bt.trace:.6g} +- {bt.standard_error:.2g}",
            str(bt.samples),
            f"{bt.seconds:.2f}",
        )
    )
    reference = ", ".join(f"{v:.6g}" for v in r.reference_eigenvalues)
    lines = [
        f"small CNN with BatchNorm on digits: {r.parameters} parameters, {r.samples} images "
        f"(one batch), train accuracy {r.train_accuracy:.3f}",
        'PyHessian forces eval mode (running statistics), so bnlab runs with mode="eval" here',
        f"reference eigenvalues (bnlab Lanczos, float64, residual 1e-10): {reference}",
        f"both tools asked for relative tolerance {r.tol:g}; (relative error vs the reference)",
        "",
        *_table(rows),
        "",
        f"agreement: top eigenvalue {100 * r.top_agreement():.3f}% (worst start), "
        f"trace {100 * r.trace_agreement():.2e}%",
        f"bnlab HVPs / PyHessian HVPs, top eigenvalue: {r.hvp_ratio():.2f}; "
        f"top {k}: {b.hvps / p.hvps:.2f}",
        f"HVPs until the top eigenvalue is first within {r.tol:g} of the reference (runs "
        f"capped at 1, 2, ... iterations, start 0): PyHessian {r.pyhessian_hvps_to_tol}, "
        f"bnlab {r.bnlab_hvps_to_tol}",
        f"bnlab, train mode (batch statistics, its default): top eigenvalue "
        f"{r.bnlab_train_mode_top_eigenvalue:.6g}, trace {r.bnlab_train_mode_trace.trace:.6g} "
        f"+- {r.bnlab_train_mode_trace.standard_error:.2g}",
        f"gradient_path (8 step sizes, batch of {r.gradient_path_batch_size}): "
        f"{r.gradient_path_gradient_evaluations} gradient evaluations, "
        f"{1e3 * r.gradient_path_seconds:.1f} ms = {r.gradient_path_cost_in_steps():.2f} "
        f"training steps of {1e3 * r.training_step_seconds:.2f} ms",
    ]
    return "\n".join(lines)


@click.command("hessian")
@click.option("--tol", default=1e-3, show_default=True, help="Relative tolerance of both tools.")
@click.option("--top-k", default=5, show_default=True, help="k of the top-k comparison.")
@click.option("--seeds", default=3, show_default=True, help="Start vectors for the top eigenvalue.")
@click.option("--trace-samples", default=100, show_default=True, help="Hutchinson samples.")
@click.option("--epochs", default=3, show_default=True, help="Training epochs before measuring.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def command(
    tol: float,
    top_k: int,
    seeds: int,
    trace_samples: int,
    epochs: int,
    seed: int,
    threads: int,
    json_path: str | None,
) -> None:
    """bnlab's Hessian probes against PyHessian on a small CNN with BN (digits data)."""
    try:
        import pyhessian  # noqa: F401
    except ImportError as error:
        raise click.ClickException(
            "PyHessian is not installed: pip install -c constraints.txt pyhessian "
            "(or the bench extra: pip install -e '.[bench]')"
        ) from error
    torch.set_num_threads(threads)
    result = run_benchmark(
        tol=tol, top_k=top_k, seeds=seeds, trace_samples=trace_samples, epochs=epochs, seed=seed
    )
    click.echo(format_report(result))
    if json_path is not None:
        import json

        with open(json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}")
