"""Normalization as functions: what the ``bnlab.nn`` modules call.

Each function mirrors ``torch.nn.functional.batch_norm``: the running buffers are updated in
place in training mode, ``momentum`` is the update factor (the module resolves ``None`` into a
cumulative average), and ``training=False`` normalizes with the running statistics.

Two paths compute the same numbers: the fused CPU kernels (:mod:`bnlab.functional.kernels`,
CPU float32/float64 without cross-process statistics or torch.func transforms) and the torch-op
formulas (:mod:`bnlab.functional.ops`, everything else). :func:`normalize_train` and
:func:`_normalize_eval` are the dispatch points; :func:`use_kernels` (or the environment
variable ``BNLAB_KERNELS=0``) forces the torch-op path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast, overload

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from bnlab.functional import kernels, operators, ops
from bnlab.functional.cross_rank import ProcessGroup, all_reduce_sum, resolve_group
from bnlab.functional.noise import NoiseDraw, NoiseSpec
from bnlab.functional.noise import apply as _apply_noise
from bnlab.functional.noise import draw as _draw

__all__ = [
    "NoiseDraw",
    "NoiseSpec",
    "batch_norm",
    "batch_renorm",
    "distribution_noise",
    "draw_noise",
    "eval_with_running",
    "ghost_batch_norm",
    "kernels_enabled",
    "lp_batch_norm",
    "normalize_train",
    "use_kernels",
]

_kernels_on = os.environ.get("BNLAB_KERNELS", "1") != "0"


@contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, dispatch to the fused CPU kernels (``True``) or always to the torch-op
    path (``False``); the previous choice is restored afterwards. Not thread-local."""
    global _kernels_on
    saved = _kernels_on
    _kernels_on = enabled
    try:
        yield
    finally:
        _kernels_on = saved


def kernels_enabled() -> bool:
    """Whether eligible inputs currently go to the fused CPU kernels."""
    return _kernels_on and kernels.numba_available()


def _on_kernels(x: Tensor) -> bool:
    """Whether x goes to the fused kernels: enabled, CPU float32/float64, and no torch.func
    transform or forward-mode AD active (a numba kernel has no batching or jvp rule); under
    torch.compile only through the operators (:mod:`.operators`), never from here."""
    return (
        not torch.compiler.is_compiling()
        and _kernels_on
        and kernels.supports(x)
        and not torch._C._are_functorch_transforms_active()
        and forward_ad._current_level < 0
        and kernels.numba_available()
    )


def _check_input(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} expects an input of shape (N, C, *), got shape {tuple(x.shape)}")


@overload
def _per_channel(x: Tensor, t: Tensor, what: str, name: str) -> Tensor: ...
@overload
def _per_channel(x: Tensor, t: Tensor | None, what: str, name: str) -> Tensor | None: ...
def _per_channel(x: Tensor, t: Tensor | None, what: str, name: str) -> Tensor | None:
    """t as a (C,) tensor for x's C channels, or a ValueError naming it. torch's rule: C
    elements, any shape (a (C, 1) weight is viewed as (C,): gradients and in-place running
    updates reach the caller's tensor). The loops read C values from each such tensor."""
    if t is None:
        return None
    channels = x.shape[1]
    if t.numel() != channels:
        raise ValueError(
            f"{name}: {what} should contain {channels} elements, one per channel of the input "
            f"of shape {tuple(x.shape)}, got {t.numel()} (shape {tuple(t.shape)})"
        )
    return t if t.dim() == 1 else t.view(channels)


