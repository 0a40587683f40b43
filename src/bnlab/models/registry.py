"""``build_model(name, **options)``: every model of bnlab by name."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bnlab.models.mlp import MLP, DeepLinearNetwork, LogisticRegression
from bnlab.models.vgg import VGG, VGG_PRESETS


def _vgg_preset(name: str) -> Callable[..., nn.Module]:
    widths, convs = VGG_PRESETS[name]
    return functools.partial(VGG, widths=widths, convs_per_stage=convs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg": VGG,
    **{name: _vgg_preset(name) for name in VGG_PRESETS},
    "mlp": MLP,
    "dln": DeepLinearNetwork,
    "logistic": LogisticRegression,
}


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options ``build_model(name, ...)`` accepts besides input_shape/num_outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    builder = MODELS[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    fixed = set(builder.keywords) if isinstance(builder, functools.partial) else set()
    params = inspect.signature(target).parameters
    return tuple(p for p in params if p not in {"self", "input_shape", "num_outputs"} | fixed)


def build_model(
    name: str, input_shape: Sequence[int], num_outputs: int, **options: Any
) -> nn.Module:
    """A freshly initialized model ``name`` for inputs of ``input_shape`` (without the batch
    axis) and ``num_outputs`` outputs (classes, or regression targets).

    Models: "vgg" (give ``widths``, ``convs_per_stage``), "vgg16" (the paper's CIFAR-10 VGG),
    "vgg11", "vgg_digits" (widths (16, 32), for 8x8 digits), "vgg10_digits" (ten convolutions,
    for 8x8 digits: the study's VGG), "mlp" (``hidden``), "dln"
    (``depth``, ``width``), "logistic". Common options: ``norm`` (a kind of
    ``bnlab.nn.NORM_KINDS``), ``norm_options``, ``init_scale``, ``seed``.

    The global RNG is left as it was: the weights come from ``seed`` alone.

    Raises ValueError for an unknown model or option, listing the known ones.
    """
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option {unknown[0]!r}; its options: {', '.join(allowed)}"
        )
    # torch's layer constructors draw their default init from the global RNG before
    # init_parameters overwrites it; fork_rng keeps that draw from shifting the caller's stream.
    with torch.random.fork_rng(devices=[]):
        return MODELS[name](input_shape=tuple(input_shape), num_outputs=num_outputs, **options)
