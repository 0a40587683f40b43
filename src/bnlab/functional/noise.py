"""The noise of noisy BatchNorm, drawn so that every path regenerates the same values.

One training step draws a 63-bit key from the layer's ``torch.Generator`` and nothing else.
Everything else is a pure function of that key, computed where it is used:

* per channel c, the noise's mean ``mu_c`` and standard deviation ``sigma_c`` (uniform in the
  ranges of :class:`NoiseSpec`), from the hash of counters 2c and 2c + 1 under the swapped key;
* per activation, two independent zero-mean, unit-variance values ``z`` (additive) and ``z'``
  (multiplicative): uniform on 2^16 equally spaced levels in (-sqrt(3), sqrt(3)), the high and
  low 16 bits of one hash of the activation's logical position.

So the noise costs no memory (the backward regenerates ``z'``), is deterministic for any thread
count, and is the same on the fused CPU kernels and on the torch-op path (which computes it with
tensor ops, on any device). The hash is lowbias32 (C. Wellons), one round, keyed; it is integer
arithmetic on 32-bit lanes, so the kernels generate the noise with vector instructions (a table
of normal quantiles, the previous generator, cost 1.2 ns per activation in scalar look-ups).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

LEVELS = 1 << 16
"""z takes 2^16 values: sqrt(3) (2k + 1 - 2^16) / 2^16 for k = 0 .. 2^16 - 1."""
UNIT_SCALE = 3.0**0.5 / LEVELS
"""sqrt(3) / 2^16: the spacing of z's levels is twice this."""

_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


