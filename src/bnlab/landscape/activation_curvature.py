"""Curvature of the loss with respect to a layer's activations (Santurkar et al. 2018, Thm 4.2).

Theorem 4.2 is stated in activation space: with y_j the output of a layer (y = W x, before any
normalization), g = grad_y L and H = d^2 L / dy dy, the quadratic form along the gradient,

    g^T H g / ||g||^2,

is what BatchNorm rescales (by gamma^2 / sigma^2) and lowers (by an additive term). This probe
measures that quantity per layer on a batch: the layer's output is made a leaf of the graph by a
forward hook, g comes from one backward pass and H g from a second (double backward), with the
rest of the network, the loss and the batch fixed. It is a different number from the curvature
along the parameter gradient (:func:`bnlab.landscape.curvature_along_gradient`) and from the
top eigenvalue of the parameter Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.landscape.evaluation import BatchOrLoader, LossFn, Mode, Objective, leave_as_found
from bnlab.landscape.results import Result

__all__ = ["ActivationCurvature", "LayerCurvature", "activation_curvature"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerCurvature(Result):
    """One layer: ``curvature`` = g^T H g / ||g||^2 with g, H taken w.r.t. the layer's output
    (NaN when g = 0), ``gradient_norm`` = ||g||, ``activation_std`` = the output's std."""

    layer: str
    curvature: float
    gradient_norm: float
    activation_std: float


@dataclass
class ActivationCurvature(Result):
    """Per-layer curvature along the activation gradient, layers in the order asked for."""

    layers: list[LayerCurvature] = field(default_factory=list)
    loss: float = math.nan
    mode: str = "train"
    num_batches: int = 1

    def curvatures(self) -> dict[str, float]:
        return {entry.layer: entry.curvature for entry in self.layers}


def _default_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]


def activation_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    layers: Sequence[str] | None = None,
    num_batches: int | None = None,
    mode: Mode = "train",
) -> ActivationCurvature:
    """g^T H g / ||g||^2 w.r.t. the output of each of ``layers`` (module names; default every
    Linear and Conv layer), on one batch or the first ``num_batches`` of a loader (per-batch
    values averaged, weighted by batch size). Cost per layer and batch: one forward, one
    backward and one double backward. Leaves the model as found.

    Raises ValueError for a name that is not a module of ``model`` or a module that does not run
    in the forward pass.
    """
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else _default_layers(model)
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ValueError(
            f"layers: {unknown} are not modules of the model; candidates are: "
            f"{', '.join(_default_layers(model))}"
        )
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        results = []
        for name in names:
            totals = [0.0, 0.0, 0.0]  # curvature, ||g||, activation std (batch-weighted)
            for i, weight in enumerate(objective.weights):
                curvature, norm, std = _one_layer(objective, modules[name], name, i)
                for k, value in enumerate((curvature, norm, std)):
                    totals[k] += weight * value
            results.append(LayerCurvature(name, *totals))
        return ActivationCurvature(
            layers=results, loss=objective.loss(), mode=mode, num_batches=objective.num_batches
        )


def _one_layer(
    objective: Objective, module: nn.Module, name: str, index: int
) -> tuple[float, float, float]:
    captured: list[Tensor] = []

    def as_leaf(_module: nn.Module, _args: Any, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = module.register_forward_hook(as_leaf)
    try:
        loss = objective.loss_on(index, {})
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {name!r} does not run in the model's forward pass")
    y = captured[0]
    (g,) = torch.autograd.grad(loss, [y], create_graph=True)
    norm2 = float(torch.sum(g.detach() ** 2))
    if not g.requires_grad:  # the loss is linear in y: H = 0
        hg = torch.zeros_like(g)
    else:
        (hg,) = torch.autograd.grad(g, [y], grad_outputs=g.detach(), allow_unused=True)
        hg = torch.zeros_like(g) if hg is None else hg
    curvature = float(torch.sum(g.detach() * hg)) / norm2 if norm2 > 0 else math.nan
    return curvature, math.sqrt(norm2), float(y.detach().double().std())
