"""``convert_norm``: swap every normalization layer of any model for another kind."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _Dims1d,
    _Dims2d,
    _Dims3d,
)
from bnlab.nn.ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.lp import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from bnlab.nn.noisy import NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d
from bnlab.nn.renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

# kind -> (classes for a generic rank, 1d, 2d, 3d; extra constructor options)
_FAMILIES: dict[str, tuple[tuple[type[BatchNorm], ...], dict[str, Any]]] = {
    "bn": ((BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d), {}),
    "noisy_bn": ((NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d), {}),
    "l1": ((LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d), {"p": 1}),
    "l2": ((LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d), {"p": 2}),
    "linf": ((LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d), {"p": math.inf}),
    "ghost": ((GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d), {}),
    "renorm": ((BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), {}),
}
NORM_KINDS: tuple[str, ...] = ("none", *_FAMILIES)


def _rank_of(layer: nn.Module) -> int:
    """0 for a rank-agnostic layer (e.g. SyncBatchNorm), else 1, 2 or 3 from the class."""
    for rank, torch_cls, ours in (
        (1, nn.BatchNorm1d, _Dims1d),
        (2, nn.BatchNorm2d, _Dims2d),
        (3, nn.BatchNorm3d, _Dims3d),
    ):
        if isinstance(layer, (torch_cls, ours)):
            return rank
    return 0


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm and every bnlab norm layer."""
    return isinstance(module, (_BatchNorm, BatchNorm))


def norm_layer(kind: str, num_features: int, rank: int = 2, **options: Any) -> nn.Module:
    """A fresh normalization layer of ``kind`` for inputs of ``rank`` (1, 2, 3; 0 for any)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; known kinds: {', '.join(NORM_KINDS)}")
    if kind == "none":
        return nn.Identity()
    classes, defaults = _FAMILIES[kind]
    return classes[rank](num_features, **{**defaults, **options})


def _convert_layer(old: Any, kind: str, options: dict[str, Any]) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    weight = getattr(old, "weight", None)
    running_mean = getattr(old, "running_mean", None)
    reference = weight if weight is not None else running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    settings = {
        "eps": old.eps,
        "momentum": old.momentum,
        "affine": old.affine,
        "bias": getattr(old, "bias", None) is not None or not old.affine,
        "track_running_stats": old.track_running_stats,
        **factory,
        **options,
    }
    new: Any = norm_layer(kind, old.num_features, _rank_of(old), **settings)
    with torch.no_grad():
        if new.affine and old.affine and weight is not None:
            new.weight.copy_(weight)
            if new.bias is not None and old.bias is not None:
                new.bias.copy_(old.bias)
        if new.track_running_stats and old.track_running_stats:
            new.running_mean.copy_(old.running_mean)
            new.num_batches_tracked.copy_(old.num_batches_tracked)
            # torch.nn layers track running_var; lp layers track running_scale instead.
            old_name = getattr(old, "_scale_buffer", "running_var")
            if new._scale_buffer == old_name:
                getattr(new, old_name).copy_(getattr(old, old_name))
    new.train(old.training)
    return new


def convert_norm(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Replace every normalization layer of ``model`` by one of ``kind``, in place.

    ``kind`` is one of ``NORM_KINDS``: "none" (``nn.Identity``), "bn", "noisy_bn", "l1", "l2",
    "linf", "ghost", "renorm"; ``options`` go to the new layers' constructors (e.g.
    ``virtual_batch_size=16``, ``seed=0``). Affine parameters, ``running_mean``,
    ``num_batches_tracked`` and the scale buffer (when both layers track the same one) are
    copied. Returns the model (or the new layer, if ``model`` itself is a norm layer).

    Raises ValueError for an unknown kind, listing the known ones.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; known kinds: {', '.join(NORM_KINDS)}")
    if is_norm_layer(model):
        return _convert_layer(model, kind, options)
    for name, child in model.named_children():
        if is_norm_layer(child):
            setattr(model, name, _convert_layer(child, kind, options))
        else:
            convert_norm(child, kind, **options)
    return model