@dataclass(frozen=True)
class NoiseSpec:
    """The time-varying noise of "noisy BatchNorm" (Santurkar et al. 2018, section 2.1).

    At every training step each channel c draws its noise distribution: a mean
    ``mu_c ~ U(-mean_range, mean_range)`` and a standard deviation
    ``sigma_c ~ U(std_low, std_high)``; every activation of every sample then receives its own
    i.i.d. perturbation ``y + (mu_c + sigma_c * z)``, and a multiplicative one
    ``* (1 + scale_std * z')`` which makes the variance of the layer's output move too. ``z``
    and ``z'`` are independent, zero-mean and unit-variance: uniform on 2^16 levels in
    (-sqrt(3), sqrt(3)) (the paper asks for "i.i.d. noise sampled from a non-zero mean and
    non-unit variance distribution"; the shape within a step is ours, chosen because the
    kernels generate it with vector instructions).
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


class NoiseDraw(NamedTuple):
    """One step's noise: the spec and the hash key (two 32-bit words, the second below 2^31)
    that fix every channel's ``mu``, ``sigma`` (:meth:`channel_params`) and every activation's
    ``z``, ``z'`` (:func:`unit_noise`). A named tuple: made on every noisy training step, where
    a frozen dataclass's construction cost a microsecond."""

    spec: NoiseSpec
    key: tuple[int, int]

    @property
    def scale_std(self) -> float:
        return self.spec.scale_std

    @property
    def packed_key(self) -> int:
        """The key as one non-negative int64 (the native glue's form)."""
        return self.key[0] | (self.key[1] << 32)

    @classmethod
    def from_packed(cls, spec: NoiseSpec, packed: int) -> NoiseDraw:
        """The draw of a key packed as :attr:`packed_key` (a non-negative int64)."""
        return cls(spec, (packed & _M32, packed >> 32))

    def channel_params(
        self, channels: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)``, each (channels,), computed in float64 then cast to ``dtype``. The
        kernels compute the same (``kernels.loops._noise_params``)."""
        spec = self.spec
        counter = torch.arange(2 * channels, device=torch.device(device), dtype=torch.int64)
        u = (hash32(counter, (self.key[1], self.key[0])).double() + 0.5) * 2.0**-32
        u_mu, u_sigma = u.view(channels, 2).unbind(1)
        mu = u_mu * (2 * spec.mean_range) + (-spec.mean_range)
        sigma = u_sigma * (spec.std_high - spec.std_low) + spec.std_low
        return mu.to(dtype), sigma.to(dtype)


_native_module: Any = None


def _native() -> Any:
    """:mod:`bnlab.functional.kernels.native`, imported on first use (it imports this module)."""
    global _native_module
    if _native_module is None:
        from bnlab.functional.kernels import native

        _native_module = native
    return _native_module


_buffers = threading.local()
"""Per thread, a one-element int64 tensor per device that draw fills (an allocation per draw
cost a microsecond, as much as the draw itself)."""


def draw(
    spec: NoiseSpec, device: torch.device, generator: torch.Generator | None = None
) -> NoiseDraw:
    """Draw one step's noise (one 63-bit key) from ``generator`` (the global RNG when None):
    the value ``torch.empty(1, dtype=torch.int64).random_(generator=generator).item()`` gives,
    taken through the native glue for a CPU generator when the glue is loaded (the tensor call
    cost about 6 us between kernel calls), else through that tensor call."""
    if device.type == "cpu" and (generator is None or generator.device.type == "cpu"):
        glue = _native().loaded()
        if glue is not None:
            bits = glue.draw_key(generator)
            return NoiseDraw.from_packed(spec, bits)
    buffers: dict[torch.device, Tensor] | None = getattr(_buffers, "by_device", None)
    if buffers is None:
        buffers = _buffers.by_device = {}
    buffer = buffers.get(device)
    if buffer is None:
        with torch.inference_mode(False):  # a normal tensor, writable in and out of that mode
            buffer = buffers[device] = torch.empty(1, device=device, dtype=torch.int64)
    bits = int(buffer.random_(generator=generator).item())
    return NoiseDraw.from_packed(spec, bits)


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2^32 without overflowing int64: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """lowbias32 (C. Wellons), keyed: ``lowbias32((counter mod 2^32) ^ key[0]) + key[1]`` mod
    2^32; int64 in, values in [0, 2^32) out. The kernels compute the same function
    (``kernels.loops._hash32``)."""
    x = (counter & _M32) ^ key[0]
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    x = x ^ (x >> 16)
    return (x + key[1]) & _M32


def levels(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """16-bit integers k -> sqrt(3) (2k + 1 - 2^16) / 2^16 in ``dtype`` (one rounding)."""
    return (bits * 2 + (1 - LEVELS)).to(dtype) * UNIT_SCALE


def unit_noise(
    shape: torch.Size, draw: NoiseDraw, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(z, z')`` of the given (N, C, *) shape (contiguous) on ``device``.

    Element (n, c, j) (j the flat spatial index) hashes counter c * N * S + n * S + j: z is
    the level of the hash's high 16 bits, z' of its low 16 bits.
    """
    n, c = shape[0], shape[1]
    size = 1
    for d in shape[2:]:
        size *= d
    device = torch.device(device)
    counter = (
        torch.arange(c, device=device).mul_(n * size).view(1, c, 1)
        + torch.arange(n, device=device).mul_(size).view(n, 1, 1)
        + torch.arange(size, device=device).view(1, 1, size)
    )
    h = hash32(counter, draw.key)
    return levels(h >> 16, dtype).reshape(shape), levels(h & 0xFFFF, dtype).reshape(shape)


def apply(y: Tensor, draw: NoiseDraw) -> Tensor:
    """``y * (1 + scale_std z') + mu_c + sigma_c z`` for y (N, C, *), differentiable in y."""
    z, z_scale = unit_noise(y.shape, draw, y.dtype, y.device)
    view = (1, -1) + (1,) * (y.dim() - 2)
    mu, sigma = draw.channel_params(y.shape[1], y.device, y.dtype)
    return y * (1 + draw.scale_std * z_scale) + (mu.reshape(view) + sigma.reshape(view) * z)
