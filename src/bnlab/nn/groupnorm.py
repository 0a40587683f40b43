"""Per-sample normalization: Group Normalization (Wu & He 2018) and Layer Normalization.

Both normalize each sample on its own, so they track no running statistics and train and eval
alike; they are torch.nn's own layers (``torch.nn.functional.group_norm``'s kernels) with the
bnlab constructor shape (``num_features`` first), so :func:`bnlab.nn.convert_norm` and the
models' ``norm=`` can put them where BatchNorm was.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_GROUPS = 32
"""Wu & He's group count; a layer with fewer channels, or a count it does not divide, takes
gcd(32, num_features)."""


class GroupNorm(nn.GroupNorm):
    """Group Normalization over an (N, C, *) input of any rank.

    The C channels of each sample are split into ``num_groups`` consecutive groups; each group is
    normalized by the mean and biased variance of its (C / G) * prod(*) values, then
    y = weight * x_hat + bias per channel (torch.nn.GroupNorm exactly). ``num_groups=None``:
    gcd(32, num_features). ``bias=False`` (with ``affine``): a weight without a bias.

    Raises ValueError when ``num_groups`` does not divide ``num_features``, and (at call) for an
    input whose channel axis does not hold ``num_features`` channels.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        name = type(self).__name__
        if num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        groups = math.gcd(DEFAULT_GROUPS, num_features) if num_groups is None else num_groups
        if groups < 1 or num_features % groups:
            raise ValueError(
                f"{name}: num_groups must divide num_features = {num_features}, got {groups}"
            )
        super().__init__(groups, num_features, eps, affine, device, dtype, bias=bias)

    @property
    def num_features(self) -> int:
        """C, as the BatchNorm layers name it (torch's GroupNorm: ``num_channels``)."""
        return self.num_channels

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"{name} expects an input of shape (N, {self.num_channels}, *), got "
                f"{tuple(input.shape)}"
            )
        return super().forward(input)


class LayerNorm(GroupNorm):
    """Layer Normalization (Ba et al. 2016) over an (N, C, *) input: each sample is normalized
    by the statistics of all its C * prod(*) values, then y = weight * x_hat + bias per channel.

    On (N, C) inputs this is ``torch.nn.LayerNorm(C)``; on (N, C, *) it is
    ``torch.nn.GroupNorm(1, C)`` (the per-channel affine of a convolutional layer, where
    ``torch.nn.LayerNorm((C, H, W))`` would learn one per value).
    """

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        """Arguments as :class:`GroupNorm` without ``num_groups`` (one group)."""
        super().__init__(num_features, 1, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