def _channel_tensors(
    x: Tensor,
    name: str,
    second_name: str,
    running_mean: Tensor | None,
    running_second: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The running buffers, weight and bias checked by :func:`_per_channel`."""
    c = (x.shape[1],)
    if (  # the common case first, (C,) or None each: 0.6 us, half of the general checks
        (running_mean is None or running_mean.shape == c)
        and (running_second is None or running_second.shape == c)
        and (weight is None or weight.shape == c)
        and (bias is None or bias.shape == c)
    ):
        return running_mean, running_second, weight, bias
    return (
        _per_channel(x, running_mean, "running_mean", name),
        _per_channel(x, running_second, second_name, name),
        _per_channel(x, weight, "weight", name),
        _per_channel(x, bias, "bias", name),
    )


def normalize_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: ops.NormSpec,
    group: ProcessGroup | None = None,
    update: ops.RunningUpdate | None = None,
) -> tuple[Tensor, ops.GroupStats]:
    """Training-mode normalization with batch statistics: ``(y, stats)``, y in x's dtype; moves
    ``update``'s running buffers (if given) towards the statistics.

    The dispatch point: CPU float32/float64 without a process group goes to the fused kernels,
    everything else to the torch-op formulas; fp16/bf16 inputs are normalized in float32.
    Raises ValueError when a (virtual) batch has one value per channel.
    """
    weight = _per_channel(x, weight, "weight", "normalize_train")
    bias = _per_channel(x, bias, "bias", "normalize_train")
    low = x.dtype in ops.LOW_PRECISION
    xc = x.float() if low else x
    updated = False
    if group is None and _on_kernels(xc):  # eager CPU first: the common call, one check
        y, stats, updated = kernels.train_normalize(xc, weight, bias, spec, update)
    elif group is None and spec.renorm is None and operators.wanted(xc):
        y, stats = operators.normalize(xc, weight, bias, spec)
    else:
        y, stats = ops.train(xc, weight, bias, spec, group)
    if update is not None and not updated:
        ops.update_from_stats(update, stats, spec)
    return (y.to(x.dtype) if low else y), stats


def _running(
    mean: Tensor | None, second: Tensor | None, momentum: float, kind: int
) -> ops.RunningUpdate | None:
    if mean is None and second is None:
        return None
    return ops.RunningUpdate(mean, second, momentum, kind)


def _normalize_eval(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    """Eval-mode dispatch: y = weight (x - mean) / s + bias with s = sqrt(spread + eps)
    (``is_var``, BatchNorm's running_var) or s = spread (lp's running_scale)."""
    if operators.wanted(x):
        return operators.batch_norm_eval(x, mean, spread, weight, bias, eps, is_var)
    low = x.dtype in ops.LOW_PRECISION
    xc = x.float() if low else x
    if _on_kernels(xc):
        y = kernels.eval_normalize(xc, mean, spread, weight, bias, eps, is_var)
    else:
        dtype = xc.dtype
        scale = torch.sqrt(spread.to(dtype) + eps) if is_var else spread.to(dtype)
        y = ops.normalize(xc, mean.to(dtype), scale, weight, bias)
    return y.to(x.dtype) if low else y


def eval_with_running(
    input: Tensor,
    running_mean: Tensor,
    running_second: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
    name: str = "eval_with_running",
) -> Tensor:
    """Eval mode of every variant, for a module that has checked its input (floating point,
    (N, C, *) with its C channels): y = weight (x - running_mean) / s + bias, s =
    sqrt(running_var + eps) (``is_var``) or running_scale. Raises ValueError, naming ``name``
    and the tensor, when a buffer, the weight or the bias does not hold one value per channel."""
    second_name = "running_var" if is_var else "running_scale"
    mean, second, weight, bias = _channel_tensors(
        input, name, second_name, running_mean, running_second, weight, bias
    )
    return _normalize_eval(
        input, cast(Tensor, mean), cast(Tensor, second), weight, bias, eps, is_var
    )


def _eval_with_running(
    name: str,
    input: Tensor,
    running_mean: Tensor | None,
    running_second: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    """Eval mode of every variant: normalize with the running buffers, which must exist (the
    caller has checked every tensor's size)."""
    second_name = "running_var" if is_var else "running_scale"
    if running_mean is None or running_second is None:
        raise ValueError(f"{name} in eval mode needs running_mean and {second_name}")
    return _normalize_eval(input, running_mean, running_second, weight, bias, eps, is_var)


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
    *,
    noise: NoiseDraw | None = None,
) -> Tensor:
    """Batch Normalization, same semantics as ``torch.nn.functional.batch_norm``.

    Training: y = weight * (x - mu_B) / sqrt(var_B + eps) + bias over the mini-batch (over all
    ranks when torch.distributed is initialized and ``sync_stats``), and the running buffers
    move by ``momentum`` towards mu_B and the unbiased var_B. Eval: the running buffers are used.
    ``noise`` (training only): one step of noisy-BatchNorm noise applied to y (see
    :class:`NoiseSpec`).

    Raises ValueError for an input with one value per channel in training or a channel mismatch.
    """
    _check_input(input, "batch_norm")
    running_mean, running_var, weight, bias = _channel_tensors(
        input, "batch_norm", "running_var", running_mean, running_var, weight, bias
    )
    if not training:
        return _eval_with_running(
            "batch_norm", input, running_mean, running_var, weight, bias, eps, True
        )
    group = resolve_group(process_group, sync_stats)
    if group is None and noise is None and operators.wanted(input):
        return operators.batch_norm(input, weight, bias, running_mean, running_var, momentum, eps)
    if group is None and _on_kernels(input):
        y = kernels.train_native(
            input, weight, bias, running_mean, running_var, momentum, ops.VARIANCE, eps, 2.0, None,
            noise,
        )  # fmt: skip
        if y is not None:
            return y
    spec = ops.NormSpec(eps, 2.0, noise=noise)
    update = _running(running_mean, running_var, momentum, ops.VARIANCE)
    return normalize_train(input, weight, bias, spec, group, update)[0]


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
    *,
    centered: bool = False,
) -> Tensor:
    """lp Batch Normalization (Santurkar et al. 2018, section 3.3).

    y = weight * (x - mu_B) / s + bias: the mini-batch mean is fixed as in BatchNorm, and s is
    the per-channel lp norm average of the activations "before shifting the mean": s =
    mean|x| + eps (p = 1), sqrt(mean x^2 + eps) (p = 2), max|x| + eps (p = inf), over the batch
    and spatial positions. ``centered=True`` takes the same norms of x - mu_B instead (then
    p = 2 is exactly BatchNorm). ``running_scale`` tracks s itself; eval divides by it.
    """
    p = float(p)
    if p not in (1.0, 2.0, math.inf):
        raise ValueError(f"lp_batch_norm: p must be 1, 2 or inf, got {p}")
    _check_input(input, "lp_batch_norm")
    running_mean, running_scale, weight, bias = _channel_tensors(
        input, "lp_batch_norm", "running_scale", running_mean, running_scale, weight, bias
    )
    if not training:
        return _eval_with_running(
            "lp_batch_norm", input, running_mean, running_scale, weight, bias, eps, False
        )
    group = resolve_group(process_group, sync_stats)
    spec = ops.NormSpec(eps, p, centered=centered)
    if group is None and _on_kernels(input):
        y = kernels.train_native(
            input, weight, bias, running_mean, running_scale, momentum, ops.SCALE, eps,
            spec.kernel_p, None,
        )  # fmt: skip
        if y is not None:
            return y
    update = _running(running_mean, running_scale, momentum, ops.SCALE)
    return normalize_train(input, weight, bias, spec, group, update)[0]


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
    smaller), each normalized with its own statistics. Under a process group the chunks are
    taken within each rank's local batch (so per-rank batches that are multiples of
    ``virtual_batch_size`` give exactly the chunks of the concatenated batch). The running
    buffers move towards the average of the chunks' means and unbiased variances (over the
    chunks of all ranks).
    """
    if virtual_batch_size < 2:
        raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
    _check_input(input, "ghost_batch_norm")
    running_mean, running_var, weight, bias = _channel_tensors(
        input, "ghost_batch_norm", "running_var", running_mean, running_var, weight, bias
    )
    if not training:
        return _eval_with_running(
            "ghost_batch_norm", input, running_mean, running_var, weight, bias, eps, True
        )
    group = resolve_group(process_group, sync_stats)
    if group is None and _on_kernels(input):
        y = kernels.train_native(
            input, weight, bias, running_mean, running_var, momentum, ops.VARIANCE, eps, 2.0,
            virtual_batch_size,
        )  # fmt: skip
        if y is not None:
            return y
    spec = ops.NormSpec(eps, 2.0, virtual_batch_size=virtual_batch_size)
    if group is None:
        update = _running(running_mean, running_var, momentum, ops.VARIANCE)
        return normalize_train(input, weight, bias, spec, None, update)[0]
    # Chunk statistics are local; the running buffers average the chunks of all ranks.
    y, stats = normalize_train(input, weight, bias, spec)
    counts = torch.tensor(stats.counts, dtype=stats.spread.dtype).view(-1, 1)
    mean_sum = stats.mean.sum(0)
    var_sum = ops.unbiased(stats.spread, counts).sum(0)
    packed = torch.cat([mean_sum, var_sum, mean_sum.new_tensor([float(len(stats.counts))])])
    packed = all_reduce_sum(packed, group)
    c = mean_sum.shape[0]
    chunks = packed[-1]
    ops.update_running(running_mean, packed[:c] / chunks, momentum)
    ops.update_running(running_var, packed[c : 2 * c] / chunks, momentum)
    return y


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
    _check_input(input, "batch_renorm")
    running_mean, running_var, weight, bias = _channel_tensors(
        input, "batch_renorm", "running_var", running_mean, running_var, weight, bias
    )
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
    spec = ops.NormSpec(eps, 2.0, renorm=ops.Renorm(running_mean, running_var, r_max, d_max))
    group = resolve_group(process_group, sync_stats)
    update = _running(running_mean, running_var, momentum, ops.VARIANCE)
    return normalize_train(input, weight, bias, spec, group, update)[0]


def draw_noise(x: Tensor, spec: NoiseSpec, generator: torch.Generator | None = None) -> NoiseDraw:
    """One step's noise for x (N, C, *) from ``generator`` (see :class:`NoiseSpec`)."""
    return _draw(spec, x.device, generator)


def distribution_noise(
    input: Tensor, spec: NoiseSpec, generator: torch.Generator | None = None
) -> Tensor:
    """Apply one freshly drawn step of noisy-BatchNorm noise (see :class:`NoiseSpec`)."""
    dtype = ops.compute_dtype(input)
    return _apply_noise(input.to(dtype), draw_noise(input, spec, generator)).to(input.dtype)
