"""Fused CPU kernels for training and eval normalization (numba), behind autograd Functions.

``import bnlab.functional.kernels`` imports no numba: the loops (:mod:`.loops`) are imported and
compiled on first use and cached on disk (numba ``cache=True``), so a second process loads them
without compiling. The dispatcher in :mod:`bnlab.functional` is the only caller.

What runs here: CPU float32/float64 tensors, dense in NCHW-style or channels-last layout (any
other strides are made contiguous first). The same loops serve BatchNorm and every variant (lp
statistics, ghost batches, renorm, noise) with one statistics pass, one normalize pass, and a
fused two-pass backward; the backward saves x, the parameters and per-channel statistics (with
noise also the multipliers s), never x_hat. Two glues call them: the native one (:mod:`.native`,
a C++ autograd node; BatchNorm, lp, ghost and noise through :func:`train_native`, and eval) and
:class:`FusedTrainNorm`, a Python autograd.Function (renorm, and everything where the native
glue is off or not built). A backward run with ``create_graph=True`` (double backward, e.g.
Hessian-vector products) runs the registered graph backward on both (:func:`use_graph_backward`:
BatchNorm's closed-form second derivatives from :mod:`bnlab.functional.operators`, the torch-op
formulas for the other variants), so higher derivatives are exact.

The package: :mod:`.runtime` (loading numba and the loops, fork handling), :mod:`.plan` (an
input's geometry on the loops, output allocation), :mod:`.loops` (the numba loops, a module
per pass and the drivers), :mod:`.entries` (their C entry points), :mod:`.native` (the C++ glue),
:mod:`.prepare` (ahead-of-time compilation); this module holds the Python autograd Functions
and the calls the dispatcher makes (:func:`train_native`, :func:`train_normalize`,
:func:`eval_normalize`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnlab.functional import ops
from bnlab.functional.kernels import native
from bnlab.functional.kernels.plan import (
    HUGE_PAGE,
    PARALLEL_MIN_NUMEL,
    PLANAR_MIN_SPATIAL,
    Plan,
    output_like,
    plan_for,
    planned,
    readable,
)
from bnlab.functional.kernels.runtime import numba_available
from bnlab.functional.noise import NoiseDraw, NoiseSpec

__all__ = [
    "HUGE_PAGE", "KERNEL_DTYPES", "PARALLEL_MIN_NUMEL", "PLANAR_MIN_SPATIAL", "FusedEvalNorm",
    "FusedTrainNorm", "Plan", "eval_normalize", "numba_available", "output_like", "plan_for",
    "planned", "readable", "supports", "torch_op_backward", "train_native", "train_normalize",
    "use_graph_backward",
]  # fmt: skip

KERNEL_DTYPES = (torch.float32, torch.float64)


def supports(x: Tensor) -> bool:
    """Whether the kernels can normalize x (CPU, float32/float64, not empty)."""
    return x.is_cpu and x.dtype in KERNEL_DTYPES and x.numel() > 0


_FILLED: dict[tuple[int, float, torch.dtype], np.ndarray] = {}


def _param(t: Tensor | None, channels: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    if t is None:
        key = (channels, fill, dtype)
        filled = _FILLED.get(key)
        if filled is None:
            np_dtype = np.float32 if dtype == torch.float32 else np.float64
            filled = _FILLED[key] = np.full(channels, fill, dtype=np_dtype)
            filled.flags.writeable = False
        return filled
    return (t if t.dtype == dtype else t.detach().to(dtype)).numpy(force=True)


_EMPTY_F32 = np.empty(0, dtype=np.float32)
_EMPTY_F64 = np.empty(0, dtype=np.float64)
_NO_RUNNING = np.empty((0, 0))
_NO_LIMITS = np.zeros(2)
_QUIET = (np.empty(0), np.zeros(2, dtype=np.uint64))
"""The noise arguments of a layer without noise: no configuration, any key."""


def _noise_args(draw: NoiseDraw | None) -> tuple[np.ndarray, np.ndarray]:
    """(configuration (4,) float64 or empty, key (2,) uint64): what the loops take."""
    if draw is None:
        return _QUIET
    return np.array(_noise_reals(draw), dtype=np.float64), np.array(draw.key, dtype=np.uint64)


def _noise_reals(draw: NoiseDraw | None) -> tuple[float, ...]:
    """The native glue's reals after (p, eps, momentum): the configuration, or nothing."""
    if draw is None:
        return ()
    return draw.spec.constants


