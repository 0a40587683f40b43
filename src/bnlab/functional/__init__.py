"""Normalization as functions: what the ``bnlab.nn`` modules call.

Each function mirrors ``torch.nn.functional.batch_norm``: the running buffers are updated in
place in training mode, ``momentum`` is the update factor (the module resolves ``None`` into a
cumulative average), and ``training=False`` normalizes with the running statistics.

The training-mode statistics and normalization go through one dispatch point,
:func:`normalize_train`, which the fast CPU kernels plug into; everything else is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnlab.functional import ops
from bnlab.functional.distributed import ProcessGroup, all_reduce_sum, resolve_group

__all__ = [
    "NoiseSpec",
    "batch_norm",
    "batch_renorm",
    "distribution_noise",
    "ghost_batch_norm",
    "lp_batch_norm",
    "normalize_train",
]


def _check_input(x: Tensor, running: Tensor | None, weight: Tensor | None, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} expects an input of shape (N, C, *), got shape {tuple(x.shape)}")
    for what, t in (("running statistics", running), ("weight", weight)):
        if t is not None and t.shape[0] != x.shape[1]:
            raise ValueError(
                f"{name} has {what} for {t.shape[0]} channels, got an input with "
                f"{x.shape[1]} channels (input shape {tuple(x.shape)})"
            )


def normalize_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    p: float = 2.0,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, ops.BatchStats]:
    """Training-mode normalization with batch statistics: ``(y, stats)`` in x's dtype.

    The dispatch point: fp16/bf16 inputs are normalized in float32 and cast back.
    """
    dtype = ops.compute_dtype(x)
    y, stats = ops.lp_train(x.to(dtype), weight, bias, eps, p, group)
    return y.to(x.dtype), stats


def _normalize_eval(
    x: Tensor, mean: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    dtype = ops.compute_dtype(x)
    return ops.normalize(x.to(dtype), mean.to(dtype), scale.to(dtype), weight, bias).to(x.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: ProcessGroup | None = None,
    sync_stats: bool = True,
) -> Tensor:
    """Batch Normalization, same semantics as ``torch.nn.functional.batch_norm``.

    Training: y = weight * (x - mu_B) / sqrt(var_B + eps) + bias over the mini-batch (over all
    ranks when torch.distributed is initialized and ``sync_stats``), and the running buffers
    move by ``momentum`` towards mu_B and the unbiased var_B. Eval: the running buffers are used.

    Raises ValueError for an input with one value per channel in training or a channel mismatch.
    """
    _check_input(input, running_mean, weight, "batch_norm")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        return _normalize_eval(input, running_mean, torch.sqrt(running_var + eps), weight, bias)
    y, stats = normalize_train(
        input, weight, bias, eps, 2.0, resolve_group(process_group, sync_stats)
    )
    ops.update_running(running_mean, stats.mean, momentum)
    ops.update_running(running_var, ops.unbiased(stats.var, stats.n), momentum)
    return y


def lp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_scale: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    p: float = 1,
    process_group: ProcessGroup | None = None,
    sync_stats: bool = True,
) -> Tensor:
    """lp Batch Normalization (Santurkar et al. 2018, section 3.3).

    Centre by the mini-batch mean, divide by s = D_p + eps, where D_p is the per-channel mean
    absolute deviation (p = 1) or max absolute deviation (p = inf), or by s = sqrt(var + eps)
    (p = 2, exactly BatchNorm). ``running_scale`` tracks s itself; eval divides by it.
    """
    p = float(p)
    if p not in (1.0, 2.0, math.inf):
        raise ValueError(f"lp_batch_norm: p must be 1, 2 or inf, got {p}")
    _check_input(input, running_mean, weight, "lp_batch_norm")
    if not training:
        if running_mean is None or running_scale is None:
            raise ValueError("lp_batch_norm in eval mode needs running_mean and running_scale")
        return _normalize_eval(input, running_mean, running_scale, weight, bias)
    y, stats = normalize_train(
        input, weight, bias, eps, p, resolve_group(process_group, sync_stats)
    )
    ops.update_running(running_mean, stats.mean, momentum)
    ops.update_running(running_scale, stats.scale, momentum)
    return y


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    process_group: ProcessGroup | None = None,
    sync_stats: bool = True,
) -> Tensor:
    """Ghost Batch Normalization (Hoffer et al. 2017): BatchNorm over virtual batches.

    The batch is split into consecutive chunks of ``virtual_batch_size`` samples (the last may be
    smaller), each normalized with its own statistics. The running buffers move towards the
    average of the chunks' means and unbiased variances (over the chunks of all ranks).
    """
    if virtual_batch_size < 2:
        raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
    _check_input(input, running_mean, weight, "ghost_batch_norm")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("ghost_batch_norm in eval mode needs running_mean and running_var")
        return _normalize_eval(input, running_mean, torch.sqrt(running_var + eps), weight, bias)
    dtype = ops.compute_dtype(input)
    y, mean_sum, var_sum, chunks = ops.ghost_train(
        input.to(dtype), weight, bias, eps, virtual_batch_size
    )
    group = resolve_group(process_group, sync_stats)
    if group is not None:
        packed = torch.cat([mean_sum, var_sum, mean_sum.new_tensor([float(chunks)])])
        packed = all_reduce_sum(packed, group)
        c = mean_sum.shape[0]
        mean_sum, var_sum, chunks = packed[:c], packed[c : 2 * c], int(packed[-1].item())
    ops.update_running(running_mean, mean_sum / chunks, momentum)
    ops.update_running(running_var, var_sum / chunks, momentum)
    return y.to(input.dtype)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    process_group: ProcessGroup | None = None,
    sync_stats: bool = True,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017).

    Training: x_hat = (x - mu_B) / sigma_B * r + d with r = clip(sigma_B / sigma, 1/r_max, r_max)
    and d = clip((mu_B - mu) / sigma, -d_max, d_max), where mu and sigma = sqrt(running_var + eps)
    are the running statistics *before* this step's update; r and d get no gradient. With
    r_max = 1 and d_max = 0 this is BatchNorm. Eval is BatchNorm's eval.
    """
    if r_max < 1 or d_max < 0:
        raise ValueError(f"batch_renorm needs r_max >= 1 and d_max >= 0, got {r_max}, {d_max}")
    _check_input(input, running_mean, weight, "batch_renorm")
    if not training or running_mean is None or running_var is None:
        return batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            process_group,
            sync_stats,
        )
    dtype = ops.compute_dtype(input)
    x = input.to(dtype)
    stats = ops.batch_stats(x, eps, 2.0, resolve_group(process_group, sync_stats))
    r, d = ops.renorm_correction(stats, running_mean, running_var, eps, r_max, d_max)
    x_hat = stats.centered * ops.channel_view(r / stats.scale, x)
    y = ops.affine(x_hat + ops.channel_view(d, x), weight, bias)
    ops.update_running(running_mean, stats.mean, momentum)
    ops.update_running(running_var, ops.unbiased(stats.var, stats.n), momentum)
    return y.to(input.dtype)


