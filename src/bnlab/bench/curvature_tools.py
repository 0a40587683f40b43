"""``bnlab bench hessian``: bnlab's curvature probes against PyHessian 0.1, hessian-eigenthings 1.0
and curvlinops 3 (with scipy's ``eigsh``), in one run.

Three cases, each with its float64 truth:

- ``cnn-eval``: a small CNN with bnlab BatchNorm, trained briefly on scikit-learn's digits
  (embedded: nothing is downloaded), measured on the whole set (1797 images, one batch) in eval
  mode (running statistics). Truth: bnlab's Lanczos on a float64 copy, residuals <= 1e-10 |lambda|.
- ``cnn-train``: the same model in train mode (batch statistics). PyHessian cannot: its
  constructor calls ``model.eval()``.
- ``clustered``: least squares on a linear model whose Hessian 2/N X^T X has the top eigenvalues
  1, 0.97, 0.95, 0.93, 0.91 over a bulk in [0, 0.8] (lambda2/lambda1 = 0.97). Truth: the dense
  float64 eigenvalues of that matrix.

Per case and tool, for the top-1 and the top-5 eigenvalues: (1) the tool's own stopping rule
asked for relative tolerance ``tol`` (PyHessian: power iteration, ``maxIter=100``;
hessian-eigenthings: ``lanczos``, whose step count defaults to 2k; curvlinops: ARPACK's
``eigsh`` with ``tol``): HVPs, seconds, and the largest relative error it leaves; (2) the fewest
HVPs after which the tool's answer is within ``tol`` of the truth, found by capping its
iterations (doubling, then bisection; bnlab and eigenthings: Lanczos steps, PyHessian:
power iterations per eigenvalue, eigsh: ``ncv`` with one restart cycle). The trace: every tool's
Hutchinson estimate with the number of Rademacher samples bnlab's adaptive rule needs for a
standard error of ``trace_tol`` |trace|, and seconds per HVP.

curvlinops gets a copy whose norm layers do not update running statistics (it runs the model in
``torch.func`` transforms, which refuse that in-place update; in train mode the function is the
same). Every tool's HVPs are counted by wrapping its operator from outside (nothing in
site-packages is edited): bnlab's ``Objective.hvp``, ``pyhessian.hessian.hessian_vector_product``,
hessian-eigenthings' ``HessianOperator.matvec`` and the scipy ``LinearOperator`` around
curvlinops' ``HessianLinearOperator``. Seconds time the solver only (not the tools' setup).
The other tools write to the model they are given (eval flag, ``.grad``, running statistics):
each gets a deep copy.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab import landscape
from bnlab.landscape.evaluation import Mode, Objective

__all__ = ["Comparison", "command", "run_comparison"]

TOOLS = ("bnlab", "pyhessian", "eigenthings", "curvlinops")
CAP_LIMIT = 256


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
) -> None:
    """SGD with momentum for a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    criterion: nn.Module
    mode: Mode
    truth: list[float]
    """The top eigenvalues, largest first, float64."""


def clustered_case(seed: int, dim: int = 200) -> Case:
    """Least squares whose Hessian (2/N) X^T X has a clustered top: 1, .97, .95, .93, .91."""
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(dim - 5, generator=gen, dtype=torch.float64) * 0.8
    spectrum = torch.cat([torch.tensor([1.0, 0.97, 0.95, 0.93, 0.91], dtype=torch.float64), bulk])
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    n = dim
    x = (q * torch.sqrt(n * spectrum / 2)).T  # x^T x = q diag(n spectrum / 2) q^T
    x = x.float()
    y = torch.randn(n, 1, generator=gen)
    model = nn.Linear(dim, 1, bias=False)
    x64 = x.double()
    truth = torch.linalg.eigvalsh(2 * x64.T @ x64 / n).flip(0)[:5]
    return Case(
        "clustered",
        model,
        (x, y),
        nn.functional.mse_loss,
        nn.MSELoss(),
        "eval",
        [float(t) for t in truth],
    )


