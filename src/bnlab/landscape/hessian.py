"""Curvature of the loss: Hessian-vector products, top eigenvalues, trace, spectral density and
the curvature along the gradient, for the whole model or per parameter group.

A per-group quantity is that of the diagonal block H_gg (the Hessian w.r.t. the group's
parameters, the others held at w). Hessian-vector products go by double backward
(``method="reverse"``, default) or forward-over-reverse (``method="forward"``,
``torch.func.jvp`` of ``torch.func.grad``). ``operator=`` picks the matrix: the Hessian
(default), the generalized Gauss-Newton ``"ggn"``, the Monte-Carlo ``"fisher"`` or the
``"empirical_fisher"`` (see :data:`bnlab.landscape.evaluation.Curvature`). All probes take
``seed`` for their random vectors (a private generator: the global RNG is left alone) and
return convergence and cost figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, overload

import torch
from torch import Tensor, nn

from bnlab.landscape.evaluation import (
    BatchOrLoader,
    Curvature,
    Grouping,
    LossFn,
    Mode,
    Objective,
    flat,
    leave_as_found,
    resolve_groups,
)
from bnlab.landscape.lanczos import quadrature, top_eigenpairs
from bnlab.landscape.results import (
    CurvatureAlongGradient,
    Eigenpairs,
    Sharpness,
    SpectralDensity,
    TraceEstimate,
)

__all__ = [
    "curvature_along_gradient",
    "hutchinson_trace",
    "hvp",
    "sharpness",
    "spectral_density",
    "top_eigenvalues",
]

Method = Literal["reverse", "forward"]


def _generator(seed: int, like: Tensor) -> torch.Generator:
    return torch.Generator(device=like.device).manual_seed(seed)


def _check_method(method: str) -> None:
    if method not in ("reverse", "forward"):
        raise ValueError(f'method must be "reverse" or "forward", got {method!r}')


def _reference(objective: Objective) -> Tensor:
    return next(iter(objective.params.values()))


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    vector: Mapping[str, Tensor] | Tensor,
    *,
    num_batches: int | None = None,
    mode: Mode = "train",
    method: Method = "reverse",
    operator: Curvature = "hessian",
    mc_samples: int = 1,
    seed: int = 0,
) -> dict[str, Tensor]:
    """H v at the model's parameters w, averaged over the batches (or G v, F v with
    ``operator``; the Fisher's labels are drawn with ``seed``, ``mc_samples`` per input).

    ``vector``: a dict with a tensor for every trainable parameter (``model.named_parameters()``
    names and shapes), or a flat tensor of their total size in that order. Returns a dict of
    the same names and shapes. Raises ValueError for a vector that does not fit.
    """
    _check_method(method)
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        full = objective.vector(vector, "vector", complete=True)
        ref = _reference(objective)
        matvec = objective.operator(
            objective.names,
            method,
            operator,
            generator=_generator(seed, ref),
            mc_samples=mc_samples,
        )
        return objective.unflatten(matvec(flat(full[n] for n in objective.names)), objective.names)


@overload
def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    k: int = ...,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: None = ...,
    tol: float = ...,
    max_iterations: int | None = ...,
    which: Literal["largest", "smallest"] = ...,
    seed: int = ...,
    method: Method = ...,
    operator: Curvature = ...,
    mc_samples: int = ...,
    start: Mapping[str, Tensor] | Tensor | None = ...,
) -> Eigenpairs: ...


@overload
def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    k: int = ...,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: Grouping,
    tol: float = ...,
    max_iterations: int | None = ...,
    which: Literal["largest", "smallest"] = ...,
    seed: int = ...,
    method: Method = ...,
    operator: Curvature = ...,
    mc_samples: int = ...,
    start: None = ...,
) -> dict[str, Eigenpairs]: ...


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    k: int = 1,
    num_batches: int | None = None,
    mode: Mode = "train",
    groups: Grouping | None = None,
    tol: float = 1e-4,
    max_iterations: int | None = None,
    which: Literal["largest", "smallest"] = "largest",
    seed: int = 0,
    method: Method = "reverse",
    operator: Curvature = "hessian",
    mc_samples: int = 1,
    start: Mapping[str, Tensor] | Tensor | None = None,
) -> Eigenpairs | dict[str, Eigenpairs]:
    """The k largest (algebraic) Hessian (or ``operator``) eigenvalues and eigenvectors by
    Lanczos with full reorthogonalization, from ``start`` (a warm start, e.g. an earlier
    eigenvector; whole model only) or a Gaussian vector drawn with ``seed``.

    Stops when every Ritz residual ||H u - lambda u|| is at most ``tol * |lambda|`` (the
    eigenvalue error is at most the residual, and typically its square over the spectral gap)
    or after ``max_iterations`` steps (default: min(dimension, 200)); the result reports
    iterations, HVP count, residuals and ``converged``. With ``groups``, returns
    ``{group: Eigenpairs}`` for each diagonal block. Raises ValueError for k < 1, k larger
    than the parameter count (of any group), tol <= 0.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_iterations is not None and max_iterations < k:
        raise ValueError(f"max_iterations must be at least k = {k}, got {max_iterations}")
    if start is not None and groups is not None:
        raise ValueError("start (a warm start) is for the whole model; pass groups=None with it")
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        resolved = resolve_groups(objective.names, groups)
        first = None
        if start is not None:
            given = objective.vector(start, "start", complete=True)
            first = flat(given[n] for n in objective.names)
            if not bool(torch.isfinite(first).all()) or float(first.norm()) == 0:
                raise ValueError("start must be a finite, nonzero vector")
        results: dict[str, Eigenpairs] = {}
        for group, names in resolved.items():
            dim = objective.dimension(names)
            if k > dim:
                raise ValueError(
                    f"k = {k} exceeds the number of parameters ({dim})"
                    + ("" if groups is None else f" of group {group!r}")
                )
            ref = objective.params[names[0]]
            gen = _generator(seed, ref)
            random_start = torch.randn(dim, dtype=ref.dtype, device=ref.device, generator=gen)
            hvps_before = objective.hvps
            matvec = objective.operator(
                names, method, operator, generator=gen, mc_samples=mc_samples
            )
            found = top_eigenpairs(
                matvec,
                random_start if first is None else first,
                k,
                tol=tol,
                max_iterations=max_iterations or min(dim, 200),
                which=which,
                generator=gen,
            )
            vectors = [objective.unflatten(found.eigenvectors[:, i], names) for i in range(k)]
            results[group] = Eigenpairs(
                group=group,
                eigenvalues=found.eigenvalues,
                residuals=found.residuals,
                iterations=found.iterations,
                hvp_count=objective.hvps - hvps_before,
                converged=found.converged,
                tol=tol,
                dimension=dim,
                mode=mode,
                num_batches=objective.num_batches,
                operator=operator,
                eigenvectors=vectors,
            )
    return results["all"] if groups is None else results