@dataclass(frozen=True)
class NoiseSpec:
    """The time-varying noise of "noisy BatchNorm" (Santurkar et al. 2018, section 2.1).

    At every training step each channel c draws its noise distribution: a mean
    ``mu_c ~ U(-mean_range, mean_range)`` and a standard deviation
    ``sigma_c ~ U(std_low, std_high)``; every activation of every sample then receives its own
    i.i.d. perturbation ``y + (mu_c + sigma_c * z)`` with ``z ~ N(0, 1)``, and a multiplicative
    one ``* (1 + scale_std * z')`` which makes the variance of the layer's output move too.
    """

    mean_range: float = 0.5
    std_low: float = 0.5
    std_high: float = 1.5
    scale_std: float = 0.25

    def __post_init__(self) -> None:
        if self.mean_range < 0 or self.std_low < 0 or self.std_high < self.std_low:
            raise ValueError(
                "NoiseSpec needs mean_range >= 0 and 0 <= std_low <= std_high, got "
                f"mean_range={self.mean_range}, std_low={self.std_low}, std_high={self.std_high}"
            )
        if self.scale_std < 0:
            raise ValueError(f"NoiseSpec needs scale_std >= 0, got {self.scale_std}")


def draw_noise(
    x: Tensor, spec: NoiseSpec, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One step's noise for x (N, C, *): ``(scale, shift)``, both of x's shape, so that the
    perturbed activation is ``x * scale + shift``."""
    c = x.shape[1]
    dtype = ops.compute_dtype(x)
    u = torch.rand(2, c, device=x.device, dtype=dtype, generator=generator)
    mu = (2 * u[0] - 1) * spec.mean_range
    sigma = spec.std_low + u[1] * (spec.std_high - spec.std_low)
    z = torch.randn((2, *x.shape), device=x.device, dtype=dtype, generator=generator)
    shift = ops.channel_view(mu, x) + ops.channel_view(sigma, x) * z[0]
    scale = 1 + spec.scale_std * z[1]
    return scale, shift


def distribution_noise(
    input: Tensor, spec: NoiseSpec, generator: torch.Generator | None = None
) -> Tensor:
    """Apply one freshly drawn step of noisy-BatchNorm noise (see :class:`NoiseSpec`)."""
    scale, shift = draw_noise(input, spec, generator)
    return (input * scale.to(input.dtype) + shift.to(input.dtype)).to(input.dtype)
