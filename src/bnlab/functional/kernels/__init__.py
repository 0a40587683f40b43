"""Fused CPU kernels for training and eval normalization (numba), behind autograd Functions.

``import bnlab.functional.kernels`` imports no numba: the loops (:mod:`.loops`) are imported and
compiled on first use and cached on disk (numba ``cache=True``), so a second process loads them
without compiling. The dispatcher in :mod:`bnlab.functional` is the only caller.

What runs here: CPU float32/float64 tensors, dense in NCHW-style or channels-last layout (any
other strides are made contiguous first). The same loops serve BatchNorm and every variant (lp
statistics, ghost batches, renorm, noise) with one statistics pass, one normalize pass, and a
fused two-pass backward; the backward saves x, the parameters and per-channel statistics, never
x_hat. Two glues call them: the native one (:mod:`.native`, a C++ autograd node; BatchNorm, lp,
ghost and noise through :func:`train_native`, and eval) and :class:`FusedTrainNorm`, a Python
autograd.Function (renorm, and everything where the native glue is off or not built). A
backward run with ``create_graph=True`` (double backward, e.g. Hessian-vector products) runs
the registered graph backward on both (:func:`use_graph_backward`: BatchNorm's closed-form
second derivatives from :mod:`bnlab.functional.operators`, the torch-op formulas for the other
variants), so higher derivatives are exact.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnlab.functional import ops
from bnlab.functional.kernels import native
from bnlab.functional.noise import NoiseDraw, NoiseSpec

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


def supports(x: Tensor) -> bool:
    """Whether the kernels can normalize x (CPU, float32/float64, not empty)."""
    return x.is_cpu and x.dtype in KERNEL_DTYPES and x.numel() > 0


PLANAR_MIN_SPATIAL = 64
"""A contiguous input with fewer spatial values per (sample, channel) runs on the row loops,
one row per sample, as (N, C * S): rows of 16 values are too short for the vector units."""

_PLAN_CACHE_SIZE = 512
_plans: dict[tuple[Any, ...], _Plan] = {}


class _Plan:
    """How one input geometry runs on the loops, worked out once per (shape, strides, dtype,
    virtual batch size, thread count) and cached: the per-call path then only makes NumPy
    views, allocates the output and calls the loop (a few microseconds, see the README).

    The loops see a (N, C, *) tensor as planar (N, C, S), or as rows (M, C * k) whose column j
    holds channel j // k: channels-last (M = N * S, k = 1) or (M = N, k = S). A plan is made
    for a contiguous or a dense channels-last tensor only (:func:`_readable`).
    """

    __slots__ = (
        "backward", "blocks", "channels", "counts", "dtype", "eval", "forward", "groups", "k",
        "min_count", "n", "native_eval", "native_train", "parallel", "perm", "planar",
        "row_blocks", "rows_per_sample", "size", "strides", "threads", "v", "view_shape",
    )  # fmt: skip

    def __init__(self, x: Tensor, v: int, threads: int) -> None:
        _loops()
        self.strides = x.stride()
        self.n, self.channels = x.shape[0], x.shape[1]
        self.size = x.numel() // (self.n * self.channels)
        channels_last = not x.is_contiguous()
        self.planar = self.size >= PLANAR_MIN_SPATIAL and not channels_last
        self.k = 1 if channels_last else self.size
        self.rows_per_sample = self.size if channels_last else 1
        self.perm = (0, *range(2, x.dim()), 1) if channels_last else None
        if self.planar:
            self.view_shape: tuple[int, ...] = (self.n, self.channels, self.size)
        elif channels_last:
            self.view_shape = (self.n * self.size, self.channels)
        else:
            self.view_shape = (self.n, self.channels * self.size)
        import numba

        self.threads = min(threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        self.parallel = x.numel() >= PARALLEL_MIN_NUMEL and not _forked_child and self.threads > 1
        self.v = v
        self.groups = -(-self.n // v)
        self.counts = tuple(min(v, self.n - start) * self.size for start in range(0, self.n, v))
        self.min_count = min(self.counts)  # the smallest group: the last virtual batch
        self.blocks, self.row_blocks = self._blocks()
        from bnlab.functional.kernels import entries

        shape = "planar" if self.planar else "rows"
        self.forward = entries.python_driver(f"forward_{shape}", self.parallel)
        self.backward = entries.python_driver(f"backward_{shape}", self.parallel)
        self.eval = entries.python_driver(f"eval_{shape}", self.parallel)

        self.dtype = "float32" if x.dtype == torch.float32 else "float64"
        self.native_train: tuple[int, ...] | None = None
        self.native_eval: tuple[int, ...] | None = None

    def _native_geometry(self) -> tuple[int, int, int, int, int, int, int, int]:
        """(n0, n1, n2, groups, channels, v, blocks, row_blocks) as the entries take them."""
        if self.planar:
            n0, n1, n2 = self.view_shape
            v = self.v
        else:
            n0, n1 = self.view_shape
            n2, v = self.k, self.v * self.rows_per_sample
        return n0, n1, n2, self.groups, self.channels, v, self.blocks, self.row_blocks

    def train_ints(
        self, kind: int, virtual_batch_size: int | None, noise: NoiseDraw | None
    ) -> tuple[int, ...]:
        """The native glue's ``ints`` for training: geometry and entry addresses (made once),
        then the running-buffer kind, the virtual batch size (0: none), the noise configuration's
        length (0: no noise) and the packed noise key."""
        if self.native_train is None:
            from bnlab.functional.kernels import entries

            layout = "planar" if self.planar else "rows"
            forward = entries.address(f"forward_{layout}", self.parallel, self.dtype)
            backward = entries.address(f"backward_{layout}", self.parallel, self.dtype)
            self.native_train = (*self._native_geometry(), forward, backward)
        if noise is None:
            return (*self.native_train, kind, virtual_batch_size or 0, 0, 0)
        return (*self.native_train, kind, virtual_batch_size or 0, 4, noise.packed_key)

    def eval_ints(self) -> tuple[int, ...]:
        """The native glue's plan for eval, made once."""
        if self.native_eval is None:
            from bnlab.functional.kernels import entries

            layout = "planar" if self.planar else "rows"
            address = entries.address(f"eval_{layout}", self.parallel, self.dtype)
            self.native_eval = (*self._native_geometry(), address, 0, 0, 0)
        return self.native_eval

    def _blocks(self) -> tuple[int, int]:
        """(reduction blocks per group, row blocks for the elementwise passes)."""
        if not self.parallel:
            return 1, 1
        threads = self.threads
        if self.planar:
            tasks = self.groups * self.channels
            blocks = 1 if tasks >= 4 * threads else math.ceil(4 * threads / tasks)
            return max(1, min(blocks, self.v)), min(4 * threads, self.n * self.channels)
        rows = self.n * self.rows_per_sample
        blocks = max(1, min(math.ceil(2 * threads / self.groups), self.v * self.rows_per_sample))
        return blocks, max(1, min(4 * threads, rows))

    def array(self, t: Tensor) -> np.ndarray:
        """The NumPy view of t, which has this plan's strides (so the reshape never copies)."""
        a = t.numpy(force=True)  # CPU, no conjugate: a view without detach's Python call
        if self.perm is not None:
            a = a.transpose(self.perm)
        return a.reshape(self.view_shape)

    def like(self, t: Tensor, x: Tensor) -> Tensor:
        """t with x's strides (t itself when they match already)."""
        return t if t.stride() == self.strides else torch.empty_like(x).copy_(t)

    def enter(self) -> None:
        """Set numba's thread count for this (calling) thread before a parallel loop."""
        if self.parallel:
            import numba

            if numba.get_num_threads() != self.threads:
                numba.set_num_threads(self.threads)


HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 2 * HUGE_PAGE
"""Outputs at least this large ask the kernel for transparent huge pages (see :func:`_output`)."""
_MADV_HUGEPAGE = 14
_madvise: Any = None


def _huge_pages() -> Any:
    """libc's madvise on Linux, else False (checked once)."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    return _madvise


def _output(x: Tensor) -> Tensor:
    """A new tensor with x's shape and strides for a loop to write.

    torch's CPU allocator hands large blocks back to the OS when they are freed, so every large
    output is fresh memory whose first write faults in one 4 KiB page at a time: 100 MB cost
    44 ms to allocate and fill against 5 ms to fill (one thread). Large outputs are advised
    (madvise MADV_HUGEPAGE on their whole 2 MiB pages) so the kernel backs them with huge pages
    where transparent huge pages are enabled ("madvise" or "always"): 10 ms. Elsewhere it is
    a no-op; torch's own ``THP_MEM_ALLOC_ENABLE=1`` does the same for every allocation.
    Where the native glue is loaded, large outputs come from its cache of freed outputs
    (:func:`native.output_cache`), as the glue's own do.
    """
    nbytes = x.numel() * x.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        glue = native.loaded()
        if glue is not None:
            return glue.output_like(x)
    out = torch.empty_like(x)
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        madvise = _huge_pages()
        if madvise:
            ptr = out.data_ptr()
            start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
            end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
            if end > start:
                madvise(start, end - start, _MADV_HUGEPAGE)
    return out


def _readable(x: Tensor) -> Tensor:
    """x, or a contiguous copy when it is neither contiguous nor dense channels-last."""
    if x.is_contiguous():
        return x
    dims = x.dim()
    if dims == 4:
        dense_rows = x.is_contiguous(memory_format=torch.channels_last)
    elif dims == 5:
        dense_rows = x.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        dense_rows = dims > 2 and x.movedim(1, -1).is_contiguous()
    return x if dense_rows else x.contiguous()


def _plan(x: Tensor, v: int) -> _Plan:
    """The cached plan of a readable x (:func:`_readable`) with virtual batch size v."""
    threads = torch.get_num_threads()
    key = (x.shape, x.stride(), x.dtype, v, threads, _forked_child)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.clear()
        plan = _plans[key] = _Plan(x, v, threads)
    return plan


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
    float64 statistics (rows mean, spread, ...; per group (virtual batch) and channel) to
    ``out_stats``, outside the graph: one differentiable output keeps autograd's per-call cost
    down. ``x`` is readable (:func:`_readable`) and ``plan`` is its plan; ``track`` holds the
    running buffers the kernel moves (:func:`_track_args`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        spec: ops.NormSpec,
        plan: _Plan,
        track: tuple[np.ndarray, np.ndarray, float, int],
        out_stats: list[np.ndarray],
    ) -> Tensor:
        xa = plan.array(x)
        y = _output(x)
        ya = plan.array(y)
        channels = plan.channels
        w = _param(weight, channels, 1.0, x.dtype)
        b = _param(bias, channels, 0.0, x.dtype)
        noise = _noise_args(spec.noise)
        running, limits = _renorm_args(spec)
        stats = np.empty((5, plan.groups, channels))
        args = (
            plan.blocks, plan.row_blocks, spec.kernel_p, spec.eps, w, b, running, limits, *track,
            *noise, ya, stats,
        )  # fmt: skip
        plan.enter()
        if plan.planar:
            plan.forward(xa, plan.v, *args)
        else:
            plan.forward(xa, plan.k, plan.v * plan.rows_per_sample, *args)
        ctx.save_for_backward(x, weight, bias)
        ctx.state = (spec, plan, stats, noise)
        ctx.set_materialize_grads(False)
        out_stats.append(stats)
        return y

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None]:
        if dy is None:
            return None, None, None, None, None, None, None
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            needs = tuple(ctx.needs_input_grad[:3])
            grads = _graph_backward(needs, ctx.state[0], x, weight, bias, dy)
            return (*grads, None, None, None, None)
        spec, plan, stats, noise = ctx.state
        need_dx = bool(ctx.needs_input_grad[0])
        xa = plan.array(x)
        dya = plan.array(plan.like(dy, x))
        dx = _output(x)
        dxa = plan.array(dx)
        w = _param(weight, plan.channels, 1.0, x.dtype)
        args = (
            plan.blocks, plan.row_blocks, spec.kernel_p, stats, w, *noise, dxa, need_dx,
        )  # fmt: skip
        plan.enter()
        if plan.planar:
            dparams = plan.backward(dya, xa, plan.v, *args)
        else:
            dparams = plan.backward(dya, xa, plan.k, plan.v * plan.rows_per_sample, *args)
        dweight = _grad_of(weight, dparams[0])
        dbias = _grad_of(bias, dparams[1])
        return (dx if need_dx else None), dweight, dbias, None, None, None, None


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


def _planned(x: Tensor, virtual_batch_size: int | None) -> tuple[Tensor, _Plan]:
    """x made readable and its plan for training; raises ValueError when a (virtual) batch has
    one value per channel."""
    x = _readable(x)
    n = x.shape[0]
    plan = _plan(x, n if virtual_batch_size is None else min(virtual_batch_size, n))
    ops.check_batch_size(plan.min_count, x)
    return x, plan


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
    x = _readable(x)
    plan = _plan(x, x.shape[0])
    if _native_module(x, weight, bias) is not None:
        plan.enter()
        return native.eval_forward(x, mean, spread, weight, bias, plan.eval_ints(), eps, is_var)
    y = _output(x)
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
    x, plan = _planned(x, virtual_batch_size)
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
    x, plan = _planned(x, spec.virtual_batch_size)
    if spec.renorm is None and _native_module(x, weight, bias) is not None:
        mean_buf, second_buf, momentum, kind = _track_tensors(update, x.dtype)
        ints = plan.train_ints(kind, spec.virtual_batch_size, spec.noise)
        plan.enter()
        reals = (spec.kernel_p, spec.eps, momentum, *_noise_reals(spec.noise))
        y, mean, spread = native.train(x, weight, bias, mean_buf, second_buf, ints, reals)
        return y, ops.GroupStats(mean, spread, plan.counts), kind != 0
    track = _track_args(update, x.dtype)
    out_stats: list[np.ndarray] = []
    y = FusedTrainNorm.apply(x, weight, bias, spec, plan, track, out_stats)
    stats = out_stats[0]
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
