"""Probe hooks: measurements run every k steps inside the training loop.

A :class:`ProbeHook` has a ``name``, a period ``every`` and a ``measure`` function called with a
:class:`ProbeContext` (model, loss_fn, the step's batch, optimizer, step) *before* the step's
update; it returns a dict of JSON-serializable values, stored as one metrics row
``{"step": t, "kind": "probe", "probe": name, **values}``. The trainer restores the model's
train/eval mode and the global RNG state after each hook, so probes cannot change a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ProbeContext:
    """What a probe sees: the (unwrapped) ``model`` in training mode, ``loss_fn(output,
    target)``, the step's ``batch`` = (inputs, targets) on the model's device, the
    ``optimizer`` about to take step ``step`` (1-based)."""

    model: nn.Module
    loss_fn: LossFn
    batch: tuple[Tensor, Tensor]
    optimizer: torch.optim.Optimizer
    step: int


class ProbeHook:
    """``measure(context) -> dict`` run at every step that is a multiple of ``every``."""

    def __init__(
        self, name: str, every: int, measure: Callable[[ProbeContext], Mapping[str, Any]]
    ) -> None:
        if every < 1:
            raise ValueError(f"probe {name!r}: every must be >= 1, got {every}")
        self.name = name
        self.every = every
        self.measure = measure

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, context: ProbeContext) -> dict[str, Any]:
        return dict(self.measure(context))

    def __repr__(self) -> str:
        return f"ProbeHook({self.name!r}, every={self.every})"


# name -> factory(options) -> measure function; filled in by the adapters below.
PROBES: dict[str, Callable[..., Callable[[ProbeContext], Mapping[str, Any]]]] = {}


def make_probe(name: str, every: int, options: Mapping[str, Any] | None = None) -> ProbeHook:
    """The registered probe ``name`` as a hook; ValueError lists the known probes."""
    if name not in PROBES:
        known = ", ".join(PROBES) or "none yet"
        raise ValueError(f"unknown probe {name!r}; known probes: {known}")
    return ProbeHook(name, every, PROBES[name](**dict(options or {})))
