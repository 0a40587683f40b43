"""``convert_norm``: swap every normalization layer of any model for another kind."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d
from bnlab.nn.variants import NORM_KINDS, VARIANTS, variant

__all__ = ["NORM_KINDS", "convert_norm", "is_norm_layer", "norm_layer"]


def _rank_of(layer: nn.Module) -> int:
    """0 for a rank-agnostic layer (e.g. SyncBatchNorm, GroupNorm), else 1, 2 or 3."""
    for rank, torch_cls, ours in (
        (1, nn.BatchNorm1d, _Dims1d),
        (2, nn.BatchNorm2d, _Dims2d),
        (3, nn.BatchNorm3d, _Dims3d),
    ):
        if isinstance(layer, (torch_cls, ours)):
            return rank
    return 0


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm and every layer of a bnlab kind
    (of :data:`VARIANTS` as it is now: a kind registered later counts too)."""
    classes = {cls for kind in VARIANTS.values() for cls in kind.classes}
    return isinstance(module, (_BatchNorm, BatchNorm, *classes))


def norm_layer(kind: str, num_features: int, rank: int = 2, **options: Any) -> nn.Module:
    """A fresh normalization layer of ``kind`` for inputs of ``rank`` (1, 2, 3; 0 for any)."""
    return variant(kind).layer(num_features, rank, **options)


def _convert_layer(old: Any, kind: str, options: dict[str, Any]) -> nn.Module:
    target = variant(kind)
    if target.statistics is None:
        return nn.Identity()
    weight = getattr(old, "weight", None)
    running_mean = getattr(old, "running_mean", None)
    reference = weight if weight is not None else running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    settings = {
        "eps": old.eps,
        "affine": old.affine,
        "bias": getattr(old, "bias", None) is not None or not old.affine,
        **factory,
    }
    if target.statistics.over == "batch":  # a per-sample layer has no running statistics
        for key in ("momentum", "track_running_stats"):
            if hasattr(old, key):
                settings[key] = getattr(old, key)
    new: Any = target.layer(old.num_features, _rank_of(old), **{**settings, **options})
    with torch.no_grad():
        if new.affine and old.affine and weight is not None:
            new.weight.copy_(weight)
            if new.bias is not None and old.bias is not None:
                new.bias.copy_(old.bias)
        if getattr(new, "track_running_stats", False) and getattr(
            old, "track_running_stats", False
        ):
            new.running_mean.copy_(old.running_mean)
            new.num_batches_tracked.copy_(old.num_batches_tracked)
            # torch.nn layers track running_var; lp layers track running_scale instead.
            old_name = getattr(old, "_scale_buffer", "running_var")
            if target.statistics.running == old_name:
                getattr(new, old_name).copy_(getattr(old, old_name))
    new.train(old.training)
    return new


def convert_norm(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Replace every normalization layer of ``model`` by one of ``kind``, in place.

    ``kind`` is one of ``NORM_KINDS`` (:data:`bnlab.nn.VARIANTS`): "none" (``nn.Identity``),
    "bn", "noisy_bn", "l1", "l2", "linf", "ghost", "renorm", ...; ``options`` go to the new
    layers' constructors (e.g. ``virtual_batch_size=16``, ``seed=0``). Affine parameters and,
    between kinds with batch statistics, ``momentum``, ``running_mean``, ``num_batches_tracked``
    and the scale buffer (when both layers track the same one) are carried over. Returns the
    model (or the new layer, if ``model`` itself is a norm layer).

    Raises ValueError for an unknown kind, listing the known ones.
    """
    variant(kind)  # an unknown kind fails before anything is swapped
    if is_norm_layer(model):
        return _convert_layer(model, kind, options)
    for name, child in model.named_children():
        if is_norm_layer(child):
            setattr(model, name, _convert_layer(child, kind, options))
        else:
            convert_norm(child, kind, **options)
    return model
