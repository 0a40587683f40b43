"""Every normalization kind, declared once.

A :class:`NormKind` says what a kind is (its module classes per input rank, its constructor
defaults, what its statistics are taken over, the float64 reference that defines it) and how
it is shown (a label and a colour, the same in every figure). :func:`bnlab.nn.norm_layer`,
:func:`bnlab.nn.convert_norm`, the models' ``norm=`` and the training configs read
:data:`VARIANTS`; a new kind is a module and one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from bnlab.functional import reference
from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.groupnorm import GroupNorm, LayerNorm
from bnlab.nn.lp import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from bnlab.nn.noisy import NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d
from bnlab.nn.renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


@dataclass(frozen=True)
class Statistics:
    """What a kind normalizes with.

    ``over``: "batch", per channel over the (N, *) values of the mini-batch (the kind tracks
    running statistics for eval, takes ``momentum`` and ``track_running_stats``); "sample", per
    sample over its own values (no running statistics, train and eval alike). ``p``: the spread
    s divides by: 2, s = sqrt(var + eps); 1 or inf, s = D_p + eps (lp BatchNorm). ``running``:
    the buffer tracked next to ``running_mean`` (None for per-sample kinds).
    """

    over: Literal["batch", "sample"]
    p: float = 2.0
    running: str | None = "running_var"


@dataclass(frozen=True)
class NormKind:
    """One normalization kind: ``name`` (the ``norm=`` value), ``classes`` (module classes for
    inputs of any rank, rank 1, 2 and 3; empty for "none", which is ``nn.Identity``),
    ``options`` (constructor defaults the kind adds, e.g. lp's ``p``), ``statistics``,
    ``reference`` (the float64 NumPy forward of :mod:`bnlab.functional.reference` that defines
    its training mode; None where torch.nn's own layer defines it), ``label`` and ``color``
    (figures and tables)."""

    name: str
    classes: tuple[type[nn.Module], ...]
    statistics: Statistics | None
    label: str
    color: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    reference: Callable[..., Any] | None = None

    def layer(self, num_features: int, rank: int = 2, **options: Any) -> nn.Module:
        """A fresh layer of this kind for ``num_features`` channels and inputs of ``rank``
        (1, 2, 3; 0 for any); ``options`` override :attr:`options`."""
        if not self.classes:
            return nn.Identity()
        if rank not in (0, 1, 2, 3):
            raise ValueError(f"rank must be 0 (any), 1, 2 or 3, got {rank}")
        layer: nn.Module = self.classes[rank](num_features, **{**self.options, **options})
        return layer


_BATCH = Statistics("batch")
_SAMPLE = Statistics("sample", running=None)


def _lp(name: str, p: float, label: str, color: str) -> NormKind:
    """lp BatchNorm with one p: its own kind (the study compares them as arms)."""
    return NormKind(
        name,
        (LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d),
        Statistics("batch", float(p), "running_scale"),
        label,
        color,
        MappingProxyType({"p": p}),
        reference.lp_batch_norm_forward,
    )


VARIANTS: Mapping[str, NormKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            NormKind("none", (), None, "Standard", "#1f77b4"),
            NormKind(
                "bn",
                (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d),
                _BATCH,
                "Standard + BatchNorm",
                "#d62728",
                reference=reference.batch_norm_forward,
            ),
            NormKind(
                "noisy_bn",
                (NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d),
                _BATCH,
                "Standard + noisy BatchNorm",
                "#2ca02c",
                reference=reference.batch_norm_forward,  # then the noise (bnlab.functional.noise)
            ),
            _lp("l1", 1, "l1 BatchNorm", "#9467bd"),
            _lp("l2", 2, "l2 BatchNorm", "#8c564b"),
            _lp("linf", math.inf, "l-infinity BatchNorm", "#e377c2"),
            NormKind(
                "ghost",
                (GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
                _BATCH,
                "Ghost BatchNorm",
                "#7f7f7f",
                reference=reference.batch_norm_forward,  # per virtual batch
            ),
            NormKind(
                "renorm",
                (BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
                _BATCH,
                "Batch Renormalization",
                "#bcbd22",
                reference=reference.batch_renorm_forward,
            ),
            NormKind("layer", (LayerNorm,) * 4, _SAMPLE, "Standard + LayerNorm", "#17becf"),
            NormKind("group", (GroupNorm,) * 4, _SAMPLE, "Standard + GroupNorm", "#ff7f0e"),
        )
    }
)
"""Every kind by name, in the order figures and tables list them."""

NORM_KINDS: tuple[str, ...] = tuple(VARIANTS)


def variant(kind: str) -> NormKind:
    """The description of ``kind``; raises ValueError for an unknown kind, listing the known."""
    try:
        return VARIANTS[kind]
    except KeyError:
        known = ", ".join(NORM_KINDS)
        raise ValueError(f"unknown norm kind {kind!r}; known kinds: {known}") from None


def labels() -> dict[str, str]:
    """kind -> its label in figures and tables ("bn": "Standard + BatchNorm", ...)."""
    return {name: kind.label for name, kind in VARIANTS.items()}


def colors() -> dict[str, str]:
    """kind -> its colour, the same in every figure ("bn": "#d62728", ...)."""
    return {name: kind.color for name, kind in VARIANTS.items()}
