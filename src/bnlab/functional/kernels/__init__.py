"""Fused CPU kernels for training and eval normalization (numba), behind autograd Functions.

``import bnlab.functional.kernels`` imports no numba: the loops (:mod:`.loops`) are imported and
compiled on first use and cached on disk (numba ``cache=True``), so a second process loads them
without compiling. The dispatcher in :mod:`bnlab.functional` is the only caller.

What runs here: CPU float32/float64 tensors, dense in NCHW-style or channels-last layout (any
other strides are made contiguous first). :class:`FusedTrainNorm` serves BatchNorm and every
variant (lp statistics, ghost batches, renorm, noise) with one statistics pass, one normalize
pass, and a fused two-pass backward; it saves x, the parameters and per-channel statistics,
never x_hat. A backward run with ``create_graph=True`` (double backward, e.g. Hessian-vector
products) recomputes through the torch-op formulas instead, so higher derivatives are exact.
"""

from __future__ import annotations

import importlib.util
import math
import os
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnlab.functional import noise as noise_mod
from bnlab.functional import ops

KERNEL_DTYPES = (torch.float32, torch.float64)
PARALLEL_MIN_NUMEL = 1 << 15
"""Below this many elements a pass runs on one thread: waking the pool costs more."""

_loops_module: ModuleType | None = None
_numba_found: bool | None = None
_forked_child = False


def _mark_forked_child() -> None:
    # numba's default OpenMP layer (GNU libgomp) cannot run a parallel region in a child forked
    # from a process that used it: forked workers (e.g. the loss-surface pool) run serially.
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_mark_forked_child)


def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    global _numba_found
    if _numba_found is None:
        _numba_found = importlib.util.find_spec("numba") is not None
    return _numba_found


def _loops() -> Any:
    global _loops_module
    if _loops_module is None:
        # numba's OpenMP pool, started here, resets the process-wide OpenMP thread count that
        # torch reads as its intra-op thread count: keep the user's torch.set_num_threads.
        threads = torch.get_num_threads()
        import numba

        from bnlab.functional.kernels import loops

        numba.get_num_threads()  # starts the pool now rather than inside a later call
        torch.set_num_threads(threads)
        _loops_module = loops
    return _loops_module


def _threads() -> int:
    """The kernels follow torch's intra-op thread count (``torch.set_num_threads``), capped by
    numba's pool; the count is set on numba for the calling thread."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    threads = min(torch.get_num_threads(), pool)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return threads


def supports(x: Tensor) -> bool:
    """Whether the kernels can normalize x (CPU, float32/float64, not empty)."""
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and x.numel() > 0


PLANAR_MIN_SPATIAL = 64
"""A contiguous input with fewer spatial values per (sample, channel) runs on the row loops,
one row per sample, as (N, C * S): rows of 16 values are too short for the vector units."""


class _Layout:
    """How a (N, C, *) tensor is seen by the loops: planar (N, C, S), or rows (M, C * k) whose
    column j holds channel j // k: channels-last (M = N * S, k = 1) or (M = N, k = S)."""

    __slots__ = ("channels", "k", "n", "parallel", "planar", "rows_per_sample", "shape", "size")

    def __init__(self, x: Tensor) -> None:
        self.shape = x.shape
        self.n, self.channels = x.shape[0], x.shape[1]
        self.size = x.numel() // (self.n * self.channels)
        channels_last = self.size > 1 and not x.is_contiguous() and _rows_dense(x)
        self.planar = self.size >= PLANAR_MIN_SPATIAL and not channels_last
        self.k = 1 if channels_last else self.size
        self.rows_per_sample = self.size if channels_last else 1
        self.parallel = (
            x.numel() >= PARALLEL_MIN_NUMEL and not _forked_child and torch.get_num_threads() > 1
        )

    def array(self, t: Tensor) -> np.ndarray:
        """A NumPy view of t in this layout (a contiguous copy first if t's strides differ)."""
        t = t.detach()
        if self.planar:
            return t.contiguous().view(self.n, self.channels, self.size).numpy()
        if self.k == self.size:
            return t.contiguous().view(self.n, self.channels * self.size).numpy()
        rows = t.movedim(1, -1)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        return rows.view(-1, self.channels).numpy()

    def empty(self, like: Tensor) -> tuple[Tensor, np.ndarray]:
        """A new tensor shaped like ``like`` in this layout, and its NumPy view."""
        if self.planar or self.k == self.size:
            out = torch.empty(self.shape, dtype=like.dtype)
        else:
            out = torch.empty_like(like.movedim(1, -1), memory_format=torch.contiguous_format)
            out = out.movedim(-1, 1)
        return out, self.array(out)


