"""Internal covariate shift, the optimization view (Santurkar et al. 2018, Definition 2.1).

For layer i, G = grad_{W_i} L(W_1^t, ..., W_k^t) and
G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t) on the same batch: how
much the gradient of layer i changes because the layers before it took the optimizer's step.
ICS is ||G - G'||_2 (and the paper also plots cos(G, G')). The update W^{t+1} is the
optimizer's own: a deep copy of the optimizer (its momentum buffers, step counts,
hyperparameters) steps a copy of the parameters with G, so the real optimizer and model are
untouched and any ``torch.optim`` optimizer works.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.landscape.evaluation import BatchOrLoader, LossFn, Mode, Objective, leave_as_found
from bnlab.landscape.results import CovariateShift, LayerShift
from bnlab.nn import is_norm_layer

__all__ = ["internal_covariate_shift", "simulated_step"]


def simulated_step(
    optimizer: torch.optim.Optimizer,
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    model: nn.Module,
) -> dict[str, Tensor]:
    """The parameters one step of ``optimizer`` would produce from ``params`` with gradients
    ``grads`` (names of ``model``), computed on copies: the optimizer's state is not touched.
    Parameters outside the optimizer, or without a gradient, keep their values."""
    originals = {id(p): n for n, p in model.named_parameters()}
    memo: dict[int, Any] = {}
    copies: dict[str, nn.Parameter] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = originals.get(id(p))
            start = params[name] if name is not None and name in params else p.detach()
            twin = nn.Parameter(start.detach().clone(), requires_grad=p.requires_grad)
            if name is not None and name in grads:
                twin.grad = grads[name].detach().clone()
            memo[id(p)] = twin
            if name is not None:
                copies[name] = twin
    twin_optimizer = copy.deepcopy(optimizer, memo)
    # The class's step, not an instance attribute an LR scheduler may have wrapped around the
    # original optimizer's step.
    with torch.no_grad():
        type(twin_optimizer).step(twin_optimizer)
    return {**params, **{n: t.detach() for n, t in copies.items()}}


def _owners(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> names of the trainable parameters it holds directly."""
    owners: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                full = f"{module_name}.{pname}" if module_name else pname
                owners.setdefault(module_name, []).append(full)
    return owners


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: LossFn,
    batch_or_loader: BatchOrLoader,
    optimizer: torch.optim.Optimizer,
    *,
    layers: Sequence[str] | None = None,
    num_batches: int | None = None,
    mode: Mode = "train",
) -> CovariateShift:
    """||G - G'|| and cos(G, G') per layer (Definition 2.1), layers in forward order.

    Call it in a training loop before ``optimizer.step()`` on the step's batch; G is the probe's
    gradient at the current parameters, and the earlier layers move by the step ``optimizer``
    would take with it (see :func:`simulated_step`). "Earlier" is the order in which the modules
    first run in the forward pass. ``layers``: module names to report (default: every module
    holding trainable parameters directly, norm layers excepted; their parameters still count
    as earlier layers). Cost: one forward+backward plus one per layer.

    Raises ValueError for a layer name that is not a module with trainable parameters.
    """
    owners = _owners(model)
    if layers is None:
        modules = dict(model.named_modules())
        layers = [m for m in owners if not is_norm_layer(modules[m])]
    else:
        layers = list(layers)
        unknown = [m for m in layers if m not in owners]
        if unknown:
            raise ValueError(
                f"layers: {unknown} are not modules holding trainable parameters; "
                f"candidates are: {', '.join(owners)}"
            )
    with leave_as_found(model):
        objective = Objective(model, loss_fn, batch_or_loader, num_batches=num_batches, mode=mode)
        order: list[str] = []
        handles = [
            module.register_forward_pre_hook(
                lambda _m, _i, name=name: order.append(name) if name not in order else None
            )
            for name, module in model.named_modules()
            if name in owners
        ]
        try:
            _, grads = objective.loss_and_gradient()
        finally:
            for handle in handles:
                handle.remove()
        updated = simulated_step(optimizer, objective.params, grads, model)
        shifts = []
        for layer in sorted(layers, key=lambda m: order.index(m) if m in order else len(order)):
            if layer not in order:
                continue  # not used in the forward pass: no gradient to shift
            earlier = [n for m in order[: order.index(layer)] for n in owners[m]]
            point = {**objective.params, **{n: updated[n] for n in earlier}}
            names = owners[layer]
            _, shifted = objective.loss_and_gradient(point, names)
            g = torch.cat([grads[n].reshape(-1) for n in names])
            g2 = torch.cat([shifted[n].reshape(-1) for n in names])
            norm, norm2 = float(torch.linalg.vector_norm(g)), float(torch.linalg.vector_norm(g2))
            shifts.append(
                LayerShift(
                    layer=layer,
                    l2_difference=float(torch.linalg.vector_norm(g - g2)),
                    cosine=float(torch.dot(g, g2)) / (norm * norm2)
                    if norm * norm2 > 0
                    else math.nan,
                    gradient_norm=norm,
                    shifted_gradient_norm=norm2,
                )
            )
        return CovariateShift(layers=shifts, mode=mode, num_batches=objective.num_batches)
