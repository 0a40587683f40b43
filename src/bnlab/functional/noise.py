"""The noise of noisy BatchNorm (Algorithm 1), drawn so that every path regenerates it.

One training step has one 63-bit key and nothing else: a noisy layer's key for its step t is
:func:`step_key` of the layer's base key (from its seed, drawn once) and t, integer arithmetic
that runs on Python ints in eager mode and on tensors under ``torch.compile`` with the same
result; the functional API draws a key from a ``torch.Generator`` (:func:`draw`).
Everything else is a pure function of that key, computed where it is used:

* per unit (channel) c, Algorithm 1's ``mu_t ~ U(-n_mu, n_mu)`` and ``sigma_t ~ U(1, n_sigma)``,
  from the hash of counters 2c and 2c + 1 under the swapped key;
* per activation, a uniform ``u`` on (-1, 1) (the high 16 bits of the hash h of the
  activation's logical position, on 2^16 equally spaced levels) and a standard normal ``z``
  (:func:`normals`: from 48 bits, h's low 16 and the 32 of a second hash, of the counter with
  its top bit flipped, read as four 12-bit uniforms whose sum a fixed odd polynomial maps to
  N(0, 1): integer and multiply-add work only, so the kernels make it in vector lanes without
  a table look-up); then ``m = mu_t + r_mu u ~ U(mu_t - r_mu, mu_t + r_mu)`` and
  ``s = sigma_t + r_sigma z ~ N(sigma_t, r_sigma)``, and the activation a becomes ``s a + m``.

So the noise is deterministic for any thread count, and is the same on the fused CPU kernels,
on the torch-op path (which computes it with tensor ops, on any device) and in the float64
reference (``reference.noise_draws``). The hash is lowbias32 (C. Wellons), one round, keyed;
it is integer arithmetic on 32-bit lanes, so the kernels generate it with vector instructions.
Where a gradient is wanted the fused kernels' forward keeps s (one value per activation, as
dropout keeps its mask) for the backward, which reads it (:func:`multipliers` computes the
same s with tensor ops).

How normal z is (:data:`NORMAL_COEFFICIENTS`, checked in ``tests/test_noise.py`` on the exact
distribution, all 16381 values of the sum with their probabilities): mean 0 exactly (odd
polynomial, symmetric sum), variance 1 - 1e-6, kurtosis 3 - 7e-5, largest distance between its
CDF and the normal's 2.4e-4 (a test needs tens of millions of draws to see it), P(|z| > 3)
0.00268 (normal: 0.00270), P(|z| > 4) 6.5e-5 (6.3e-5), values within +-5.18. It replaced an
exact look-up (Phi^-1 at 2^16 equiprobable levels, within 7.6e-6 in CDF but only to +-4.33),
a vector gather from a 256 KiB table: with it noisy BatchNorm's channels-last forward cost
about 1.0 ns per value more than BatchNorm's, with this polynomial 0.5 (one thread; the
README's benchmark section).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

LEVELS = 1 << 16
"""u takes 2^16 values: (2k + 1 - 2^16) / 2^16 for k = 0 .. 2^16 - 1."""
UNIT_SCALE = 1.0 / LEVELS
"""1 / 2^16: the spacing of u's levels is twice this."""

_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B

TOP_BIT = 1 << 31
"""z's second hash is of the counter XOR this (the counter plus 2^31, mod 2^32): for fewer than
2^31 activations no other activation's counter."""
NORMAL_COEFFICIENTS = (
    1.6668350390281728,
    0.04817025527518963,
    0.027934047585635034,
    -0.01692257687815148,
    0.005337823409600361,
)
"""z = w (c0 + w^2 (c1 + w^2 (c2 + w^2 (c3 + w^2 c4)))) with w = (a + b + c + d - 8190) / 4096
the centred sum of four uniform 12-bit integers a, b, c, d (the Irwin-Hall shape): the
least-squares fit, weighted by probability, of Phi^-1 at the sum's mid-CDF points."""
NORMAL_CENTRE = 8190
"""The mean of the sum of four uniform 12-bit integers, 4 (2^12 - 1) / 2."""


