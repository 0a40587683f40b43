"""Effective learning rates of scale-invariant weights (van Laarhoven 2017; Arora, Li, Lyu 2019).

A layer whose output goes straight into a normalization (BN in training mode, LayerNorm,
GroupNorm, ...) leaves the loss unchanged when its weights w (with its bias) are scaled:
L(c w) = L(w) for c > 0. Differentiating in c at c = 1 gives <grad L(w), w> = 0, and
grad L(c w) = grad L(w) / c: an SGD step of size lr moves the *direction* of w as a step of
lr / ||w||^2 would on the unit sphere, the effective learning rate. Since the step is orthogonal
to w, its angle is atan(lr ||g|| / ||w||), and ||w|| grows every step unless weight decay
shrinks it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.landscape.evaluation import (
    BatchOrLoader,
    LossFn,
    Mode,
    Objective,
    flat,
    leave_as_found,
)
from bnlab.landscape.results import EffectiveLearningRates, LayerScale
from bnlab.nn import is_norm_layer

__all__ = ["effective_learning_rates", "normalized_layers"]


def _is_normalization(module: nn.Module) -> bool:
    return is_norm_layer(module) or isinstance(
        module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    )


def normalized_layers(objective: Objective) -> dict[str, str]:
    """Layer name -> name of the normalization its output goes straight into, found by one
    forward pass of the first batch (forward hooks: the normalization's input *is* the layer's
    output tensor, so a layer whose output passes through anything else first is not listed)."""
    model = objective.model
    outputs: list[tuple[str, Any]] = []
    feeds: dict[str, str] = {}

    def record(name: str) -> Any:
        return lambda _m, _args, out: outputs.append((name, out))

    def match(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            for producer, out in reversed(outputs):
                if args and out is args[0]:
                    feeds.setdefault(producer, name)
                    return

        return hook

    handles = []
    for name, module in model.named_modules():
        if _is_normalization(module):
            handles.append(module.register_forward_pre_hook(match(name)))
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            objective.outputs_on(0, {})
    finally:
        for handle in handles:
            handle.remove()
    return feeds


def _angle(a: Tensor, b: Tensor) -> float:
    cosine = float(torch.dot(a, b)) / (float(a.norm()) * float(b.norm()))
    return math.acos(max(-1.0, min(1.0, cosine)))


def effective_learning_rates(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    *,
    lr: float,
    previous: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | None = None,
    num_batches: int | None = None,
    mode: Mode = "train",
    tol: float = 1e-4,
) -> EffectiveLearningRates:
    """For every layer followed by a normalization (or the modules named in ``layers``), over
    the layer's own trainable parameters w (weight and bias together): ||w||, the effective
    learning rate lr / ||w||^2, <g, w> and its cosine (``scale_invariant``: |cos| <= ``tol``;
    0 exactly when the loss is invariant to the scale of w), the angle an SGD step of ``lr``
    would turn w by, atan(lr ||g|| / ||w||), and, given the parameters of the previous step
    (``previous``: name -> tensor, e.g. a copy of ``model.state_dict()``), the angle it turned.

    Raises ValueError for lr <= 0, tol <= 0, a name in ``layers`` that is not a module with
    trainable parameters, or a ``previous`` that lacks a layer's parameters or has other shapes.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    modules = dict(model.named_modules())
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        feeds = normalized_layers(objective)
        chosen = list(feeds) if layers is None else list(layers)
        owned: dict[str, list[str]] = {}
        for layer in chosen:
            names = [
                f"{layer}.{n}" if layer else n
                for n, p in (
                    modules[layer].named_parameters(recurse=False) if layer in modules else []
                )
                if p.requires_grad
            ]
            if not names:
                raise ValueError(
                    f"layers: {layer!r} is not a module with trainable parameters of the model"
                )
            owned[layer] = names
        loss, grad = objective.loss_and_gradient()
        results = []
        for layer, names in owned.items():
            w = flat(objective.params[n] for n in names).double()
            g = flat(grad[n] for n in names).double()
            norm, grad_norm = float(w.norm()), float(g.norm())
            dot = float(torch.dot(g, w))
            cosine = dot / (norm * grad_norm) if norm > 0 and grad_norm > 0 else 0.0
            angle = None
            if previous is not None:
                bad = [
                    n
                    for n in names
                    if n not in previous or previous[n].shape != objective.params[n].shape
                ]
                if bad:
                    raise ValueError(
                        f"previous must hold the parameters {bad} with the model's shapes"
                    )
                before = flat(previous[n].detach() for n in names).double()
                angle = _angle(before, w)
            results.append(
                LayerScale(
                    layer=layer,
                    parameters=names,
                    normalized_by=feeds.get(layer),
                    norm=norm,
                    effective_lr=lr / norm**2 if norm > 0 else math.inf,
                    gradient_norm=grad_norm,
                    grad_dot_weight=dot,
                    cosine=cosine,
                    scale_invariant=abs(cosine) <= tol,
                    predicted_angular_update=math.atan2(lr * grad_norm, norm),
                    angular_update=angle,
                )
            )
    return EffectiveLearningRates(
        layers=results, lr=lr, loss=loss, tol=tol, mode=mode, num_batches=objective.num_batches
    )