def make_cases(*, epochs: int, seed: int, top_k: int, samples: int | None = None) -> list[Case]:
    """The three cases; the CNN is trained on all digits and measured on the first ``samples``
    (default: all 1797)."""
    x, y = digits()
    torch.manual_seed(seed)
    model = small_cnn()
    train_briefly(model, x, y, epochs=epochs, batch_size=64, seed=seed)
    x, y = x[:samples], y[:samples]
    cases = []
    modes: tuple[Mode, ...] = ("eval", "train")
    for mode in modes:
        truth = landscape.top_eigenvalues(
            copy.deepcopy(model).double(),
            nn.functional.cross_entropy,
            (x.double(), y),
            k=top_k,
            mode=mode,
            tol=1e-10,
            max_iterations=400,
        ).eigenvalues
        cases.append(
            Case(
                f"cnn-{mode}",
                model,
                (x, y),
                nn.functional.cross_entropy,
                nn.CrossEntropyLoss(),
                mode,
                truth,
            )
        )
    cases.append(clustered_case(seed))
    return cases


@contextmanager
def counting(owner: Any, attribute: str) -> Iterator[list[int]]:
    """Replace ``owner.attribute`` (a function or method) by a wrapper that counts its calls."""
    original = getattr(owner, attribute)
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    setattr(owner, attribute, counted)
    try:
        yield count
    finally:
        setattr(owner, attribute, original)


@dataclass
class Attempt:
    eigenvalues: list[float]
    hvps: int
    seconds: float


def _copy(case: Case, *, freeze_running_stats: bool = False) -> nn.Module:
    """A deep copy in the case's mode. ``freeze_running_stats``: its norm layers stop updating
    running statistics (the same function in train mode); curvlinops runs the model inside
    ``torch.func`` transforms, which refuse the in-place update of a captured buffer."""
    model = copy.deepcopy(case.model).train(case.mode == "train")
    if freeze_running_stats:
        for module in model.modules():
            if hasattr(module, "track_running_stats"):
                # setattr: to mypy, a module attribute is a Tensor or a Module
                setattr(module, "track_running_stats", False)  # noqa: B010
    return model


def _bnlab(case: Case, k: int, cap: int | None, tol: float, seed: int) -> Attempt | None:
    with counting(Objective, "hvp") as count:
        start = time.perf_counter()
        found = landscape.top_eigenvalues(
            case.model,
            case.loss_fn,
            case.batch,
            k=k,
            mode=case.mode,
            tol=tol if cap is None else 1e-12,
            max_iterations=cap,
            seed=seed,
        )
        seconds = time.perf_counter() - start
    return Attempt(found.eigenvalues, count[0], seconds)


def _pyhessian(case: Case, k: int, cap: int | None, tol: float, seed: int) -> Attempt | None:
    if case.mode == "train":
        return None  # its constructor calls model.eval()
    module: Any = importlib.import_module("pyhessian.hessian")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # its backward(create_graph=True) cycle note
        torch.manual_seed(seed)  # it draws its start vectors from the global RNG
        h = module.hessian(_copy(case), case.criterion, data=case.batch, cuda=False)
        with counting(module, "hessian_vector_product") as count:
            start = time.perf_counter()
            # capped: tol 0, so that only the cap stops it
            values, _ = h.eigenvalues(maxIter=cap or 100, tol=tol if cap is None else 0.0, top_n=k)
            seconds = time.perf_counter() - start
    return Attempt(sorted((float(v) for v in values), reverse=True), count[0], seconds)


def _eigenthings(case: Case, k: int, cap: int | None, tol: float, seed: int) -> Attempt | None:
    eig: Any = importlib.import_module("hessian_eigenthings")
    operator = eig.HessianOperator(_copy(case), [case.batch], eig.supervised_loss(case.loss_fn))
    if cap is not None and not k <= cap <= operator.size - 1:
        return None
    with counting(eig.HessianOperator, "matvec") as count:
        start = time.perf_counter()
        result = eig.lanczos(operator, k=k, max_iter=cap, tol=tol, which="LA", seed=seed)
        seconds = time.perf_counter() - start
    values = sorted((float(v) for v in result.eigenvalues), reverse=True)
    return Attempt(values, count[0], seconds)