@dataclass(frozen=True)
class NoiseSpec:
    """The constants of "noisy" BatchNorm (Santurkar et al. 2018, appendix A.2.1, Algorithm 1).

    At every training step each unit (channel) j draws ``mu_t ~ U(-n_mu, n_mu)`` and
    ``sigma_t ~ U(1, n_sigma)``; then every activation a of every sample (and spatial position)
    draws ``m ~ U(mu_t - r_mu, mu_t + r_mu)`` and ``s ~ N(sigma_t, r_sigma)`` (``r_sigma`` is a
    standard deviation) and becomes ``s * a + m``. The defaults are the paper's: n_mu = 0.5,
    n_sigma = 1.25, r_mu = r_sigma = 0.1.
    """

    n_mu: float = 0.5
    n_sigma: float = 1.25
    r_mu: float = 0.1
    r_sigma: float = 0.1

    def __post_init__(self) -> None:
        if not (self.n_mu >= 0 and self.n_sigma >= 1 and self.r_mu >= 0 and self.r_sigma >= 0):
            raise ValueError(
                "NoiseSpec needs n_mu >= 0, n_sigma >= 1, r_mu >= 0 and r_sigma >= 0, got "
                f"n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, "
                f"r_sigma={self.r_sigma}"
            )

    @property
    def constants(self) -> tuple[float, float, float, float]:
        """(n_mu, n_sigma, r_mu, r_sigma): the kernels' noise configuration."""
        return (self.n_mu, self.n_sigma, self.r_mu, self.r_sigma)


class NoiseDraw(NamedTuple):
    """One step's noise: the spec and the hash key (two 32-bit words, the second below 2^31)
    that fix every unit's ``mu_t``, ``sigma_t`` (:meth:`channel_params`) and every activation's
    ``u``, ``z`` (:func:`unit_noise`). A named tuple: made on every noisy training step, where
    a frozen dataclass's construction cost a microsecond. The words are Python ints, or int64
    tensors under ``torch.compile`` (then only the torch-op path reads them)."""

    spec: NoiseSpec
    key: tuple[Word, Word]

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
        """``(mu_t, sigma_t)``, each (channels,), computed in float64 then cast to ``dtype``.
        The kernels compute the same (``kernels.loops.noise_draws._noise_params``)."""
        spec = self.spec
        counter = torch.arange(2 * channels, device=torch.device(device), dtype=torch.int64)
        u = (hash32(counter, (self.key[1], self.key[0])).double() + 0.5) * 2.0**-32
        u_mu, u_sigma = u.view(channels, 2).unbind(1)
        mu = u_mu * (2 * spec.n_mu) + (-spec.n_mu)
        sigma = u_sigma * (spec.n_sigma - 1.0) + 1.0
        return mu.to(dtype), sigma.to(dtype)


_key_source: Any = None
"""Set by :mod:`bnlab.functional.kernels.native` (:func:`use_key_source`): a function of the
generator that returns a key drawn by the native glue, or None when the glue is not loaded.
This module imports nothing of the kernels (they import it)."""


def use_key_source(source: Any) -> None:
    """Register the native glue's key drawer (see :data:`_key_source`)."""
    global _key_source
    _key_source = source


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
        packed = None if _key_source is None else _key_source(generator)
        if packed is not None:
            return NoiseDraw.from_packed(spec, packed)
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


def hash32(counter: Any, key: tuple[Word, Word]) -> Any:
    """lowbias32 (C. Wellons), keyed: ``lowbias32((counter mod 2^32) ^ key[0]) + key[1]`` mod
    2^32; int64 in (tensors or Python ints), values in [0, 2^32) out. The kernels compute the
    same function (``kernels.loops.noise_draws._hash32``)."""
    x = (counter & _M32) ^ key[0]
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    x = x ^ (x >> 16)
    return (x + key[1]) & _M32