def _renorm_args(spec: ops.NormSpec) -> tuple[np.ndarray, np.ndarray]:
    renorm = spec.renorm
    if renorm is None:
        return _NO_RUNNING, _NO_LIMITS
    running = torch.stack([renorm.running_mean, renorm.running_var]).detach().double().numpy()
    return running, np.array([renorm.r_max, renorm.d_max], dtype=np.float64)


class FusedTrainNorm(torch.autograd.Function):
    """Training-mode normalization on the fused kernels: returns y and appends the (5, G, C)
    float64 statistics (rows mean, spread, ...; per group (virtual batch) and channel) and the
    noise multipliers s it kept (x's shape; None when not kept) to ``out``, outside the graph:
    one differentiable output keeps autograd's per-call cost down. ``x`` is readable
    (:func:`readable`) and ``plan`` is its plan; ``track`` holds the running buffers the kernel
    moves (:func:`_track_args`). With noise, s is kept when a gradient is wanted or ``keep``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        spec: ops.NormSpec,
        plan: Plan,
        track: tuple[np.ndarray, np.ndarray, float, int],
        out: list[Any],
        keep: bool = False,
    ) -> Tensor:
        xa = plan.array(x)
        y = output_like(x)
        ya = plan.array(y)
        channels = plan.channels
        w = _param(weight, channels, 1.0, x.dtype)
        b = _param(bias, channels, 0.0, x.dtype)
        noise = _noise_args(spec.noise)
        running, limits = _renorm_args(spec)
        stats = np.empty((5, plan.groups, channels))
        # the noise multipliers s, kept for the backward when one will run
        wanted = keep or any(ctx.needs_input_grad[:3])
        kept = output_like(x) if spec.noise is not None and wanted else None
        kept_a = plan.optional_array(kept, x.dtype)
        args = (
            plan.blocks, plan.row_blocks, spec.kernel_p, spec.eps, w, b, running, limits, *track,
            *noise, kept_a, ya, stats,
        )  # fmt: skip
        plan.enter()
        if plan.planar:
            plan.forward(xa, plan.v, *args)
        else:
            plan.forward(xa, plan.k, plan.v * plan.rows_per_sample, *args)
        ctx.save_for_backward(x, weight, bias, kept)
        ctx.state = (spec, plan, stats)
        ctx.set_materialize_grads(False)
        out.extend((stats, kept))
        return y

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None]:
        if dy is None:
            return None, None, None, None, None, None, None, None
        x, weight, bias, kept = ctx.saved_tensors
        if torch.is_grad_enabled():
            needs = tuple(ctx.needs_input_grad[:3])
            grads = _graph_backward(needs, ctx.state[0], x, weight, bias, dy)
            return (*grads, None, None, None, None, None)
        spec, plan, stats = ctx.state
        need_dx = bool(ctx.needs_input_grad[0])
        xa = plan.array(x)
        dya = plan.array(plan.like(dy, x))
        dx = output_like(x)
        dxa = plan.array(dx)
        w = _param(weight, plan.channels, 1.0, x.dtype)
        kept_a = plan.optional_array(kept, x.dtype)
        args = (plan.blocks, plan.row_blocks, spec.kernel_p, stats, w, kept_a, dxa, need_dx)
        plan.enter()
        if plan.planar:
            dparams = plan.backward(dya, xa, plan.v, *args)
        else:
            dparams = plan.backward(dya, xa, plan.k, plan.v * plan.rows_per_sample, *args)
        dweight = _grad_of(weight, dparams[0])
        dbias = _grad_of(bias, dparams[1])
        return (dx if need_dx else None), dweight, dbias, None, None, None, None, None


def _grad_of(param: Tensor | None, grad: np.ndarray) -> Tensor | None:
    if param is None:
        return None
    g = torch.from_numpy(grad)
    return g if g.dtype == param.dtype else g.to(param.dtype)


def _track_args(
    update: ops.RunningUpdate | None, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """The running buffers as NumPy views the forward kernel updates in place, or empty arrays
    (kind 0) when there are none or they are not plain CPU buffers of x's dtype."""
    mean, second, momentum, kind = _track_tensors(update, dtype)
    if mean is not None and second is not None:
        return mean.numpy(), second.numpy(), momentum, kind
    empty = _EMPTY_F32 if dtype == torch.float32 else _EMPTY_F64
    return empty, empty, 0.0, 0


