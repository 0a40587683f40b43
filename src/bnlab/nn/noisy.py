"""Noisy BatchNorm (Santurkar et al. 2018, section 2.1 and appendix A.2.1, Algorithm 1).

The paper perturbs each BatchNorm output a (per unit j and sample i; for convolutions every
spatial position too) at every training step t with noise whose distribution itself changes
every step, to show that a network trains well even when its layer inputs shift far more than
without BatchNorm. Algorithm 1, with the paper's constants as defaults:

    per unit j:                mu_t ~ U(-n_mu, n_mu),      sigma_t ~ U(1, n_sigma)
    per sample i and unit j:   m ~ U(mu_t - r_mu, mu_t + r_mu),   s ~ N(sigma_t, r_sigma)
                               a <- s * a + m

n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1; ``r_sigma`` is the standard deviation of s.

Each step draws one key from the layer's generator; mu_t, sigma_t and every m, s are functions
of that key and the unit and position (:mod:`bnlab.functional.noise`), applied inside the
normalization (the fused CPU kernels regenerate s in the backward instead of storing it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class NoisyBatchNorm(BatchNorm):
    """BatchNorm whose output receives Algorithm 1's time-varying noise in training (off in
    eval).

    Noise constants ``n_mu``, ``n_sigma``, ``r_mu``, ``r_sigma`` (``r_sigma`` a standard
    deviation) as :class:`bnlab.functional.NoiseSpec`, the paper's values by default.
    Reproducibility: pass ``seed`` (the layer keeps its own ``torch.Generator``, saved in the
    state_dict's extra state so a resumed run draws the same noise) or a ``generator``; with
    neither, the global RNG is used. Other arguments as :class:`bnlab.nn.BatchNorm`. Raises
    ValueError for constants out of range (n_mu, r_mu, r_sigma >= 0, n_sigma >= 1).
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
        self.generator = generator
        if seed is not None:
            self.generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        self._frozen: dict[tuple[Any, ...], F.NoiseDraw] | None = None

    def extra_repr(self) -> str:
        n = self.noise
        return (
            f"{super().extra_repr()}, n_mu={n.n_mu}, n_sigma={n.n_sigma}, r_mu={n.r_mu}, "
            f"r_sigma={n.r_sigma}"
        )

    def _generator_for(self, x: Tensor) -> torch.Generator | None:
        if self.generator is not None and self.generator.device != x.device:
            state = self.generator.initial_seed() if self.seed is None else self.seed
            self.generator = torch.Generator(device=x.device).manual_seed(state)
        return self.generator

    def _noise(self, input: Tensor) -> F.NoiseDraw:
        if self._frozen is None:
            return F.draw_noise(input, self.noise, self._generator_for(input))
        key = (tuple(input.shape), input.device, input.dtype)
        noise = self._frozen.get(key)
        if noise is None:
            noise = self._frozen[key] = F.draw_noise(input, self.noise, self._generator_for(input))
        return noise

    def get_extra_state(self) -> Any:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["generator"])


class NoisyBatchNorm1d(_Dims1d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C) or (N, C, L) inputs."""


class NoisyBatchNorm2d(_Dims2d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C, H, W) inputs."""


class NoisyBatchNorm3d(_Dims3d, NoisyBatchNorm):
    """Noisy BatchNorm for (N, C, D, H, W) inputs."""


@contextmanager
def frozen_noise(model: nn.Module) -> Iterator[None]:
    """Within the block every noisy layer of ``model`` draws its noise once (per input shape) and
    reuses it, so repeated evaluations see one fixed function; afterwards the layers' generators
    are restored, as if the block had never drawn. The global RNG is the caller's to restore."""
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    saved = [(m._frozen, None if m.generator is None else m.generator.get_state()) for m in layers]
    for m in layers:
        m._frozen = {}
    try:
        yield
    finally:
        for m, (frozen, gen_state) in zip(layers, saved, strict=True):
            m._frozen = frozen
            if gen_state is not None and m.generator is not None:
                m.generator.set_state(gen_state)