def _probe_vector(dim: int, distribution: str, like: Tensor, gen: torch.Generator) -> Tensor:
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (dim,), device=like.device, generator=gen)
        return (2 * bits - 1).to(like.dtype)
    return torch.randn(dim, dtype=like.dtype, device=like.device, generator=gen)


def _mean_and_error(samples: list[float]) -> tuple[float, float]:
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return mean, math.inf
    var = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    samples: int = 100,
    num_batches: int | None = None,
    mode: Mode = "train",
    groups: Grouping | None = None,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    tol: float | None = None,
    seed: int = 0,
    method: Method = "reverse",
    operator: Curvature = "hessian",
    mc_samples: int = 1,
) -> TraceEstimate:
    """Hutchinson's estimate of tr(H) = E[v^T H v] (or of the ``operator``'s trace) with its
    standard error.

    ``samples`` HVPs with Rademacher (exact for a diagonal H) or Gaussian vectors; with ``tol``,
    stops early once standard_error <= tol * |trace| (after at least 10 samples). With
    ``groups`` the same samples also give each block's trace in ``group_traces``. Raises
    ValueError for samples < 2, an unknown distribution, tol <= 0.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (for a standard error), got {samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f'distribution must be "rademacher" or "gaussian", got {distribution!r}')
    if tol is not None and tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        names = objective.names
        resolved = resolve_groups(names, groups)
        dim = objective.dimension()
        ref = _reference(objective)
        gen = _generator(seed, ref)
        matvec = objective.operator(names, method, operator, generator=gen, mc_samples=mc_samples)
        totals: list[float] = []
        per_group: dict[str, list[float]] = {g: [] for g in resolved}
        for _ in range(samples):
            v = _probe_vector(dim, distribution, ref, gen)
            hv = matvec(v)
            totals.append(float(torch.dot(v, hv)))
            vs, hvs = objective.unflatten(v, names), objective.unflatten(hv, names)
            for group, members in resolved.items():
                per_group[group].append(sum(float(torch.sum(vs[n] * hvs[n])) for n in members))
            if tol is not None and len(totals) >= 10:
                mean, error = _mean_and_error(totals)
                if error <= tol * abs(mean):
                    break
        trace, error = _mean_and_error(totals)
        estimates = {g: _mean_and_error(s) for g, s in per_group.items()} if groups else {}
        return TraceEstimate(
            trace=trace,
            standard_error=error,
            samples=len(totals),
            hvp_count=objective.hvps,
            distribution=distribution,
            dimension=dim,
            mode=mode,
            num_batches=objective.num_batches,
            operator=operator,
            group_traces={g: e[0] for g, e in estimates.items()},
            group_standard_errors={g: e[1] for g, e in estimates.items()},
        )


@overload
def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    iterations: int = ...,
    runs: int = ...,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: None = ...,
    seed: int = ...,
    method: Method = ...,
    operator: Curvature = ...,
    mc_samples: int = ...,
) -> SpectralDensity: ...


@overload
def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    iterations: int = ...,
    runs: int = ...,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: Grouping,
    seed: int = ...,
    method: Method = ...,
    operator: Curvature = ...,
    mc_samples: int = ...,
) -> dict[str, SpectralDensity]: ...


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    iterations: int = 80,
    runs: int = 1,
    num_batches: int | None = None,
    mode: Mode = "train",
    groups: Grouping | None = None,
    seed: int = 0,
    method: Method = "reverse",
    operator: Curvature = "hessian",
    mc_samples: int = 1,
) -> SpectralDensity | dict[str, SpectralDensity]:
    """The Hessian's (or the ``operator``'s) eigenvalue density by stochastic Lanczos quadrature
    (Ghorbani et al. 2019): ``runs`` Lanczos runs of ``iterations`` steps from normalized
    Rademacher vectors.

    The result's weights sum to 1, ``moment(k)`` estimates tr(H^k)/n (exactly v^T H^k v / n per
    run for k < 2 * iterations), ``density(grid)`` smooths it. Raises ValueError for
    iterations < 1 or runs < 1.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations}")
    if runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs}")
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        results: dict[str, SpectralDensity] = {}
        for group, names in resolve_groups(objective.names, groups).items():
            dim = objective.dimension(names)
            ref = objective.params[names[0]]
            gen = _generator(seed, ref)
            matvec = objective.operator(
                names, method, operator, generator=gen, mc_samples=mc_samples
            )
            hvps_before = objective.hvps
            all_nodes, all_weights, steps = [], [], 0
            for _ in range(runs):
                start = _probe_vector(dim, "rademacher", ref, gen)
                nodes, weights, steps = quadrature(matvec, start, iterations, generator=gen)
                all_nodes.append(nodes)
                all_weights.append(weights)
            results[group] = SpectralDensity(
                group=group,
                nodes=all_nodes,
                weights=all_weights,
                iterations=steps,
                hvp_count=objective.hvps - hvps_before,
                dimension=dim,
                mode=mode,
                num_batches=objective.num_batches,
                operator=operator,
            )
    return results["all"] if groups is None else results


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    previous: Sharpness | Mapping[str, Tensor] | Tensor | None = None,
    num_batches: int | None = None,
    mode: Mode = "train",
    tol: float = 1e-3,
    max_iterations: int | None = None,
    seed: int = 0,
    method: Method = "reverse",
    operator: Curvature = "hessian",
) -> Sharpness:
    """The sharpness of the training loss (Cohen et al. 2021, "edge of stability"): its top
    Hessian eigenvalue lambda_max, on the full batch or averaged over the loader's batches.

    Gradient descent with step size lr is stable on a quadratic iff lambda_max < 2 / lr. To
    track it every few steps cheaply, pass the last result (or its eigenvector) as
    ``previous``: Lanczos starts from that eigenvector, which after a small step is already
    close to the new one. Stops at a Ritz residual <= ``tol * lambda`` (the eigenvalue's error is
    at most the residual). Raises ValueError for a ``previous`` vector that does not fit.
    """
    start: Mapping[str, Tensor] | Tensor | None
    start = previous.eigenvector if isinstance(previous, Sharpness) else previous
    found = top_eigenvalues(
        model,
        loss_fn,
        batch_or_loader,
        k=1,
        num_batches=num_batches,
        mode=mode,
        tol=tol,
        max_iterations=max_iterations,
        seed=seed,
        method=method,
        operator=operator,
        start=start,
    )
    return Sharpness(
        sharpness=found.eigenvalues[0],
        residual=found.residuals[0],
        iterations=found.iterations,
        hvp_count=found.hvp_count,
        converged=found.converged,
        warm_started=start is not None,
        tol=tol,
        dimension=found.dimension,
        mode=mode,
        num_batches=found.num_batches,
        operator=operator,
        eigenvector=found.eigenvectors[0],
    )