def _curvlinops(case: Case, k: int, cap: int | None, tol: float, seed: int) -> Attempt | None:
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    curvlinops: Any = importlib.import_module("curvlinops")
    model = _copy(case, freeze_running_stats=True)
    params = [p for p in model.parameters() if p.requires_grad]
    hessian = curvlinops.HessianLinearOperator(
        model, case.criterion, params, [case.batch], check_deterministic=False
    ).to_scipy()
    n = hessian.shape[0]
    if cap is not None and not k < cap <= n:
        return None
    count = [0]

    def matvec(v: Any) -> Any:
        count[0] += 1
        return hessian @ v

    wrapped = LinearOperator(hessian.shape, matvec=matvec, dtype=hessian.dtype)
    v0 = np.random.default_rng(seed).standard_normal(n).astype(hessian.dtype)
    options: dict[str, Any] = {} if cap is None else {"ncv": cap, "maxiter": 1}
    start = time.perf_counter()
    try:
        values = eigsh(
            wrapped,
            k=k,
            which="LA",
            tol=tol if cap is None else 0.0,  # 0: machine precision; a capped run stops at the cap
            v0=v0,
            return_eigenvectors=False,
            **options,
        )
    except ArpackNoConvergence as error:
        values = error.eigenvalues
    seconds = time.perf_counter() - start
    return Attempt(sorted((float(v) for v in values), reverse=True), count[0], seconds)


SOLVERS: dict[str, Callable[[Case, int, int | None, float, int], Attempt | None]] = {
    "bnlab": _bnlab,
    "pyhessian": _pyhessian,
    "eigenthings": _eigenthings,
    "curvlinops": _curvlinops,
}


def largest_error(values: list[float], truth: list[float], k: int) -> float:
    """The largest relative error of the top k values (inf if fewer than k came back)."""
    if len(values) < k:
        return math.inf
    return max(abs(v - t) / abs(t) for v, t in zip(values[:k], truth[:k], strict=True))


@dataclass
class EigenResult:
    """One tool on one case for the top ``k``."""

    tool: str
    case: str
    k: int
    own_rule_hvps: int | None
    own_rule_seconds: float | None
    own_rule_error: float | None
    hvps_to_tol: int | None
    """Fewest HVPs (at the smallest cap) with every one of the top k within tol; None if not
    within ``CAP_LIMIT`` or the tool cannot measure the case."""
    seconds_to_tol: float | None
    note: str = ""


def _fewest(
    solve: Callable[[int], Attempt | None], ok: Callable[[Attempt], bool], low: int
) -> Attempt | None:
    """The run at the smallest cap >= ``low`` whose answer is ok (doubling, then bisection)."""
    failed, cap, found = low - 1, low, None
    while cap <= CAP_LIMIT:
        attempt = solve(cap)
        if attempt is not None and ok(attempt):
            found = (cap, attempt)
            break
        failed, cap = cap, cap * 2
    if found is None:
        return None
    good, best = found
    while good - failed > 1:
        middle = (good + failed) // 2
        attempt = solve(middle)
        if attempt is not None and ok(attempt):
            good, best = middle, attempt
        else:
            failed = middle
    return best


def compare_eigenvalues(tool: str, case: Case, k: int, tol: float, seed: int) -> EigenResult:
    solver = SOLVERS[tool]
    own = solver(case, k, None, tol, seed)
    if own is None:
        return EigenResult(tool, case.name, k, None, None, None, None, None, "cannot (eval only)")

    def ok(attempt: Attempt) -> bool:
        return largest_error(attempt.eigenvalues, case.truth, k) <= tol

    best = _fewest(lambda cap: solver(case, k, cap, tol, seed), ok, k + (tool == "curvlinops"))
    return EigenResult(
        tool,
        case.name,
        k,
        own.hvps,
        own.seconds,
        largest_error(own.eigenvalues, case.truth, k),
        None if best is None else best.hvps,
        None if best is None else best.seconds,
    )


