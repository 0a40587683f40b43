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

INIT_SCHEMES: tuple[str, ...] = ("kaiming", "xavier", "glorot")


def init_parameters(
    model: nn.Module, seed: int, scale: float = 1.0, scheme: str = "kaiming"
) -> None:
    """Re-initialize every Conv/Linear of ``model`` in place from ``seed``.

    ``"kaiming"``: N(0, std^2), std = scale * sqrt(2 / fan_in) (ReLU networks, He et al. 2015);
    ``"xavier"``: N(0, std^2), std = scale / sqrt(fan_in) (fan-in scaling);
    ``"glorot"``: U(-a, a), a = scale * sqrt(6 / (fan_in + fan_out)), Glorot & Bengio (2010)'s
    "normalized initialization", variance 2 / (fan_in + fan_out): the initialization of
    Santurkar et al. (2018, appendix A) for both of their networks.
    Biases are zero; norm layers get weight 1 and bias 0. Layers are visited in
    ``model.modules()`` order, so the same seed gives the same weights.

    Raises ValueError for an unknown scheme or a non-positive scale.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(
            f"unknown init scheme {scheme!r}; known schemes: {', '.join(INIT_SCHEMES)}"
        )
    if not scale > 0:
        raise ValueError(f"init_scale must be positive, got {scale}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                module.weight.copy_(_draw(module.weight, scheme, scale, generator))
                if module.bias is not None:
                    module.bias.zero_()
            elif is_norm_layer(module) and getattr(module, "affine", False):
                nn.init.ones_(module.weight)  # type: ignore[arg-type]
                if module.bias is not None:  # affine without a bias (bias=False)
                    nn.init.zeros_(module.bias)  # type: ignore[arg-type]


def _draw(
    weight: torch.Tensor, scheme: str, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """A float64 draw of ``weight``'s shape under ``scheme`` (fans as torch.nn.init counts them:
    fan_in = in_channels x kernel size, fan_out = out_channels x kernel size)."""
    fan_in = weight[0].numel()
    fan_out = weight.shape[0] * weight[0, 0].numel()
    if scheme == "glorot":
        bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
        uniform = torch.rand(weight.shape, generator=generator, dtype=torch.float64)
        return (2.0 * uniform - 1.0) * bound
    gain = math.sqrt(2.0) if scheme == "kaiming" else 1.0
    normal = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    return normal * (scale * gain / math.sqrt(fan_in))
