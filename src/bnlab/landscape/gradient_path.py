"""Loss and gradient along the gradient direction (Santurkar et al. 2018, section 3.1, Fig. 4).

With g = grad L(w), the paper moves along -g and records, for a range of step sizes eta:
the loss L(w - eta g) ("variation of the loss"), the gradient change ||g(w) - g(w - eta g)||
("gradient predictiveness"), and the effective beta-smoothness, the largest change of the
gradient per unit distance, max_eta ||g(w) - g(w - eta g)|| / ||eta g||.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bnlab.landscape.evaluation import BatchOrLoader, LossFn, Mode, Objective, leave_as_found
from bnlab.landscape.results import GradientPath

__all__ = ["DEFAULT_ETAS", "gradient_path"]

DEFAULT_ETAS: tuple[float, ...] = tuple(0.05 + i * (0.4 - 0.05) / 7 for i in range(8))
"""8 step sizes from 0.05 to 0.4, evenly spaced."""


def gradient_path(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    etas: Sequence[float] = DEFAULT_ETAS,
    lr: float | None = None,
    num_batches: int | None = None,
    mode: Mode = "train",
) -> GradientPath:
    """Loss, gradient change and effective beta-smoothness at w - eta g for each eta.

    ``lr`` scales the step sizes (eta * lr), e.g. by the training learning rate. Cost: one
    forward+backward per step size plus one (per batch). Raises ValueError for an empty
    ``etas``, an eta <= 0 or lr <= 0.
    """
    etas = [float(e) for e in etas]
    if not etas:
        raise ValueError("etas must hold at least one step size")
    if any(not e > 0 for e in etas):
        raise ValueError(f"eta must be positive: etas = {etas}")
    if lr is not None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        etas = [e * lr for e in etas]
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        loss, grad = objective.loss_and_gradient()
        grad_norm = math.sqrt(sum(float(torch.sum(g * g)) for g in grad.values()))
        losses, differences, smoothness = [], [], []
        for eta in etas:
            moved = {n: w - eta * grad[n] for n, w in objective.params.items()}
            moved_loss, moved_grad = objective.loss_and_gradient(moved)
            diff = math.sqrt(sum(float(torch.sum((grad[n] - moved_grad[n]) ** 2)) for n in grad))
            losses.append(moved_loss)
            differences.append(diff)
            smoothness.append(diff / (eta * grad_norm) if grad_norm > 0 else math.nan)
        return GradientPath(
            etas=etas,
            loss=loss,
            gradient_norm=grad_norm,
            losses=losses,
            gradient_differences=differences,
            smoothness=smoothness,
            effective_beta_smoothness=max(smoothness),
            mode=mode,
            num_batches=objective.num_batches,
            gradient_evaluations=len(etas) + 1,
        )