def _track_tensors(
    update: ops.RunningUpdate | None, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None, float, int]:
    """:func:`_track_args` for the native glue: the buffers themselves, or None (kind 0)."""
    if update is not None and _plain(update.mean, dtype) and _plain(update.second, dtype):
        return update.mean, update.second, float(update.momentum), update.kind
    return None, None, 0.0, 0


def _native_module(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Any:
    """The native glue's module when it runs this call (built, parameters in x's dtype), else
    None."""
    dtype = x.dtype
    if (weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype):
        return None
    return native.active()


def _plain(t: Tensor | None, dtype: torch.dtype) -> bool:
    return (
        t is not None
        and t.dtype == dtype
        and not t.requires_grad
        and t.is_cpu
        and t.is_contiguous()
    )


def torch_op_backward(
    needs: tuple[bool, ...],
    spec: ops.NormSpec,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward as a differentiable graph: re-run the torch-op forward and differentiate it,
    so a backward with create_graph=True supports double backward. ``needs``: which of (x,
    weight, bias) want a gradient."""
    wanted: list[Tensor] = [
        t for t, need in zip((x, weight, bias), needs, strict=True) if need and t is not None
    ]
    with torch.enable_grad():
        y, _ = ops.train(x, weight, bias, spec)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    dx, dweight, dbias = (next(grads) if need else None for need in needs)
    return dx, dweight, dbias


def _native_double_backward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor,
    p: float,
    eps: float,
    virtual_batch_size: int | None,
    noise: tuple[float, float, float, float, int] | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The native glue's backward with ``create_graph=True``: the registered graph backward
    (:func:`use_graph_backward`) of the call as native.cpp describes it (``noise``: the
    configuration and the packed key)."""
    draw = None
    if noise is not None:
        *conf, key = noise
        draw = NoiseDraw.from_packed(NoiseSpec(*conf), key)
    spec = ops.NormSpec(  # p < 0: lp's un-centred form (ops.NormSpec.kernel_p)
        eps, abs(p), virtual_batch_size=virtual_batch_size, noise=draw, centered=p > 0
    )
    return _graph_backward(needs, spec, x, weight, bias, dy)


_graph_backward: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]] = (
    torch_op_backward
)
"""What a backward with ``create_graph=True`` runs, on both glues: :func:`torch_op_backward`
until :mod:`bnlab.functional.operators` registers its closed-form double backward
(:func:`use_graph_backward`); this package does not import the operators."""


def use_graph_backward(
    function: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]],
) -> None:
    """Route every differentiable backward (double backward, HVPs) through ``function``, which
    takes :func:`torch_op_backward`'s arguments."""
    global _graph_backward
    _graph_backward = function


native.use_double_backward(_native_double_backward)


