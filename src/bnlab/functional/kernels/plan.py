"""How one input geometry runs on the loops (:class:`Plan`, cached per shape, strides, dtype,
virtual batch size and thread count) and the memory the loops write (:func:`output_like`)."""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnlab.functional import ops
from bnlab.functional.kernels.native import loaded as loaded_glue
from bnlab.functional.kernels.runtime import forked_child, load_loops
from bnlab.functional.noise import NoiseDraw

PARALLEL_MIN_NUMEL = 1 << 15
"""Below this many elements a pass runs on one thread: waking the pool costs more."""


PLANAR_MIN_SPATIAL = 64
"""A contiguous input with fewer spatial values per (sample, channel) runs on the row loops,
one row per sample, as (N, C * S): rows of 16 values are too short for the vector units."""

_EMPTY = {
    (rank, dtype): np.empty((0,) * rank, dtype=np.float32 if dtype == torch.float32 else np.float64)
    for rank in (2, 3)
    for dtype in (torch.float32, torch.float64)
}

_PLAN_CACHE_SIZE = 512
_plans: dict[tuple[Any, ...], Plan] = {}


class Plan:
    """How one input geometry runs on the loops, worked out once per (shape, strides, dtype,
    virtual batch size, thread count) and cached: the per-call path then only makes NumPy
    views, allocates the output and calls the loop (a few microseconds, see the README).

    The loops see a (N, C, *) tensor as planar (N, C, S), or as rows (M, C * k) whose column j
    holds channel j // k: channels-last (M = N * S, k = 1) or (M = N, k = S). A plan is made
    for a contiguous or a dense channels-last tensor only (:func:`readable`).
    """

    __slots__ = (
        "backward", "blocks", "channels", "counts", "dtype", "eval", "forward", "groups", "k",
        "min_count", "n", "native_eval", "native_train", "parallel", "perm", "planar",
        "row_blocks", "rows_per_sample", "size", "strides", "threads", "v", "view_shape",
    )  # fmt: skip

    def __init__(self, x: Tensor, v: int, threads: int) -> None:
        load_loops()
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
        self.parallel = x.numel() >= PARALLEL_MIN_NUMEL and not forked_child() and self.threads > 1
        self.v = v
        self.groups = -(-self.n // v)
        self.counts = ops.group_counts(self.n, v, self.size)
        self.min_count = min(self.counts)  # the smallest group: the last virtual batch
        self.blocks, self.row_blocks = self._blocks()
        from bnlab.functional.kernels.entries import python_driver

        shape = "planar" if self.planar else "rows"
        self.forward = python_driver(f"forward_{shape}", self.parallel)
        self.backward = python_driver(f"backward_{shape}", self.parallel)
        self.eval = python_driver(f"eval_{shape}", self.parallel)

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
            from bnlab.functional.kernels.entries import address

            layout = "planar" if self.planar else "rows"
            forward = address(f"forward_{layout}", self.parallel, self.dtype)
            backward = address(f"backward_{layout}", self.parallel, self.dtype)
            self.native_train = (*self._native_geometry(), forward, backward)
        if noise is None:
            return (*self.native_train, kind, virtual_batch_size or 0, 0, 0)
        return (*self.native_train, kind, virtual_batch_size or 0, 4, noise.packed_key)

    def eval_ints(self) -> tuple[int, ...]:
        """The native glue's plan for eval, made once."""
        if self.native_eval is None:
            from bnlab.functional.kernels.entries import address

            layout = "planar" if self.planar else "rows"
            entry = address(f"eval_{layout}", self.parallel, self.dtype)
            self.native_eval = (*self._native_geometry(), entry, 0, 0, 0)
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

    def optional_array(self, t: Tensor | None, dtype: torch.dtype) -> np.ndarray:
        """:meth:`array` of t, or for None an empty array of this plan's rank in ``dtype``: a
        loop's "none" for an optional array of x's shape (noisy BatchNorm's kept
        multipliers)."""
        return self.array(t) if t is not None else _EMPTY[(len(self.view_shape), dtype)]

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
"""Outputs at least this large ask for transparent huge pages (see :func:`output_like`)."""
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


def output_like(x: Tensor) -> Tensor:
    """A new tensor with x's shape and strides for a loop to write.

    torch's CPU allocator hands large blocks back to the OS when they are freed, so every large
    output is fresh memory whose first write faults in one 4 KiB page at a time: 100 MB cost
    44 ms to allocate and fill against 5 ms to fill (one thread). Large outputs are advised
    (madvise MADV_HUGEPAGE on their whole 2 MiB pages) so the kernel backs them with huge pages
    where transparent huge pages are enabled ("madvise" or "always"): 10 ms. Elsewhere it is
    a no-op; torch's own ``THP_MEM_ALLOC_ENABLE=1`` does the same for every allocation.
    Where the native glue is loaded, large outputs come from its cache of freed outputs
    (:func:`bnlab.functional.kernels.native.output_cache`), as the glue's own do.
    """
    nbytes = x.numel() * x.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        glue = loaded_glue()
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


def readable(x: Tensor) -> Tensor:
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


def plan_for(x: Tensor, v: int) -> Plan:
    """The cached plan of a readable x (:func:`readable`) with virtual batch size v."""
    threads = torch.get_num_threads()
    key = (x.shape, x.stride(), x.dtype, v, threads, forked_child())
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.clear()
        plan = _plans[key] = Plan(x, v, threads)
    return plan


def planned(x: Tensor, virtual_batch_size: int | None) -> tuple[Tensor, Plan]:
    """x made readable and its plan for training; raises ValueError when a (virtual) batch has
    one value per channel."""
    x = readable(x)
    n = x.shape[0]
    plan = plan_for(x, n if virtual_batch_size is None else min(virtual_batch_size, n))
    ops.check_batch_size(plan.min_count, x)
    return x, plan
