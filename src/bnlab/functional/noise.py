"""The noise of noisy BatchNorm, drawn so that every path regenerates the same values.

One training step draws, from the layer's ``torch.Generator``, the per-channel mean ``mu_c`` and
standard deviation ``sigma_c`` of :class:`NoiseSpec` and a 64-bit key. The per-activation
standard normals ``z`` and ``z'`` are then a pure function of (key, channel, logical position):
a counter-based hash picks two of 2^16 equiprobable normal quantiles. So the noise costs no
memory (the backward regenerates ``z'``), is deterministic for any thread count, and is bitwise
the same on the fused CPU kernels and on the torch-op path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANTILE_BITS = 16
"""z takes 2^16 values: the normal quantiles at (k + 1/2) / 2^16, |z| <= 4.3."""

_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_quantile_tables: dict[tuple[torch.dtype, torch.device], Tensor] = {}


@dataclass(frozen=True)
class NoiseSpec:
    """The time-varying noise of "noisy BatchNorm" (Santurkar et al. 2018, section 2.1).

    At every training step each channel c draws its noise distribution: a mean
    ``mu_c ~ U(-mean_range, mean_range)`` and a standard deviation
    ``sigma_c ~ U(std_low, std_high)``; every activation of every sample then receives its own
    i.i.d. perturbation ``y + (mu_c + sigma_c * z)`` with ``z ~ N(0, 1)``, and a multiplicative
    one ``* (1 + scale_std * z')`` which makes the variance of the layer's output move too.
    ``z`` and ``z'`` are independent standard normals quantized to 2^16 equiprobable values
    (see :func:`normal_quantiles`), generated from a per-step key by a counter-based hash.
    """

    mean_range: float = 0.5
    std_low: float = 0.5
    std_high: float = 1.5
    scale_std: float = 0.25

    def __post_init__(self) -> None:
        if self.mean_range < 0 or self.std_low < 0 or self.std_high < self.std_low:
            raise ValueError(
                "NoiseSpec needs mean_range >= 0 and 0 <= std_low <= std_high, got "
                f"mean_range={self.mean_range}, std_low={self.std_low}, std_high={self.std_high}"
            )
        if self.scale_std < 0:
            raise ValueError(f"NoiseSpec needs scale_std >= 0, got {self.scale_std}")


@dataclass(frozen=True)
class NoiseDraw:
    """One step's noise: per-channel ``mu`` and ``sigma`` (C,), ``scale_std``, and the hash key
    (two 32-bit integers) that fixes every per-activation ``z`` and ``z'``."""

    mu: Tensor
    sigma: Tensor
    scale_std: float
    key: tuple[int, int]


def draw(
    spec: NoiseSpec,
    channels: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> NoiseDraw:
    """Draw one step's noise from ``generator`` (the global RNG when None)."""
    u = torch.rand(2, channels, device=device, dtype=dtype, generator=generator)
    # One op for both rows (runs every step): mu = -r + 2r u, sigma = lo + (hi - lo) u.
    low, width = _affine_rows(spec, device, dtype)
    mu, sigma = torch.addcmul(low, u, width).unbind(0)
    k0, k1 = torch.randint(
        0, 2**32, (2,), device=device, dtype=torch.int64, generator=generator
    ).tolist()
    return NoiseDraw(mu, sigma, spec.scale_std, (int(k0), int(k1)))


_affine_cache: dict[tuple[NoiseSpec, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _affine_rows(
    spec: NoiseSpec, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(2, 1) offsets and widths mapping U(0, 1) to mu's and sigma's ranges."""
    key = (spec, torch.device(device), dtype)
    rows = _affine_cache.get(key)
    if rows is None:
        low = [-spec.mean_range, spec.std_low]
        width = [2 * spec.mean_range, spec.std_high - spec.std_low]
        rows = _affine_cache[key] = (
            torch.tensor(low, device=device, dtype=dtype).view(2, 1),
            torch.tensor(width, device=device, dtype=dtype).view(2, 1),
        )
    return rows


def normal_quantiles(dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """The 2^16 standard normal quantiles Phi^-1((k + 1/2) / 2^16), k = 0 .. 2^16 - 1."""
    device = torch.device(device)
    table = _quantile_tables.get((dtype, device))
    if table is None:
        k = torch.arange(2**QUANTILE_BITS, dtype=torch.float64)
        table = torch.special.ndtri((k + 0.5) / 2**QUANTILE_BITS).to(dtype=dtype, device=device)
        _quantile_tables[(dtype, device)] = table
    return table


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2^32 without overflowing int64: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """lowbias32 (C. Wellons) twice, keyed; int64 in, values in [0, 2^32) out. The numba
    kernels compute the same function (``kernels.loops._hash32``)."""
    x = (counter & _M32) ^ key[0]
    for _ in range(2):
        x = x ^ (x >> 16)
        x = _mul32(x, _MUL1)
        x = x ^ (x >> 15)
        x = _mul32(x, _MUL2)
        x = x ^ (x >> 16)
        x = (x + key[1]) & _M32
    return x


def standard_normals(
    shape: torch.Size, draw: NoiseDraw, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(z, z')`` of the given (N, C, *) shape (contiguous), on ``draw``'s device.

    Element (n, c, j) (j the flat spatial index) uses counter c * N * S + n * S + j.
    """
    n, c = shape[0], shape[1]
    size = 1
    for d in shape[2:]:
        size *= d
    device = draw.mu.device
    counter = (
        torch.arange(c, device=device).mul_(n * size).view(1, c, 1)
        + torch.arange(n, device=device).mul_(size).view(n, 1, 1)
        + torch.arange(size, device=device).view(1, 1, size)
    )
    h = hash32(counter, draw.key)
    table = normal_quantiles(dtype, device)
    z = table[h >> QUANTILE_BITS].reshape(shape)
    z_scale = table[h & 0xFFFF].reshape(shape)
    return z, z_scale


def apply(y: Tensor, draw: NoiseDraw) -> Tensor:
    """``y * (1 + scale_std z') + mu_c + sigma_c z`` for y (N, C, *), differentiable in y."""
    z, z_scale = standard_normals(y.shape, draw, y.dtype)
    view = (1, -1) + (1,) * (y.dim() - 2)
    mu = draw.mu.to(y.dtype).reshape(view)
    sigma = draw.sigma.to(y.dtype).reshape(view)
    return y * (1 + draw.scale_std * z_scale) + (mu + sigma * z)
