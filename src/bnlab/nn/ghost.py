"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017) as modules."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, _Dims1d, _Dims2d, _Dims3d


class GhostBatchNorm(BatchNorm):
    """BatchNorm whose statistics come from virtual batches of ``virtual_batch_size`` samples.

    Large batches are split into consecutive chunks normalized independently, which restores the
    regularizing noise of small batches; eval mode is BatchNorm's. Other arguments as
    :class:`bnlab.nn.BatchNorm`.
    """

    def __init__(
        self, num_features: int, virtual_batch_size: int = 32, *args: Any, **kwargs: Any
    ) -> None:
        if virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size
        super().__init__(num_features, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _normalize(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_scale: Tensor | None,
        training: bool,
        momentum: float,
    ) -> Tensor:
        return F.ghost_batch_norm(
            input,
            running_mean,
            running_scale,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.virtual_batch_size,
            self.process_group,
            self.sync_stats,
        )


class GhostBatchNorm1d(_Dims1d, GhostBatchNorm):
    """Ghost BatchNorm for (N, C) or (N, C, L) inputs."""


class GhostBatchNorm2d(_Dims2d, GhostBatchNorm):
    """Ghost BatchNorm for (N, C, H, W) inputs."""


class GhostBatchNorm3d(_Dims3d, GhostBatchNorm):
    """Ghost BatchNorm for (N, C, D, H, W) inputs."""