@dataclass
class TraceResult:
    tool: str
    case: str
    trace: float
    standard_error: float | None
    samples: int
    hvps: int
    seconds: float


def _trace_bnlab(case: Case, samples: int, tol: float | None, seed: int) -> TraceResult:
    with counting(Objective, "hvp") as count:
        start = time.perf_counter()
        t = landscape.hutchinson_trace(
            case.model,
            case.loss_fn,
            case.batch,
            mode=case.mode,
            samples=samples,
            tol=tol,
            seed=seed,
        )
        seconds = time.perf_counter() - start
    return TraceResult("bnlab", case.name, t.trace, t.standard_error, t.samples, count[0], seconds)


def compare_traces(case: Case, tol: float, seed: int, max_samples: int) -> list[TraceResult]:
    """bnlab's adaptive Hutchinson to a standard error of tol |trace|, then every other tool
    with as many Rademacher samples."""
    results = [_trace_bnlab(case, max_samples, tol, seed)]
    samples = results[0].samples
    if case.mode == "eval":
        module: Any = importlib.import_module("pyhessian.hessian")
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            h = module.hessian(_copy(case), case.criterion, data=case.batch, cuda=False)
            with counting(module, "hessian_vector_product") as count:
                start = time.perf_counter()
                values = h.trace(maxIter=samples, tol=0.0)  # tol 0: exactly `samples`
                seconds = time.perf_counter() - start
        results.append(_summary("pyhessian", case, [float(v) for v in values], count[0], seconds))
    eig: Any = importlib.import_module("hessian_eigenthings")
    operator = eig.HessianOperator(_copy(case), [case.batch], eig.supervised_loss(case.loss_fn))
    with counting(eig.HessianOperator, "matvec") as count:
        start = time.perf_counter()
        found = eig.hutchinson(operator, num_samples=samples, seed=seed)
        seconds = time.perf_counter() - start
    results.append(
        TraceResult(
            "eigenthings", case.name, found.estimate, found.stderr, samples, count[0], seconds
        )
    )
    curvlinops: Any = importlib.import_module("curvlinops")
    model = _copy(case, freeze_running_stats=True)
    hessian = curvlinops.HessianLinearOperator(
        model, case.criterion, list(model.parameters()), [case.batch], check_deterministic=False
    )
    columns = [0]
    matmat = hessian._matmat

    def counted(x: list[Tensor]) -> list[Tensor]:
        columns[0] += int(x[0].shape[-1])  # one HVP per column of the block it is given
        return matmat(x)

    hessian._matmat = counted
    start = time.perf_counter()
    estimate = float(curvlinops.hutchinson_trace(hessian, samples))
    seconds = time.perf_counter() - start
    results.append(
        TraceResult("curvlinops", case.name, estimate, None, samples, columns[0], seconds)
    )
    return results


def _summary(tool: str, case: Case, values: list[float], hvps: int, seconds: float) -> TraceResult:
    n = len(values)
    mean = sum(values) / n
    error = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.inf
    return TraceResult(tool, case.name, mean, error, n, hvps, seconds)


