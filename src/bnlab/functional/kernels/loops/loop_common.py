"""What every pass of the loops shares: the fastmath flag sets, the thread-pool options of a
parallel driver, the rows of the statistics, noise and coefficient arrays, the block split of a
range, the short-row and channel-batch sizes, and the serial twin of a parallel driver."""

from __future__ import annotations

import types
from typing import Any

from numba import njit

# No nnan/ninf: a NaN channel must stay NaN (and must not leak into other channels).
_REDUCE = {"reassoc", "contract", "nsz", "arcp"}
# Elementwise loops need no reassociation (it would be free to undo careful centring).
_ELEMENTWISE = {"contract", "nsz"}

# Only the explicit prange loops run on the thread pool: numba must not turn allocations and
# array expressions into parallel regions (each costs a pool wake-up, and a forked child may
# not enter one; see kernels.__init__).
_PARALLEL: Any = {  # numba's stubs type parallel as bool; it takes these options too
    "prange": True,
    "comprehension": False,
    "reduction": False,
    "inplace_binop": False,
    "setitem": False,
    "numpy": False,
    "stencil": False,
    "fusion": False,
}

# A literal int argument (a bare 0 or 1) makes numba compile a separate specialization of the
# called function (Literal[int](1) is a type of its own): calls pass np.int64(0) / np.int64(1).

# Rows of the (5, G, C) float64 statistics array the forward returns and the backward reads.
MEAN, SPREAD, SCALE, R, D = range(5)
# Rows of the (4, C) per-channel noise parameters (float64, or per column in the input dtype).
_MU_T, _SIGMA_T, _R_MU, _R_SIGMA = range(4)
# Rows of the (4, G, C) per-element coefficient array in the input dtype.
_MEAN_HI, _MEAN_LO, _A, _B = range(4)


@njit(cache=True, inline="always")
def _block(lo: int, hi: int, b: int, blocks: int) -> tuple[int, int]:
    """Block b of ``blocks`` equal parts of [lo, hi): (start, stop).
    A helper: no equation of its own."""
    span = hi - lo
    return lo + span * b // blocks, lo + span * (b + 1) // blocks


_SHORT_ROW = 64
"""Rows of at most this many columns are summed four at a time (see _rows_sums_task)."""


_CHUNK = 256
"""Channels per batch of the row layout's per-(group, channel) finish (:func:`_rows_stats_task`)."""


def _serial_twin(dispatcher: Any) -> Any:
    """The same driver compiled without ``parallel``: a parallel-compiled function costs
    milliseconds per call on a busy machine even when it runs no parallel region (measured 4 ms
    against 11 us for a 16k-element backward). Its own name keeps its own disk cache entry.
    A helper: no equation of its own."""
    f = dispatcher.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__doc__ = f.__doc__
    return njit(cache=True)(twin)
