"""Probe hooks: measurements run every k steps inside the training loop.

A :class:`ProbeHook` has a ``name``, a period ``every`` and a ``measure`` function called with a
:class:`ProbeContext` (model, loss_fn, the step's batch, optimizer, step) *before* the step's
update; it returns a dict of JSON-serializable values, stored as one metrics row
``{"step": t, "kind": "probe", "probe": name, **values}``. The trainer restores the model's
train/eval mode and the global RNG state after each hook, so probes cannot change a run.
"""

from __future__ import annotations

import inspect
import json
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


Measure = Callable[["ProbeContext"], Mapping[str, Any]]
RESERVED_KEYS = frozenset({"step", "kind", "probe"})


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
        values = dict(self.measure(context))
        taken = sorted(RESERVED_KEYS & set(values))
        if taken:
            raise ValueError(
                f"probe {self.name!r} returned the reserved key(s) {', '.join(taken)}; "
                f"a metrics row already has {', '.join(sorted(RESERVED_KEYS))}"
            )
        return values

    def __repr__(self) -> str:
        return f"ProbeHook({self.name!r}, every={self.every})"


# ------------------------------------------------------------ activations as training saw them

QUANTILE_LEVELS: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
SHIFT_LEVELS: tuple[float, ...] = tuple((i + 0.5) / 20 for i in range(20))


def activation_summary(out: Tensor) -> dict[str, Any]:
    """One layer output (N, C, ...) reduced to what the report plots and compares: pooled
    quantiles (QUANTILE_LEVELS for the figure, 20 SHIFT_LEVELS for the shift measure), pooled
    mean and std, and per-channel means and stds (batch and spatial positions pooled, as BN
    pools them)."""
    out = out.detach().double()
    channels = out.transpose(0, 1).reshape(out.shape[1], -1) if out.dim() > 1 else out[None]
    pooled = channels.reshape(-1)
    return {
        "quantiles": torch.quantile(pooled, torch.tensor(QUANTILE_LEVELS).double()).tolist(),
        "shift_quantiles": torch.quantile(pooled, torch.tensor(SHIFT_LEVELS).double()).tolist(),
        "mean": float(pooled.mean()),
        "std": float(pooled.std()),
        "channel_means": channels.mean(dim=1).tolist(),
        "channel_stds": channels.std(dim=1).tolist(),
    }


def activation_distribution(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, layers: list[str]
) -> dict[str, Any]:
    """The outputs of the modules ``layers`` on the step's batch, summarized by
    :func:`activation_summary`. Run as a probe, this is the forward pass of the step itself: the
    same weights and batch, training mode, and (because the trainer restores the noise
    generators after every probe) the same noise draw the step's own forward then makes, so
    the distributions are the ones training saw. Raises ValueError for an unknown module."""
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"activation_distribution: no module named {unknown[0]!r} in the model")
    captured: dict[str, Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            model(batch[0])
    finally:
        for handle in handles:
            handle.remove()
    return {"layers": [{"layer": name, **activation_summary(captured[name])} for name in layers]}


def _activation_factory(*, layers: list[str] | None = None) -> Measure:
    if not layers:
        raise ValueError("activation_distribution needs the option layers (module names)")
    names = [str(name) for name in layers]
    return lambda context: activation_distribution(context.model, context.batch, layers=names)


_activation_factory.options = ("layers",)  # type: ignore[attr-defined]


# --------------------------------------------------------------- adapters for bnlab.landscape


def _plain(result: Any) -> dict[str, Any]:
    """A landscape result (or ``{group: result}``) as JSON-ready values."""
    from bnlab.landscape import to_json

    values = json.loads(to_json(result))
    return values if hasattr(result, "to_dict") else {"groups": values}


def _adapter(probe: Callable[..., Any], wants_optimizer: bool = False) -> Callable[..., Measure]:
    """Turn ``probe(model, loss_fn, batch, [optimizer,] **options)`` into a hook factory whose
    options are checked when the hook is made."""
    signature = inspect.signature(probe)
    allowed = [
        p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]

    def factory(**options: Any) -> Measure:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{probe.__name__} has no option {unknown[0]!r}; its options: {', '.join(allowed)}"
            )

        def measure(context: ProbeContext) -> dict[str, Any]:
            args: list[Any] = [context.model, context.loss_fn, context.batch]
            if wants_optimizer:
                args.append(context.optimizer)
            return _plain(probe(*args, **options))

        return measure

    factory.options = tuple(allowed)  # type: ignore[attr-defined]
    return factory


def _registry() -> dict[str, Callable[..., Measure]]:
    from bnlab import landscape

    return {
        "gradient_path": _adapter(landscape.gradient_path),
        # Definition 2.1 needs the update the optimizer is about to take: the landscape probe
        # simulates it on copies of the real optimizer's state (momentum buffers included).
        "internal_covariate_shift": _adapter(landscape.internal_covariate_shift, True),
        "top_eigenvalues": _adapter(landscape.top_eigenvalues),
        "hutchinson_trace": _adapter(landscape.hutchinson_trace),
        "spectral_density": _adapter(landscape.spectral_density),
        "curvature_along_gradient": _adapter(landscape.curvature_along_gradient),
        "activation_curvature": _adapter(landscape.activation_curvature),
        "activation_distribution": _activation_factory,
        "gradient_bound": _adapter(landscape.gradient_bound),
        "sharpness": _adapter(landscape.sharpness),
        "effective_learning_rates": _adapter(landscape.effective_learning_rates),
    }


# name -> factory(**options) -> measure function.
PROBES: dict[str, Callable[..., Measure]] = _registry()


def probe_options(name: str) -> tuple[str, ...]:
    """The options the registered probe ``name`` accepts."""
    options: tuple[str, ...] = getattr(PROBES[name], "options", ())
    return options


def make_probe(name: str, every: int, options: Mapping[str, Any] | None = None) -> ProbeHook:
    """The registered probe ``name`` as a hook. Raises ValueError for an unknown probe (listing
    the known ones) or option (listing the probe's options)."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; known probes: {', '.join(PROBES)}")
    return ProbeHook(name, every, PROBES[name](**dict(options or {})))
