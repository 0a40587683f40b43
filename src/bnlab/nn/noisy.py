"""Noisy BatchNorm (Santurkar et al. 2018, section 2.1): BN followed by time-varying noise.

The paper perturbs "each activation for each sample in the batch using i.i.d. noise sampled from
a non-zero mean and non-unit variance distribution", a distribution that "changes at each time
step", to show that a network trains well even when its layer inputs shift far more than
without BatchNorm. The paper's exact noise scales and shape could not be found in the sources
available to us, so the defaults of :class:`bnlab.functional.NoiseSpec` were chosen to produce a
shift that is large next to the unit-variance BN output while the network still trains: per step
and channel a mean drawn from U(-0.5, 0.5) and a standard deviation from U(0.5, 1.5) for the
additive noise, and a multiplicative factor 1 + 0.25 z' per activation, with z, z' zero-mean,
unit-variance and uniform (on 2^16 levels).

Each step draws one key from the layer's generator; the per-channel mean and standard deviation
and the per-activation z, z' are functions of that key and the channel and position
(:mod:`bnlab.functional.noise`), applied inside the normalization (the fused CPU kernels
regenerate z' in the backward instead of storing it).
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
    """BatchNorm whose output receives time-varying noise in training (off in eval).

    Noise arguments (``mean_range``, ``std_low``, ``std_high``, ``scale_std``) are those of
    :class:`bnlab.functional.NoiseSpec`. Reproducibility: pass ``seed`` (the layer keeps its own
    ``torch.Generator``, saved in the state_dict's extra state so a resumed run draws the same
    noise) or a ``generator``; with neither, the global RNG is used. Other arguments as
    :class:`bnlab.nn.BatchNorm`.
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
        mean_range: float = F.NoiseSpec.mean_range,
        std_low: float = F.NoiseSpec.std_low,
        std_high: float = F.NoiseSpec.std_high,
        scale_std: float = F.NoiseSpec.scale_std,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.noise = F.NoiseSpec(mean_range, std_low, std_high, scale_std)
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
            f"{super().extra_repr()}, mean_range={n.mean_range}, std=[{n.std_low}, {n.std_high}], "
            f"scale_std={n.scale_std}"
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
