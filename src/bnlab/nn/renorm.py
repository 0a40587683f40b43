"""Batch Renormalization (Ioffe 2017) as modules."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class BatchRenorm(BatchNorm):
    """BatchNorm corrected towards the running statistics by r (clipped to [1/r_max, r_max]) and
    d (clipped to [-d_max, d_max]), which makes small or non-i.i.d. batches usable.

    Ioffe (2017) starts training with r_max = 1, d_max = 0 (plain BatchNorm) and relaxes them to
    3 and 5; the defaults are those final values. ``r_max`` and ``d_max`` are plain attributes a
    schedule may change between steps. Other arguments as :class:`bnlab.nn.BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if r_max < 1 or d_max < 0:
            raise ValueError(f"BatchRenorm needs r_max >= 1 and d_max >= 0, got {r_max}, {d_max}")
        self.r_max = r_max
        self.d_max = d_max
        super().__init__(num_features, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _normalize(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_scale: Tensor | None,
        training: bool,
        momentum: float,
    ) -> Tensor:
        return F.batch_renorm(
            input,
            running_mean,
            running_scale,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.r_max,
            self.d_max,
            self.process_group,
            self.sync_stats,
        )


class BatchRenorm1d(_Dims1d, BatchRenorm):
    """Batch Renormalization for (N, C) or (N, C, L) inputs."""


class BatchRenorm2d(_Dims2d, BatchRenorm):
    """Batch Renormalization for (N, C, H, W) inputs."""


class BatchRenorm3d(_Dims3d, BatchRenorm):
    """Batch Renormalization for (N, C, D, H, W) inputs."""