def _rows_dense(x: Tensor) -> bool:
    return x.dim() > 2 and x.movedim(1, -1).is_contiguous()


def _blocks(layout: _Layout, groups: int, group_len: int) -> tuple[int, int]:
    """(reduction blocks per group, row blocks for elementwise row passes)."""
    if not layout.parallel:
        return 1, 1
    threads = _threads()
    if threads == 1:
        layout.parallel = False
        return 1, 1
    if layout.planar:
        tasks = groups * layout.channels
        blocks = 1 if tasks >= 4 * threads else math.ceil(4 * threads / tasks)
        return max(1, min(blocks, group_len)), min(4 * threads, layout.n * layout.channels)
    rows = layout.n * layout.rows_per_sample
    blocks = max(1, min(math.ceil(2 * threads / groups), group_len * layout.rows_per_sample))
    return blocks, max(1, min(4 * threads, rows))


def _param(t: Tensor | None, channels: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    if t is None:
        return np.full(channels, fill, dtype=np.float32 if dtype == torch.float32 else np.float64)
    return t.detach().to(dtype).numpy()


_NO_NOISE_F32 = np.empty(0, dtype=np.float32)
_NO_NOISE_F64 = np.empty(0, dtype=np.float64)
_NO_KEY = np.zeros(2, dtype=np.uint64)
_NO_RUNNING = np.empty((0, 0))
_NO_LIMITS = np.zeros(2)


def _noise_args(
    spec: ops.NormSpec, channels: int, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    draw = spec.noise
    if draw is None:
        empty = _NO_NOISE_F32 if dtype == torch.float32 else _NO_NOISE_F64
        return np.empty((3, 0)), empty, _NO_KEY
    params = np.empty((3, channels))
    params[0] = draw.mu.detach().double().numpy()
    params[1] = draw.sigma.detach().double().numpy()
    params[2] = draw.scale_std
    table = noise_mod.normal_quantiles(dtype).numpy()
    return params, table, np.array(draw.key, dtype=np.uint64)


def _renorm_args(spec: ops.NormSpec) -> tuple[np.ndarray, np.ndarray]:
    renorm = spec.renorm
    if renorm is None:
        return _NO_RUNNING, _NO_LIMITS
    running = torch.stack([renorm.running_mean, renorm.running_var]).detach().double().numpy()
    return running, np.array([renorm.r_max, renorm.d_max], dtype=np.float64)


def _group_len(spec: ops.NormSpec, n: int) -> int:
    v = spec.virtual_batch_size
    return n if v is None else min(v, n)


class FusedTrainNorm(torch.autograd.Function):
    """Training-mode normalization on the fused kernels: ``(y, mean, spread)`` where mean and
    spread are (G, C) float64 statistics per group (virtual batch) and channel, not
    differentiable."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        spec: ops.NormSpec,
        update: ops.RunningUpdate | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        layout = _Layout(x)
        loops = _loops()
        v = _group_len(spec, layout.n)
        groups = -(-layout.n // v)
        blocks, row_blocks = _blocks(layout, groups, v)
        xa = layout.array(x)
        y, ya = layout.empty(x)
        w = _param(weight, layout.channels, 1.0, x.dtype)
        b = _param(bias, layout.channels, 0.0, x.dtype)
        noise, table, key = _noise_args(spec, layout.channels, x.dtype)
        running, limits = _renorm_args(spec)
        track_mean, track_second, momentum, kind = _track_args(update, x.dtype)
        args = (
            blocks, row_blocks, spec.p, spec.eps, w, b, running, limits, track_mean,
            track_second, momentum, kind, noise, table, key, ya, layout.parallel,
        )  # fmt: skip
        if layout.planar:
            forward = loops.forward_planar if layout.parallel else loops.forward_planar_serial
            stats = forward(xa, v, *args)
        else:
            forward = loops.forward_rows if layout.parallel else loops.forward_rows_serial
            stats = forward(xa, layout.k, v * layout.rows_per_sample, *args)
        ctx.save_for_backward(x, weight, bias)
        ctx.spec = spec
        ctx.stats = stats
        ctx.layout = (layout, v, blocks, row_blocks)
        mean = torch.from_numpy(stats[0])
        spread = torch.from_numpy(stats[1])
        ctx.mark_non_differentiable(mean, spread)
        return y, mean, spread

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor, _dmean: Tensor | None, _dspread: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_torch_op_backward(ctx, x, weight, bias, dy), None, None)
        layout, v, blocks, row_blocks = ctx.layout
        loops = _loops()
        spec = ctx.spec
        need_dx = bool(ctx.needs_input_grad[0])
        xa = layout.array(x)
        dya = layout.array(dy)
        dx, dxa = layout.empty(x)
        w = _param(weight, layout.channels, 1.0, x.dtype)
        noise, table, key = _noise_args(spec, layout.channels, x.dtype)
        args = (
            blocks, row_blocks, spec.p, ctx.stats, w, noise, table, key, dxa, need_dx,
            layout.parallel,
        )  # fmt: skip
        if layout.planar:
            backward = loops.backward_planar if layout.parallel else loops.backward_planar_serial
            dparams = backward(dya, xa, v, *args)
        else:
            backward = loops.backward_rows if layout.parallel else loops.backward_rows_serial
            dparams = backward(dya, xa, layout.k, v * layout.rows_per_sample, *args)
        dweight = _grad_of(weight, dparams[0])
        dbias = _grad_of(bias, dparams[1])
        return (dx if need_dx else None), dweight, dbias, None, None


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
    mean, second = (None, None) if update is None else (update.mean, update.second)
    if (
        update is None
        or mean is None
        or second is None
        or not _plain(mean, dtype)
        or not _plain(second, dtype)
    ):
        empty = _NO_NOISE_F32 if dtype == torch.float32 else _NO_NOISE_F64
        return empty, empty, 0.0, 0
    return mean.numpy(), second.numpy(), float(update.momentum), update.kind


def _plain(t: Tensor | None, dtype: torch.dtype) -> bool:
    return (
        t is not None
        and t.dtype == dtype
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.requires_grad
    )


def _torch_op_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward as a differentiable graph: re-run the torch-op forward and differentiate it,
    so a backward with create_graph=True supports double backward."""
    needs = ctx.needs_input_grad[:3]
    wanted: list[Tensor] = [
        t for t, need in zip((x, weight, bias), needs, strict=True) if need and t is not None
    ]
    with torch.enable_grad():
        y, _ = ops.train(x, weight, bias, ctx.spec)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    dx, dweight, dbias = (next(grads) if need else None for need in needs)
    return dx, dweight, dbias


def _eval_kernel(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    layout = _Layout(x)
    loops = _loops()
    xa = layout.array(x)
    y, ya = layout.empty(x)
    w = _param(weight, layout.channels, 1.0, x.dtype)
    b = _param(bias, layout.channels, 0.0, x.dtype)
    m = mean.detach().numpy()
    s = spread.detach().numpy()
    _, row_blocks = _blocks(layout, 1, layout.n)
    args = (m, s, eps, is_var, w, b, ya, row_blocks, layout.parallel)
    if layout.planar:
        (loops.eval_planar if layout.parallel else loops.eval_planar_serial)(xa, *args)
    else:
        (loops.eval_rows if layout.parallel else loops.eval_rows_serial)(xa, layout.k, *args)
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


def train_normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: ops.NormSpec,
    update: ops.RunningUpdate | None = None,
) -> tuple[Tensor, ops.GroupStats, bool]:
    """Training-mode normalization on the kernels: ``(y, stats, updated)`` like
    :func:`ops.train`; ``updated`` says whether the kernel moved ``update``'s buffers."""
    y, mean, spread = FusedTrainNorm.apply(x, weight, bias, spec, update)
    n, per_sample = x.shape[0], x.numel() // (x.shape[0] * x.shape[1])
    v = _group_len(spec, n)
    counts = tuple(min(v, n - start) * per_sample for start in range(0, n, v))
    updated = update is not None and _plain(update.mean, x.dtype) and _plain(update.second, x.dtype)
    return y, ops.GroupStats(mean, spread, counts), updated


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
    mean, spread = mean.to(x.dtype), spread.to(x.dtype)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _eval_kernel(x, mean, spread, weight, bias, eps, is_var)
    y: Tensor = FusedEvalNorm.apply(x, mean, spread, weight, bias, eps, is_var)
    return y