Word = Any
"""A 32-bit word: a Python int, or an int64 tensor holding one (under ``torch.compile``)."""


def step_key(base: tuple[Word, Word], step: Word) -> tuple[Word, Word]:
    """The key of step ``step`` from a layer's ``base`` key: ``(hash32(2 step, base),
    hash32(2 step + 1, base) mod 2^31)``, as Python ints when every argument is an int, else as
    int64 tensors (the same values)."""
    return hash32(step * 2, base), hash32(step * 2 + 1, base) & 0x7FFFFFFF


def seed_key(seed: int) -> tuple[int, int]:
    """A layer's base key from an integer seed (any int: taken mod 2^63)."""
    seed &= (1 << 63) - 1
    return step_key((seed & _M32, seed >> 32), 0)


def levels(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """16-bit integers k -> (2k + 1 - 2^16) / 2^16 in ``dtype`` (one rounding): uniform on
    (-1, 1)."""
    return (bits * 2 + (1 - LEVELS)).to(dtype) * UNIT_SCALE


def normals(low: Tensor, high: Tensor, dtype: torch.dtype) -> Tensor:
    """Standard normal z in ``dtype`` from 48 bits: ``low`` the first hash's low 16 bits and
    ``high`` the second hash's 32 (int64 tensors). The 48-bit number (low << 32) | high is read
    as four 12-bit digits, whose sum a fixed odd polynomial maps to N(0, 1) (see the module
    docstring). Computed in float32 for float16 and bfloat16 (then rounded), else in
    ``dtype``, in the order the kernels use."""
    a = high & 0xFFF
    b = (high >> 12) & 0xFFF
    c = (high >> 24) | ((low & 0xF) << 8)
    d = (low >> 4) & 0xFFF
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w = (a + b + c + d - NORMAL_CENTRE).to(work) * (1.0 / 4096)
    w2 = w * w
    c0, c1, c2, c3, c4 = NORMAL_COEFFICIENTS
    z = w * (c0 + w2 * (c1 + w2 * (c2 + w2 * (c3 + w2 * c4))))
    return z.to(dtype)


def unit_noise(
    shape: torch.Size, draw: NoiseDraw, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(u, z)`` of the given (N, C, *) shape (contiguous) on ``device``: u uniform on (-1, 1),
    z standard normal (see the module docstring).

    Element (n, c, j) (j the flat spatial index) hashes counter c * N * S + n * S + j: u is
    the level of the hash's high 16 bits, z (:func:`normals`) comes from its low 16 bits and
    the hash of the counter XOR 2^31.
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
    z = normals(h & 0xFFFF, hash32(counter ^ TOP_BIT, draw.key), dtype)
    return levels(h >> 16, dtype).reshape(shape), z.reshape(shape)


def multipliers(
    shape: torch.Size, draw: NoiseDraw, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Tensor:
    """Algorithm 1's multipliers ``s = sigma_t + r_sigma z`` of every activation of the given
    (N, C, *) shape (contiguous), as :func:`apply` multiplies by them."""
    _, z = unit_noise(shape, draw, dtype, device)
    view = (1, -1) + (1,) * (len(shape) - 2)
    _, sigma = draw.channel_params(shape[1], device, dtype)
    return sigma.reshape(view) + draw.spec.r_sigma * z


def apply(y: Tensor, draw: NoiseDraw) -> Tensor:
    """Algorithm 1 on y (N, C, *): ``s * y + m`` with ``s = sigma_t + r_sigma z`` and
    ``m = mu_t + r_mu u``; differentiable in y."""
    u, z = unit_noise(y.shape, draw, y.dtype, y.device)
    view = (1, -1) + (1,) * (y.dim() - 2)
    mu, sigma = draw.channel_params(y.shape[1], y.device, y.dtype)
    spec = draw.spec
    return y * (sigma.reshape(view) + spec.r_sigma * z) + (mu.reshape(view) + spec.r_mu * u)
