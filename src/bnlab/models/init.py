"""Explicit, seeded initialization with a scale knob.

The paper's "bad initialization" experiments multiply a standard initialization by a factor;
``init_scale`` is that factor. Initialization draws from its own ``torch.Generator`` so building
a model never touches the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.nn import is_norm_layer

INIT_SCHEMES: tuple[str, ...] = ("kaiming", "xavier")


def init_parameters(
    model: nn.Module, seed: int, scale: float = 1.0, scheme: str = "kaiming"
) -> None:
    """Re-initialize every Conv/Linear of ``model`` in place from ``seed``.

    Weights are drawn from N(0, std^2) with std = scale * gain / sqrt(fan_in), gain = sqrt(2)
    for ``"kaiming"`` (ReLU networks, He et al. 2015) and 1 for ``"xavier"``-style fan-in scaling
    (linear networks); biases are zero; norm layers get weight 1 and bias 0. Layers are visited in
    ``model.modules()`` order, so the same seed gives the same weights.

    Raises ValueError for an unknown scheme or a non-positive scale.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(
            f"unknown init scheme {scheme!r}; known schemes: {', '.join(INIT_SCHEMES)}"
        )
    if not scale > 0:
        raise ValueError(f"init_scale must be positive, got {scale}")
    gain = math.sqrt(2.0) if scheme == "kaiming" else 1.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                std = scale * gain / math.sqrt(fan_in)
                draw = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
                module.weight.copy_(draw * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif is_norm_layer(module) and getattr(module, "affine", False):
                nn.init.ones_(module.weight)  # type: ignore[arg-type]
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]
