"""Theorem 4.1 of Santurkar et al. (2018): BatchNorm shrinks the gradient it passes back.

For a BN layer with input x, output y = gamma * x_hat + beta and m values per channel j,

    ||dL/dx_j||^2 <= (gamma_j^2 / sigma_j^2) (||dL/dy_j||^2 - <1, dL/dy_j>^2 / m
                                              - <dL/dy_j, x_hat_j>^2 / m),

with equality when eps = 0 (dL/dx_j = (gamma_j / sigma_j)(g - mean(g) - x_hat_j <g, x_hat_j> / m)
and x_hat_j is orthogonal to 1 with ||x_hat_j||^2 = m; eps > 0 makes ||x_hat_j||^2 < m and the
left side smaller). The probe captures each BN layer's input and output with forward hooks and
compares both sides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.landscape.evaluation import BatchOrLoader, LossFn, Objective, leave_as_found
from bnlab.landscape.results import BatchNormGradientBound, GradientBound
from bnlab.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["gradient_bound"]

_PLAIN_BN = (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)


def _is_plain_batch_norm(module: nn.Module) -> bool:
    """Layers whose training forward is exactly BN (the theorem's layer): not lp, ghost,
    renorm or noisy variants."""
    return isinstance(module, _BatchNorm) or type(module) in _PLAIN_BN


def _channel_sums(t: Tensor) -> Tensor:
    return t.sum(dim=[0, *range(2, t.dim())])


def _sides(module: Any, x: Tensor, dx: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per channel: ||dL/dx_j||^2, the theorem's right side, ||dL/dy_j||^2; and m."""
    x, dx, dy = x.double(), dx.double(), dy.double()
    m = x.numel() // x.shape[1]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = _channel_sums(x) / m
    var = _channel_sums((x - mean.reshape(shape)) ** 2) / m
    sigma2 = var + module.eps
    x_hat = (x - mean.reshape(shape)) / sigma2.sqrt().reshape(shape)
    gamma = torch.ones_like(mean) if module.weight is None else module.weight.detach().double()
    dy_norm2 = _channel_sums(dy * dy)
    bound = (gamma**2 / sigma2) * (
        dy_norm2 - _channel_sums(dy) ** 2 / m - _channel_sums(dy * x_hat) ** 2 / m
    )
    return _channel_sums(dx * dx), bound, dy_norm2, m


def gradient_bound(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    num_batches: int | None = None,
) -> GradientBound:
    """Both sides of Theorem 4.1 for every BatchNorm layer (torch.nn's and bnlab's plain BN; the
    theorem does not cover lp, ghost, renorm or noisy variants), in training mode.

    Norms are summed over channels; with several batches, squared norms are averaged over
    batches (weighted by size) before the square root, so ``ratio <= 1`` still holds. Raises
    ValueError for a model without a BatchNorm layer.
    """
    layers = {n: m for n, m in model.named_modules() if _is_plain_batch_norm(m)}
    if not layers:
        raise ValueError("gradient_bound: the model has no BatchNorm layer (torch.nn or bnlab.nn)")
    with leave_as_found(model):
        objective = Objective(
            model, loss_fn, batch_or_loader, num_batches=num_batches, mode="train"
        )
        captured: dict[str, tuple[Tensor, Tensor]] = {}

        def needs_grad(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if isinstance(args[0], Tensor) and not args[0].requires_grad:
                return (args[0].detach().requires_grad_(True), *args[1:])
            return None

        handles = []
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(needs_grad))
            handles.append(
                module.register_forward_hook(
                    lambda _m, args, out, name=name: captured.__setitem__(name, (args[0], out))
                )
            )
        totals: dict[str, list[Any]] = {}
        loss_total = 0.0
        try:
            for i, weight in enumerate(objective.weights):
                captured.clear()
                loss = objective.loss_on(i, {})
                names = [n for n in layers if n in captured]
                tensors = [t for n in names for t in captured[n]]
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                loss_total += weight * float(loss.detach())
                for j, name in enumerate(names):
                    x, _ = captured[name]
                    dx, dy = grads[2 * j], grads[2 * j + 1]
                    if dx is None or dy is None:
                        continue  # the layer does not reach the loss
                    dx2, bound, dy2, m = _sides(layers[name], x.detach(), dx, dy)
                    entry = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0, m])
                    entry[0] += weight * float(dx2.sum())
                    entry[1] += weight * float(bound.sum())
                    entry[2] += weight * float(dy2.sum())
                    # every channel counts: one whose bound is <= 0 holds only if its input
                    # gradient is 0 too (ratio 0), otherwise it violates the bound (ratio inf)
                    zero_or_inf = torch.where(dx2 > 0, math.inf, 0.0).to(dx2)
                    ratio2 = torch.where(bound > 0, dx2 / bound, zero_or_inf)
                    entry[3] = max(entry[3], float(ratio2.max().sqrt()))
        finally:
            for handle in handles:
                handle.remove()
        results = []
        for name in (n for n in layers if n in totals):
            dx2, bound, dy2, channel_max, m = totals[name]
            results.append(
                BatchNormGradientBound(
                    layer=name,
                    input_gradient_norm=math.sqrt(dx2),
                    output_gradient_norm=math.sqrt(dy2),
                    bound=math.sqrt(max(bound, 0.0)),
                    ratio=math.sqrt(dx2 / bound) if bound > 0 else math.nan,
                    channel_ratio_max=channel_max,
                    lipschitz_ratio=math.sqrt(dx2 / dy2) if dy2 > 0 else math.nan,
                    values_per_channel=m,
                )
            )
        return GradientBound(layers=results, loss=loss_total, num_batches=objective.num_batches)
