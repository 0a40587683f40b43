"""The torch-op path: normalization written as differentiable tensor formulas.

This path serves every device and dtype (CUDA, fp16/bf16 with float32 accumulation) and every
cross-process setting; autograd derives its backward. ``bnlab.functional`` dispatches to fused
CPU kernels where they apply and to these formulas everywhere else, so the two must agree.

The statistics are two-pass (mean first, then the spread of the centred values), which keeps a
channel with mean 1e4 and unit variance accurate in float32 where E[x^2] - E[x]^2 would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab.functional import noise
from bnlab.functional.cross_rank import (
    ProcessGroup,
    all_gather_stack,
    all_reduce_sum,
    global_count,
)
from bnlab.functional.noise import NoiseDraw

LOW_PRECISION = (torch.float16, torch.bfloat16)


class BatchStats(NamedTuple):
    """Per-channel statistics of one normalization, all shape (C,) in the compute dtype."""

    mean: Tensor
    scale: Tensor
    """The divisor s: sqrt(var + eps) for BN and p = 2, D_p + eps for p = 1 and inf."""
    var: Tensor
    """The spread: the biased variance (p = 2) or D_p (p = 1, inf) of x - mean, or for lp's
    un-centred form the mean square (p = 2) or D_p (p = 1, inf) of x itself."""
    n: int
    """Values per channel over all ranks."""
    centered: Tensor
    """x - mean, computed without the rounding of a large mean (see :func:`batch_stats`)."""


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp16/bf16 inputs are normalized in float32 (their statistics would overflow or round)."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) vector to broadcast against x of shape (N, C, *)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def group_counts(n: int, v: int, per_sample: int) -> tuple[int, ...]:
    """Values per channel in each group of ``v`` consecutive samples of ``n`` (the last group
    possibly smaller), ``per_sample`` values per sample and channel."""
    return tuple(min(v, n - start) * per_sample for start in range(0, n, v))


def check_batch_size(count: int, x: Tensor) -> None:
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def batch_stats(
    x: Tensor,
    eps: float,
    p: float = 2.0,
    group: ProcessGroup | None = None,
    from_centered: bool = True,
) -> BatchStats:
    """Differentiable per-channel statistics of x (N, C, *), over all ranks of ``group``;
    ``from_centered=False``: the spread of x itself (lp BatchNorm in the paper's form), not of
    x - mean.

    The data are first shifted by one of their own values per channel (any value near the data
    works; it cancels exactly): x - shift is exact in floating point for values within a factor
    of two of the shift (Sterbenz), so the mean of the shifted data is small and precise, and
    ``centered`` = (x - shift) - mean_shifted keeps full relative accuracy even for a channel
    with mean 1e4 and unit variance in float32, where x - mean would carry the rounding of a
    1e4-sized mean.
    """
    dims = reduce_dims(x)
    n = global_count(x.numel() // x.shape[1], x.device, group)
    check_batch_size(n, x)
    # The first sample's first value per channel; the same shift on every rank (rank 0's).
    shift = x.detach()[0].reshape(x.shape[1], -1)[:, 0].clone()
    if group is not None:
        dist.broadcast(shift, src=dist.get_global_rank(group, 0), group=group)
    shifted = x - channel_view(shift, x)
    mean_shifted = all_reduce_sum(shifted.sum(dims), group) / n
    centered = shifted - channel_view(mean_shifted, x)
    mean = shift + mean_shifted
    if p == 2:
        var = all_reduce_sum((centered * centered).sum(dims), group) / n
        if not from_centered:  # the mean square, E[x^2] = var + mean^2
            var = var + mean * mean
        return BatchStats(mean, torch.sqrt(var + eps), var, n, centered)
    values = centered if from_centered else x
    if p == 1:
        spread = all_reduce_sum(values.abs().sum(dims), group) / n
    elif p == math.inf:
        spread = all_gather_stack(values.abs().amax(dims), group).amax(0)
    else:
        raise ValueError(f"p must be one of 1, 2, inf, got {p}")
    return BatchStats(mean, spread + eps, spread, n, centered)


def affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        x_hat = x_hat * channel_view(weight.to(x_hat.dtype), x_hat)
    if bias is not None:
        x_hat = x_hat + channel_view(bias.to(x_hat.dtype), x_hat)
    return x_hat


def normalize(
    x: Tensor, mean: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = weight * (x - mean) / scale + bias, per channel."""
    return affine((x - channel_view(mean, x)) / channel_view(scale, x), weight, bias)


def update_running(running: Tensor | None, value: Tensor, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * value, in place, outside autograd."""
    if running is None:
        return
    with torch.no_grad():
        running.lerp_(value.detach().to(running.dtype), momentum)


def unbiased(var: Tensor, count: int | Tensor) -> Tensor:
    return var * (count / (count - 1))


@dataclass(frozen=True)
class Renorm:
    """Batch Renormalization's inputs: the running statistics before this step's update."""

    running_mean: Tensor
    running_var: Tensor
    r_max: float
    d_max: float


@dataclass(frozen=True)
class NormSpec:
    """What a training-mode normalization computes, on either path.

    ``p``: the lp statistic (1, 2, inf); ``centered``: the spread of x - mean (BatchNorm; lp's
    centred form) or, False, of x itself (lp BatchNorm as the paper defines it);
    ``virtual_batch_size``: normalize each chunk of that many samples on its own (Ghost
    BatchNorm; None: the whole batch); ``renorm``: Batch Renormalization's correction;
    ``noise``: noisy BatchNorm's noise, applied after the affine.
    """

    eps: float
    p: float = 2.0
    virtual_batch_size: int | None = None
    renorm: Renorm | None = None
    noise: NoiseDraw | None = None
    centered: bool = True

    def __post_init__(self) -> None:
        if self.noise is not None and (self.p != 2.0 or not self.centered):
            raise ValueError(
                f"NormSpec: noise goes with BatchNorm's statistics (p = 2), got p = {self.p}"
                + ("" if self.centered else " un-centred")
            )

    @property
    def kernel_p(self) -> float:
        """p as the kernels take it: negative for the un-centred form (``centered=False``)."""
        return self.p if self.centered else -self.p


class GroupStats(NamedTuple):
    """Per-(group, channel) statistics of one training normalization; a group is a virtual
    batch (one group for BatchNorm). Detached; float64 on the kernel path, else the compute
    dtype."""

    mean: Tensor
    """Shape (G, C)."""
    spread: Tensor
    """Shape (G, C): the spread, as :attr:`BatchStats.var`."""
    counts: tuple[int, ...]
    """Values per channel in each group (over all ranks)."""


class RunningUpdate(NamedTuple):
    """Running buffers a training normalization moves towards its batch statistics."""

    mean: Tensor | None
    second: Tensor | None
    """running_var (``kind`` VARIANCE) or running_scale (``kind`` SCALE)."""
    momentum: float
    kind: int


VARIANCE = 1
"""Track the unbiased variance (averaged over the groups of Ghost BatchNorm)."""
SCALE = 2
"""Track the divisor s itself (lp BatchNorm)."""


def update_from_stats(update: RunningUpdate, stats: GroupStats, spec: NormSpec) -> None:
    """Move the running buffers by ``update.momentum`` towards the statistics (in place)."""
    one = len(stats.counts) == 1
    if update.kind == VARIANCE and one:
        second = unbiased(stats.spread[0], stats.counts[0])
    elif update.kind == VARIANCE:
        counts = torch.tensor(stats.counts, dtype=stats.spread.dtype, device=stats.spread.device)
        second = unbiased(stats.spread, counts.view(-1, 1)).mean(0)
    else:
        spread = stats.spread[0] if one else stats.spread.mean(0)
        second = torch.sqrt(spread + spec.eps) if spec.p == 2 else spread + spec.eps
    update_running(update.mean, stats.mean[0] if one else stats.mean.mean(0), update.momentum)
    update_running(update.second, second, update.momentum)


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: NormSpec,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, GroupStats]:
    """Training-mode normalization of x (N, C, *) in compute precision, as tensor formulas:
    ``(y, stats)``, differentiable in x, weight and bias (r and d of renorm are constants)."""
    chunks = [x] if spec.virtual_batch_size is None else torch.split(x, spec.virtual_batch_size)
    x_hats, means, spreads, counts = [], [], [], []
    for chunk in chunks:
        stats = batch_stats(
            chunk, spec.eps, spec.p, group if len(chunks) == 1 else None, spec.centered
        )
        x_hat = stats.centered / channel_view(stats.scale, chunk)
        if spec.renorm is not None:
            r, d = renorm_correction(stats, spec.renorm, spec.eps)
            x_hat = x_hat * channel_view(r, chunk) + channel_view(d, chunk)
        x_hats.append(x_hat)
        means.append(stats.mean.detach())
        spreads.append(stats.var.detach())
        counts.append(stats.n)
    x_hat = x_hats[0] if len(x_hats) == 1 else torch.cat(x_hats)
    y = affine(x_hat, weight, bias)
    if spec.noise is not None:
        y = noise.apply(y, spec.noise)
    if x.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous(
        memory_format=torch.channels_last
    ):
        y = y.contiguous(memory_format=torch.channels_last)
    return y, GroupStats(torch.stack(means), torch.stack(spreads), tuple(counts))


def renorm_correction(stats: BatchStats, renorm: Renorm, eps: float) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's r and d (Ioffe 2017), held constant in the backward pass.

    Under ``torch.compile`` they come from the operator ``bnlab::renorm_correction``: AOTAutograd's
    min-cut partitioner otherwise recomputes these cheap formulas in the backward graph from the
    running buffers, which the step's update has changed in place by then (compiled weight
    gradients 0.7-4% off). An operator is saved for the backward, never recomputed."""
    with torch.no_grad():
        scale, mean = stats.scale.detach(), stats.mean.detach()
        args = (
            scale,
            mean,
            renorm.running_mean,
            renorm.running_var,
            eps,
            renorm.r_max,
            renorm.d_max,
        )
        if torch.compiler.is_compiling():
            found: tuple[Tensor, Tensor] = _renorm_correction_op(*args)
            return found
        return _renorm_correction(*args)


def _renorm_correction(
    scale: Tensor,
    mean: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor]:
    """r = clip(s_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max) with
    sigma = sqrt(running_var + eps), in the dtype of the batch statistics."""
    sigma = torch.sqrt(running_var.to(scale.dtype) + eps)
    r = (scale / sigma).clamp(1.0 / r_max, r_max)
    d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
    return r, d


_renorm_correction_op = torch.library.custom_op("bnlab::renorm_correction", mutates_args=())(
    _renorm_correction
)


@_renorm_correction_op.register_fake
def _renorm_correction_fake(scale: Tensor, mean: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    return torch.empty_like(scale), torch.empty_like(mean)
