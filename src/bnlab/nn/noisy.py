"""Noisy BatchNorm (Santurkar et al. 2018, section 2.1 and appendix A.2.1, Algorithm 1).

The paper perturbs each BatchNorm output a (per unit j and sample i; for convolutions every
spatial position too) at every training step t with noise whose distribution itself changes
every step, to show that a network trains well even when its layer inputs shift far more than
without BatchNorm. Algorithm 1, with the paper's constants as defaults:

    per unit j:                mu_t ~ U(-n_mu, n_mu),      sigma_t ~ U(1, n_sigma)
    per sample i and unit j:   m ~ U(mu_t - r_mu, mu_t + r_mu),   s ~ N(sigma_t, r_sigma)
                               a <- s * a + m

n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1; ``r_sigma`` is the standard deviation of s.

Step t's noise is a function of one key, ``step_key(base, t)``: the layer's base key
(``noise_key``, from its seed or drawn once) and its step counter (``noise_steps``), both
buffers, so a state_dict holds where the noise stream is and a resumed run continues it, and
``torch.compile`` traces the key as integer tensor arithmetic (no generator, no graph break).
mu_t, sigma_t and every m, s are functions of that key and the unit and position
(:mod:`bnlab.functional.noise`), applied inside the normalization. Memory: in training with
a gradient wanted, the layer keeps its multipliers s for the backward, one value per activation
(as dropout keeps its mask; the torch-op path keeps what autograd saves for ``s * a``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.functional.kernels import native
from bnlab.functional.noise import seed_key, step_key
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class NoisyBatchNorm(BatchNorm):
    """BatchNorm whose output receives Algorithm 1's time-varying noise in training (off in
    eval).

    Noise constants ``n_mu``, ``n_sigma``, ``r_mu``, ``r_sigma`` (``r_sigma`` a standard
    deviation) as :class:`bnlab.functional.NoiseSpec`, the paper's values by default.
    Reproducibility: the base key comes from ``seed``, else is drawn once, at construction,
    from ``generator`` or (with neither) the global RNG; each training step then advances the
    ``noise_steps`` buffer (eval and frozen noise do not). Other arguments as
    :class:`bnlab.nn.BatchNorm`. Raises ValueError for constants out of range (n_mu, r_mu,
    r_sigma >= 0, n_sigma >= 1) or for both a seed and a generator.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        n_mu: float = F.NoiseSpec.n_mu,
        n_sigma: float = F.NoiseSpec.n_sigma,
        r_mu: float = F.NoiseSpec.r_mu,
        r_sigma: float = F.NoiseSpec.r_sigma,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.noise = F.NoiseSpec(n_mu, n_sigma, r_mu, r_sigma)
        if seed is not None and generator is not None:
            raise ValueError("NoisyBatchNorm takes a seed or a generator, not both")
        self.seed = seed
        if seed is not None:
            base = seed_key(seed)
        else:
            base = F.draw_noise(torch.empty(0, device=device), self.noise, generator).key
        self.register_buffer("noise_key", torch.tensor(base, dtype=torch.int64, device=device))
        self.register_buffer("noise_steps", torch.tensor(0, dtype=torch.int64, device=device))
        self.noise_key: Tensor
        self.noise_steps: Tensor
        self._frozen: dict[tuple[Any, ...], F.NoiseDraw] | None = None

    def extra_repr(self) -> str:
        n = self.noise
        return (
            f"{super().extra_repr()}, n_mu={n.n_mu}, n_sigma={n.n_sigma}, r_mu={n.r_mu}, "
            f"r_sigma={n.r_sigma}"
        )

    def _next_draw(self) -> F.NoiseDraw:
        """This step's key, and the step counter advanced: Python ints in eager mode, tensors
        under torch.compile (the same values)."""
        if torch.compiler.is_compiling():
            key = step_key((self.noise_key[0], self.noise_key[1]), self.noise_steps)
            with torch.no_grad():
                self.noise_steps.add_(1)
            return F.NoiseDraw(self.noise, key)
        # Eager: the buffers read past Module.__getattr__ (a microsecond each on a small layer)
        buffers = self._buffers
        base_tensor, steps = buffers["noise_key"], buffers["noise_steps"]
        assert base_tensor is not None and steps is not None
        glue = native.loaded()
        if glue is not None:  # the same key and counter: this draw 1.1 us instead of 5
            packed = glue.next_noise_key(base_tensor, steps)
            if packed >= 0:
                return F.NoiseDraw.from_packed(self.noise, packed)
        base = base_tensor.tolist()
        step = int(steps)
        steps.add_(1)  # a buffer: no autograd history to keep out
        return F.NoiseDraw(self.noise, step_key((base[0], base[1]), step))

    def _noise(self, input: Tensor) -> F.NoiseDraw:
        if self._frozen is None:
            return self._next_draw()
        key = (tuple(input.shape), input.device, input.dtype)
        noise = self._frozen.get(key)
        if noise is None:
            noise = self._frozen[key] = self._next_draw()
        return noise

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> None:
        super()._upgrade_state_dict(state_dict, prefix, version)
        # a state_dict from before the counter (its generator in _extra_state): the noise stream
        # restarts from this layer's own base key
        state_dict.pop(prefix + "_extra_state", None)
        for name in ("noise_key", "noise_steps"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())


class NoisyBatchNorm1d(_Dims1d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C) or (N, C, L) inputs."""


class NoisyBatchNorm2d(_Dims2d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C, H, W) inputs."""


class NoisyBatchNorm3d(_Dims3d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C, D, H, W) inputs."""


@contextmanager
def frozen_noise(model: nn.Module) -> Iterator[None]:
    """Within the block every noisy layer of ``model`` draws its noise once (per input shape) and
    reuses it, so repeated evaluations see one fixed function; afterwards the layers' step
    counters are restored, as if the block had never drawn."""
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    saved = [(m._frozen, m.noise_steps.clone()) for m in layers]
    for m in layers:
        m._frozen = {}
    try:
        yield
    finally:
        for m, (frozen, steps) in zip(layers, saved, strict=True):
            m._frozen = frozen
            with torch.no_grad():
                m.noise_steps.copy_(steps)