@overload
def curvature_along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: None = ...,
    method: Method = ...,
) -> CurvatureAlongGradient: ...


@overload
def curvature_along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    num_batches: int | None = ...,
    mode: Mode = ...,
    groups: Grouping,
    method: Method = ...,
) -> dict[str, CurvatureAlongGradient]: ...


def curvature_along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    num_batches: int | None = None,
    mode: Mode = "train",
    groups: Grouping | None = None,
    method: Method = "reverse",
) -> CurvatureAlongGradient | dict[str, CurvatureAlongGradient]:
    """g^T H g / ||g||^2 with g the (averaged) gradient at w: the quadratic term of the loss
    along the step, the quantity Theorem 4.2 bounds. Per group: g_g^T H_gg g_g / ||g_g||^2
    (nan for a group whose gradient is zero). Cost: one gradient plus one HVP per group."""
    _check_method(method)
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        loss, grad = objective.loss_and_gradient()
        results: dict[str, CurvatureAlongGradient] = {}
        for group, names in resolve_groups(objective.names, groups).items():
            g = flat(grad[n] for n in names)
            norm2 = float(torch.dot(g, g))
            hg = objective.operator(names, method)(g)
            results[group] = CurvatureAlongGradient(
                group=group,
                curvature=float(torch.dot(g, hg)) / norm2 if norm2 > 0 else math.nan,
                gradient_norm=math.sqrt(norm2),
                loss=loss,
                mode=mode,
                num_batches=objective.num_batches,
            )
    return results["all"] if groups is None else results
