"""lp Batch Normalization (Santurkar et al. 2018, section 3.3) as modules."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class LpBatchNorm(BatchNorm):
    """lp BatchNorm (Santurkar et al. 2018, section 3.3): fix each channel's mean as BatchNorm
    does, then divide by the average lp norm of its activations "before shifting the mean".

    y = weight * (x - mu_B) / s + bias with, per channel over the batch (and spatial
    positions), s = mean|x| + eps (``p=1``), sqrt(mean x^2 + eps) (``p=2``), max|x| + eps
    (``p=inf``). ``centered=True`` takes the same norms of x - mu_B instead (mean absolute
    deviation, sqrt(var + eps): then ``p=2`` is BatchNorm itself, max absolute deviation). The
    buffer ``running_scale`` tracks the divisor s, so eval mode is
    y = weight * (x - running_mean) / running_scale + bias. Other arguments as
    :class:`bnlab.nn.BatchNorm`. Raises ValueError for p other than 1, 2, inf.
    """

    _scale_buffer = "running_scale"

    def __init__(
        self, num_features: int, p: float = 1, *args: Any, centered: bool = False, **kwargs: Any
    ) -> None:
        p = float(p)
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"{type(self).__name__}: p must be 1, 2 or inf, got {p}")
        self.p = p
        self.centered = centered
        super().__init__(num_features, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p:g}, centered={self.centered}"

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
            centered=self.centered,
        )


class LpBatchNorm1d(_Dims1d, LpBatchNorm):
    """lp BatchNorm for (N, C) or (N, C, L) inputs."""


class LpBatchNorm2d(_Dims2d, LpBatchNorm):
    """lp BatchNorm for (N, C, H, W) inputs."""


class LpBatchNorm3d(_Dims3d, LpBatchNorm):
    """lp BatchNorm for (N, C, D, H, W) inputs."""
