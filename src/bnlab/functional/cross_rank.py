"""Differentiable collectives for cross-process normalization statistics.

Statistics computed from all ranks must pass gradients back to every rank's input: if
``S = sum_r s_r`` is the same on all ranks and each rank's loss depends on it, then
``dL/ds_r = sum_r' dL_r'/dS``, an all-reduce of the incoming gradients. These two
``autograd.Function`` s implement exactly that on any backend (gloo included, which lacks
reduce-scatter), so the norm layers can write their statistics as ordinary tensor code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose for builds without distributed


def resolve_group(process_group: ProcessGroup | None, enabled: bool = True) -> ProcessGroup | None:
    """The group to reduce statistics over, or None for purely local statistics.

    With ``enabled`` and torch.distributed initialized, the default group is used when no group is
    passed; a world of one process is treated as local.
    """
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return None
    return group


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def all_reduce_sum(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum over ranks, differentiable; the identity when ``group`` is None."""
    if group is None:
        return tensor
    result: Tensor = _AllReduceSum.apply(tensor, group)
    return result


def all_gather_stack(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack every rank's ``tensor`` along a new leading axis, differentiable."""
    if group is None:
        return tensor.unsqueeze(0)
    result: Tensor = _AllGather.apply(tensor, group)
    return result


def global_count(local_count: int, device: torch.device, group: ProcessGroup | None) -> int:
    """Number of values per channel over all ranks (per-rank batches may differ in size)."""
    if group is None:
        return local_count
    t = torch.tensor([local_count], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())