@dataclass
class Comparison:
    """Everything one run measured."""

    tol: float
    trace_tol: float
    top_k: int
    truths: dict[str, list[float]]
    parameters: dict[str, int]
    eigen: list[EigenResult] = field(default_factory=list)
    traces: list[TraceResult] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "pyhessian", "hessian-eigenthings", "curvlinops-for-pytorch", "scipy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def run_comparison(
    *,
    tol: float = 1e-3,
    top_k: int = 5,
    trace_tol: float = 0.02,
    trace_max_samples: int = 400,
    epochs: int = 3,
    seed: int = 0,
    samples: int | None = None,
    tools: tuple[str, ...] = TOOLS,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Build the cases and measure every tool on each (see the module docstring);
    ``progress`` gets a line per result as it is measured."""
    cases = make_cases(epochs=epochs, seed=seed, top_k=top_k, samples=samples)
    result = Comparison(
        tol=tol,
        trace_tol=trace_tol,
        top_k=top_k,
        truths={c.name: c.truth for c in cases},
        parameters={c.name: sum(p.numel() for p in c.model.parameters()) for c in cases},
        versions=_versions(),
    )
    for case in cases:
        for k in sorted({1, top_k}):
            for tool in tools:
                result.eigen.append(compare_eigenvalues(tool, case, k, tol, seed))
                if progress is not None:
                    progress(str(result.eigen[-1]))
        if case.name != "clustered":
            result.traces += compare_traces(case, trace_tol, seed, trace_max_samples)
            if progress is not None:
                progress("\n".join(str(t) for t in result.traces[-4:]))
    return result


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in rows]


def format_report(r: Comparison) -> str:
    """The comparison as text tables."""
    lines = [f"versions: {', '.join(f'{k} {v}' for k, v in r.versions.items())}"]
    for case, truth in r.truths.items():
        values = ", ".join(f"{v:.6g}" for v in truth)
        lines.append(
            f"{case}: {r.parameters[case]} parameters; truth {values} "
            f"(lambda2/lambda1 = {truth[1] / truth[0]:.2f})"
        )
    rows: list[tuple[str, ...]] = [
        ("case", "top", "tool", "own rule: HVPs", "s", "error", f"to {r.tol:g}: HVPs", "s")
    ]
    for e in r.eigen:
        rows.append(
            (
                e.case,
                str(e.k),
                e.tool,
                _fmt(e.own_rule_hvps, "d") if e.note == "" else e.note,
                _fmt(e.own_rule_seconds, ".2f"),
                _fmt(e.own_rule_error, ".1e"),
                _fmt(e.hvps_to_tol, "d"),
                _fmt(e.seconds_to_tol, ".2f"),
            )
        )
    lines += ["", *_table(rows), ""]
    rows = [("case", "tool", "trace", "std. error", "samples", "HVPs", "s", "s / HVP")]
    for t in r.traces:
        rows.append(
            (
                t.case,
                t.tool,
                f"{t.trace:.6g}",
                _fmt(t.standard_error, ".3g"),
                str(t.samples),
                str(t.hvps),
                f"{t.seconds:.2f}",
                f"{t.seconds / max(t.hvps, 1):.4f}",
            )
        )
    lines += [
        f"trace: bnlab's Hutchinson until std. error <= {r.trace_tol:g} |trace|, the others "
        "with as many Rademacher samples",
        *_table(rows),
    ]
    return "\n".join(lines)


@click.command("hessian")
@click.option("--tol", default=1e-3, show_default=True, help="Relative eigenvalue tolerance.")
@click.option("--top-k", default=5, show_default=True, help="k of the top-k comparison.")
@click.option(
    "--trace-tol", default=0.02, show_default=True, help="Relative standard error of the trace."
)
@click.option("--epochs", default=3, show_default=True, help="Training epochs before measuring.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=16),
    default=None,
    help="Measure the CNN on the first SAMPLES digits (default: all 1797).",
)
@click.option("--threads", default=1, show_default=True, help="torch intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def command(
    tol: float,
    top_k: int,
    trace_tol: float,
    epochs: int,
    seed: int,
    samples: int | None,
    threads: int,
    json_path: str | None,
) -> None:
    """bnlab's Hessian probes against PyHessian, hessian-eigenthings and curvlinops."""
    missing = [
        name
        for name in ("pyhessian", "hessian_eigenthings", "curvlinops", "scipy")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise click.ClickException(
            f"{', '.join(missing)} not installed: pip install -c constraints.txt -e '.[bench]'"
        )
    if not (0 < tol < 1 and 0 < trace_tol < 1 and top_k >= 1):
        raise click.ClickException("--tol and --trace-tol must be in (0, 1), --top-k >= 1")
    torch.set_num_threads(threads)
    result = run_comparison(
        tol=tol,
        top_k=top_k,
        trace_tol=trace_tol,
        epochs=epochs,
        seed=seed,
        samples=samples,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(format_report(result))
    if json_path is not None:
        import json

        with open(json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}")