def _eval_kernel(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    x = readable(x)
    plan = plan_for(x, x.shape[0])
    if _native_module(x, weight, bias) is not None:
        plan.enter()
        return native.eval_forward(x, mean, spread, weight, bias, plan.eval_ints(), eps, is_var)
    y = output_like(x)
    channels = plan.channels
    w = _param(weight, channels, 1.0, x.dtype)
    b = _param(bias, channels, 0.0, x.dtype)
    m = _param(mean, channels, 0.0, x.dtype)
    s = _param(spread, channels, 1.0, x.dtype)
    plan.enter()
    args = (m, s, eps, is_var, w, b, plan.array(y), plan.row_blocks)
    if plan.planar:
        plan.eval(plan.array(x), *args)
    else:
        plan.eval(plan.array(x), plan.k, *args)
    return y


class FusedEvalNorm(torch.autograd.Function):
    """Eval-mode normalization with running statistics on the kernel; the backward (a
    per-channel scaling) is torch ops, differentiable again."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        mean: Tensor,
        spread: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        is_var: bool,
    ) -> Tensor:
        y = _eval_kernel(x, mean, spread, weight, bias, eps, is_var)
        ctx.save_for_backward(x, mean, spread, weight)
        ctx.eps, ctx.is_var = eps, is_var
        return y

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, Tensor | None, None, None]:
        x, mean, spread, weight = ctx.saved_tensors
        scale = torch.sqrt(spread + ctx.eps) if ctx.is_var else spread
        inv = ops.channel_view(1.0 / scale.to(x.dtype), x)
        dims = ops.reduce_dims(x)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = inv if weight is None else inv * ops.channel_view(weight.to(x.dtype), x)
            dx = dy * g
        if ctx.needs_input_grad[3]:
            x_hat = (x - ops.channel_view(mean.to(x.dtype), x)) * inv
            dweight = (dy * x_hat).sum(dims).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            dbias = dy.sum(dims)
        return dx, None, None, dweight, dbias, None, None


def train_native(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_second: Tensor | None,
    momentum: float,
    kind: int,
    eps: float,
    p: float,
    virtual_batch_size: int | None,
    noise: NoiseDraw | None = None,
) -> Tensor | None:
    """The shortest path from a module to the loops, for BatchNorm, lp, ghost and noisy
    training without renorm or a process group: y, with the running buffers moved in the loop
    (``kind`` as :class:`ops.RunningUpdate`); or None where this path does not apply (no
    glue, parameters or buffers not plain tensors of x's dtype): the caller then goes through
    :func:`train_normalize`. The caller has checked that x may use the kernels
    (``bnlab.functional._on_kernels``)."""
    module = _native_module(x, weight, bias)
    if module is None:
        return None
    if running_mean is None and running_second is None:
        kind = 0
    elif not (_plain(running_mean, x.dtype) and _plain(running_second, x.dtype)):
        return None
    x, plan = planned(x, virtual_batch_size)
    plan.enter()
    ints = plan.train_ints(kind, virtual_batch_size, noise)
    reals = (p, eps, momentum, *_noise_reals(noise))
    y: Tensor = module.train(x, weight, bias, running_mean, running_second, ints, reals, False)
    return y  # y alone: the module path needs no statistics


def train_normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: ops.NormSpec,
    update: ops.RunningUpdate | None = None,
) -> tuple[Tensor, ops.GroupStats, bool]:
    """Training-mode normalization on the kernels: ``(y, stats, updated)`` like
    :func:`ops.train`; ``updated`` says whether the kernel moved ``update``'s buffers. Raises
    ValueError when a (virtual) batch has one value per channel."""
    x, plan = planned(x, spec.virtual_batch_size)
    if spec.renorm is None and _native_module(x, weight, bias) is not None:
        mean_buf, second_buf, momentum, kind = _track_tensors(update, x.dtype)
        ints = plan.train_ints(kind, spec.virtual_batch_size, spec.noise)
        plan.enter()
        reals = (spec.kernel_p, spec.eps, momentum, *_noise_reals(spec.noise))
        y, mean, spread = native.train(x, weight, bias, mean_buf, second_buf, ints, reals)
        return y, ops.GroupStats(mean, spread, plan.counts), kind != 0
    track = _track_args(update, x.dtype)
    out: list[Any] = []
    y = FusedTrainNorm.apply(x, weight, bias, spec, plan, track, out)
    stats = out[0]
    mean, spread = torch.from_numpy(stats[0]), torch.from_numpy(stats[1])
    return y, ops.GroupStats(mean, spread, plan.counts), track[3] != 0


def eval_normalize(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    """y = weight (x - mean) / s + bias, s = sqrt(spread + eps) (``is_var``) or spread."""
    if not torch.is_grad_enabled() or not (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return _eval_kernel(x, mean, spread, weight, bias, eps, is_var)
    y: Tensor = FusedEvalNorm.apply(x, mean, spread, weight, bias, eps, is_var)
    return y
