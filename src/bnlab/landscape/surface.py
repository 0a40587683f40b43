"""1-D and 2-D loss surfaces around the parameters (Li, Xu, Taylor, Studer & Goldstein 2018).

L(w + a d1) on a grid of a, or L(w + a d1 + b d2) on a grid of (a, b). Random directions are
filter-normalized as in Li et al.: a Gaussian direction whose every filter (slice along the
first axis of a weight with two or more axes) is rescaled to the norm of the same filter of w,
which makes surfaces of differently scaled networks comparable; 1-D parameters (biases, norm
layers' gamma and beta) get a zero direction, Li et al.'s default. Given directions (e.g. top
Hessian eigenvectors from :func:`top_eigenvalues`) are used as they are.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.landscape.evaluation import BatchOrLoader, LossFn, Mode, Objective, leave_as_found
from bnlab.landscape.results import LossSurface

__all__ = ["filter_normalized_direction", "loss_surface"]

Direction = Mapping[str, Tensor] | Tensor


def filter_normalized_direction(
    model: nn.Module, *, seed: int = 0, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A random filter-normalized direction (Li et al. 2018) over the trainable parameters."""
    direction = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
            continue
        gen = generator or torch.Generator(device=p.device).manual_seed(seed)
        generator = gen
        d = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen)
        w = p.detach().reshape(p.shape[0], -1)
        d_rows = d.reshape(p.shape[0], -1)
        scale = w.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        direction[name] = (d_rows * scale).reshape(p.shape)
    return direction


_WORKER: dict[str, Any] = {}


def _point(
    objective: Objective, directions: list[dict[str, Tensor]], coords: Sequence[float]
) -> dict[str, Tensor]:
    point = dict(objective.params)
    for c, d in zip(coords, directions, strict=True):
        point = {n: point[n] + c * d[n] for n in point}
    return point


def _evaluate(points: list[tuple[float, ...]]) -> list[float]:
    objective: Objective = _WORKER["objective"]
    directions: list[dict[str, Tensor]] = _WORKER["directions"]
    return [objective.loss(_point(objective, directions, c)) for c in points]


def _start_worker(objective: Objective, directions: list[dict[str, Tensor]]) -> None:
    torch.set_num_threads(1)
    _WORKER.update(objective=objective, directions=directions)


def _evaluate_in_processes(
    objective: Objective,
    directions: list[dict[str, Tensor]],
    grid: list[tuple[float, ...]],
    processes: int,
) -> list[float]:
    # "spawn", not "fork": a child forked from a parent whose thread pools (OpenMP, numba)
    # have run can deadlock. The objective (model, loss_fn, batches) travels by pickle.
    try:
        pickle.dumps((objective, directions))
    except Exception as error:
        raise ValueError(
            "processes > 1 needs a picklable model, loss_fn and batches (a module-level "
            f"function rather than a lambda or closure): {error}"
        ) from error
    context = torch.multiprocessing.get_context("spawn")
    chunks = [grid[i::processes] for i in range(processes)]
    with context.Pool(processes, _start_worker, (objective, directions)) as pool:
        parts = pool.map(_evaluate, chunks)
    values = [0.0] * len(grid)
    for i in range(processes):
        values[i::processes] = parts[i]
    return values


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    alphas: Sequence[float],
    betas: Sequence[float] | None = None,
    *,
    directions: Sequence[Direction] | None = None,
    seed: int = 0,
    num_batches: int | None = None,
    mode: Mode = "train",
    processes: int = 1,
) -> LossSurface:
    """The loss at w + a d1 for a in ``alphas`` (1-D), or at w + a d1 + b d2 for every (a, b)
    in ``alphas`` x ``betas`` (2-D).

    ``directions``: one (1-D) or two (2-D) dicts name -> tensor (missing names: zero) or flat
    tensors; default random filter-normalized ones drawn with ``seed``. ``processes`` > 1 splits
    the grid over spawned worker processes (one thread each), which needs a picklable model,
    ``loss_fn`` (a module-level function, not a lambda) and batches. Raises ValueError for an
    empty grid, a wrong number of directions or processes < 1.
    """
    alphas = [float(a) for a in alphas]
    betas_list = None if betas is None else [float(b) for b in betas]
    if not alphas or (betas_list is not None and not betas_list):
        raise ValueError("alphas and betas must hold at least one coordinate each")
    if processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes}")
    count = 1 if betas_list is None else 2
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        if directions is None:
            gen = torch.Generator(device=objective.params[objective.names[0]].device).manual_seed(
                seed
            )
            chosen = [filter_normalized_direction(model, generator=gen) for _ in range(count)]
            kind = "filter_normalized"
        else:
            if len(directions) != count:
                raise ValueError(
                    f"directions: a {count}-D surface needs {count} direction(s), "
                    f"got {len(directions)}"
                )
            chosen = [
                objective.vector(d, f"directions[{i}]", complete=False)
                for i, d in enumerate(directions)
            ]
            kind = "given"
        grid: list[tuple[float, ...]] = (
            [(a,) for a in alphas]
            if betas_list is None
            else [(a, b) for a in alphas for b in betas_list]
        )
        if processes == 1:
            _WORKER.update(objective=objective, directions=chosen)
            try:
                values = _evaluate(grid)
            finally:
                _WORKER.clear()
        else:
            values = _evaluate_in_processes(objective, chosen, grid, processes)
        center = objective.loss()
    losses: list[float] | list[list[float]]
    if betas_list is None:
        losses = values
    else:
        width = len(betas_list)
        losses = [values[i * width : (i + 1) * width] for i in range(len(alphas))]
    return LossSurface(
        alphas=alphas,
        betas=betas_list,
        losses=losses,
        loss=center,
        direction_kind=kind,
        mode=mode,
        num_batches=objective.num_batches,
        directions=chosen,
    )
