"""The normalization layer every model inserts: a kind of ``bnlab.nn.NORM_KINDS``, seeded."""

from __future__ import annotations

from typing import Any

from torch import nn

from bnlab.nn import norm_layer


def seeded_norm(
    kind: str, num_features: int, rank: int, seed: int, index: int, options: dict[str, Any]
) -> nn.Module:
    """``norm_layer(kind, num_features, rank)``; noisy layers get their own seed per layer so
    their noise is reproducible (the generator travels in the state_dict)."""
    settings = dict(options)
    if kind == "noisy_bn" and "seed" not in settings and "generator" not in settings:
        settings["seed"] = seed * 1009 + index
    return norm_layer(kind, num_features, rank, **settings)
