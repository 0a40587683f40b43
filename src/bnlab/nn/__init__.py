"""Normalization layers: drop-in ``BatchNorm1d/2d/3d`` and the variants of the paper and beyond."""

from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import NORM_KINDS, convert_norm, is_norm_layer, norm_layer
from bnlab.nn.ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.groupnorm import GroupNorm, LayerNorm
from bnlab.nn.lp import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from bnlab.nn.noisy import (
    NoisyBatchNorm,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyBatchNorm3d,
    frozen_noise,
)
from bnlab.nn.renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnlab.nn.variants import (
    VARIANTS,
    Arm,
    NormKind,
    Statistics,
    arms,
    colors,
    labels,
    of_arm,
    register,
    unregister,
    variant,
)

__all__ = [
    "NORM_KINDS",
    "VARIANTS",
    "Arm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "LpBatchNorm",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "LpBatchNorm3d",
    "NoisyBatchNorm",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "NormKind",
    "Statistics",
    "arms",
    "colors",
    "convert_norm",
    "frozen_noise",
    "is_norm_layer",
    "labels",
    "norm_layer",
    "of_arm",
    "register",
    "unregister",
    "variant",
]
