"""lp Batch Normalization (Santurkar et al. 2018, section 3.3) as modules."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class LpBatchNorm(BatchNorm):
    """Centre each channel by its mini-batch mean, then divide by its lp spread.

    ``p=1`` divides by the mean absolute deviation + eps, ``p=inf`` by the max absolute deviation
    + eps, ``p=2`` by sqrt(var + eps) (BatchNorm itself). The buffer ``running_scale`` tracks the
    divisor, so eval mode is y = weight * (x - running_mean) / running_scale + bias. Other
    arguments as :class:`bnlab.nn.BatchNorm`.
    """

    _scale_buffer = "running_scale"

    def __init__(self, num_features: int, p: float = 1, *args: Any, **kwargs: Any) -> None:
        p = float(p)
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"{type(self).__name__}: p must be 1, 2 or inf, got {p}")
        self.p = p
        super().__init__(num_features, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p:g}"

    def _normalize(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_scale: Tensor | None,
        training: bool,
        momentum: float,
    ) -> Tensor:
        return F.lp_batch_norm(
            input,
            running_mean,
            running_scale,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.p,
            self.process_group,
            self.sync_stats,
        )


class LpBatchNorm1d(_Dims1d, LpBatchNorm):
    """lp BatchNorm for (N, C) or (N, C, L) inputs."""


class LpBatchNorm2d(_Dims2d, LpBatchNorm):
    """lp BatchNorm for (N, C, H, W) inputs."""


class LpBatchNorm3d(_Dims3d, LpBatchNorm):
    """lp BatchNorm for (N, C, D, H, W) inputs."""
