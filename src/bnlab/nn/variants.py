"""Every normalization kind, declared once.

A :class:`NormKind` says what a kind is (its module classes per input rank, its constructor
defaults, what its statistics are taken over, the float64 reference that defines it) and how
it is shown (a label and a colour, the same in every figure) and where the Santurkar study
trains it (``arm``). :func:`bnlab.nn.norm_layer`, :func:`bnlab.nn.convert_norm`, the models'
``norm=``, the training configs, the study's arms, the report's figures and ``bnlab bench
layers`` read :data:`VARIANTS` when they run; a new kind is a module and one entry here (or one
:func:`register` call from outside bnlab).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, overload

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
class Arm:
    """A kind's arm in the Santurkar study: ``name`` (its runs' and the report's name for it)
    and ``part``: "paper" (an arm of the paper's experiments, judged by its claims) or
    "extension" (compared at the same settings past the paper, in the report's extension
    section)."""

    name: str
    part: Literal["paper", "extension"]


@dataclass(frozen=True)
class NormKind:
    """One normalization kind: ``name`` (the ``norm=`` value), ``classes`` (module classes for
    inputs of any rank, rank 1, 2 and 3; empty for "none", which is ``nn.Identity``),
    ``options`` (constructor defaults the kind adds, e.g. lp's ``p``), ``statistics``,
    ``reference`` (the float64 NumPy forward of :mod:`bnlab.functional.reference` that defines
    its training mode; None where torch.nn's own layer defines it), ``label`` and ``color``
    (figures and tables), ``arm`` (its arm in the Santurkar study; None where the
    study does not train it)."""

    name: str
    classes: tuple[type[nn.Module], ...]
    statistics: Statistics | None
    label: str
    color: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    reference: Callable[..., Any] | None = None
    arm: Arm | None = None

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
        Arm(name, "paper"),
    )


_KINDS: dict[str, NormKind] = {
    kind.name: kind
    for kind in (
        NormKind("none", (), None, "Standard", "#1f77b4", arm=Arm("standard", "paper")),
        NormKind(
            "bn",
            (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d),
            _BATCH,
            "Standard + BatchNorm",
            "#d62728",
            reference=reference.batch_norm_forward,
            arm=Arm("bn", "paper"),
        ),
        NormKind(
            "noisy_bn",
            (NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d),
            _BATCH,
            "Standard + noisy BatchNorm",
            "#2ca02c",
            reference=reference.batch_norm_forward,  # then the noise (bnlab.functional.noise)
            arm=Arm("noisy_bn", "paper"),
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
        NormKind(
            "layer",
            (LayerNorm,) * 4,
            _SAMPLE,
            "Standard + LayerNorm",
            "#17becf",
            arm=Arm("layer", "extension"),
        ),
        NormKind(
            "group",
            (GroupNorm,) * 4,
            _SAMPLE,
            "Standard + GroupNorm",
            "#ff7f0e",
            arm=Arm("group", "extension"),
        ),
    )
}

VARIANTS: Mapping[str, NormKind] = MappingProxyType(_KINDS)
"""Every kind by name, in the order figures and tables list them (a read-only view: a kind
added by :func:`register` is in it at once)."""


class _KindNames(Sequence[str]):
    """The names of :data:`VARIANTS` in order, read from the registry on every use."""

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return tuple(_KINDS)[index]

    def __len__(self) -> int:
        return len(_KINDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_KINDS))

    def __contains__(self, name: object) -> bool:
        return name in _KINDS

    def __repr__(self) -> str:
        return repr(tuple(_KINDS))


NORM_KINDS: Sequence[str] = _KindNames()
"""The kind names, in registry order (live, like :data:`VARIANTS`)."""


def register(kind: NormKind) -> NormKind:
    """Add ``kind`` to the registry, after the kinds already there; every reader sees it from
    then on. Raises ValueError when its name, label or colour is taken, or its arm's name is."""
    for other in _KINDS.values():
        for what, mine, theirs in (
            ("name", kind.name, other.name),
            ("label", kind.label, other.label),
            ("colour", kind.color, other.color),
            ("arm", kind.arm and kind.arm.name, other.arm and other.arm.name),
        ):
            if mine is not None and mine == theirs:
                raise ValueError(f"norm kind {kind.name!r}: {what} {mine!r} is {other.name!r}'s")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> NormKind:
    """Remove the kind ``name`` (one a :func:`register` call added); returns it."""
    return _KINDS.pop(variant(name).name)


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


class _Arms(Mapping[str, str]):
    """Arm name -> kind of one part of the study, read from the registry on every use."""

    def __init__(self, part: Literal["paper", "extension"]) -> None:
        self.part = part

    def _now(self) -> dict[str, str]:
        return {k.arm.name: k.name for k in _KINDS.values() if k.arm and k.arm.part == self.part}

    def __getitem__(self, arm: str) -> str:
        return self._now()[arm]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __repr__(self) -> str:
        return repr(self._now())


def arms(part: Literal["paper", "extension"]) -> Mapping[str, str]:
    """The Santurkar study's arms of one part, arm name -> kind, in registry order
    ("standard": "none", "bn": "bn", ... for "paper"; "layer": "layer", ... for "extension"):
    a live view, so a kind registered later is an arm too."""
    return _Arms(part)


def of_arm(arm: str) -> NormKind | None:
    """The kind whose study arm is named ``arm`` (else the kind named ``arm``); None if none."""
    for kind in _KINDS.values():
        if kind.arm is not None and kind.arm.name == arm:
            return kind
    return _KINDS.get(arm)
