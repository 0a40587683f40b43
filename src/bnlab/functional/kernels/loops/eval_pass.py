"""The eval-mode loops: y = (x - mean_c) * a_c + b_c with a_c = weight_c / s_c and
b_c = bias_c, s_c = sqrt(running_var_c + eps) (BatchNorm: ``reference.batch_norm_inference``)
or running_scale_c (lp BatchNorm: ``reference.lp_batch_norm_inference``).

One read of x and one write of y, in the input dtype, with the per-channel coefficients worked
out once per call in float64 (so float32 output carries the rounding of one subtraction, one
multiply and one add). Kept apart from the training loops: the inner loop is a plain
multiply-add that the compiler vectorizes, with no branch for noise or virtual batches.
Layouts as the training loops' (:mod:`bnlab.functional.kernels.loops`): planar (N, C, S) and
rows (M, C * k), column j holding channel j // k.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnlab.functional.kernels.loops.loop_common import (
    _ELEMENTWISE,
    _PARALLEL,
    _block,
    _serial_twin,
)


@njit(cache=True)
def _coefficients(mean, spread, eps, is_var, weight, bias, k, dtype_of):
    """(3, C * k) rows mean, a, b in x's dtype, each channel's values repeated k times.
    Implements (a part of) ``reference.batch_norm_inference``,
    ``reference.lp_batch_norm_inference``."""
    channels = mean.shape[0]
    coef = np.empty((3, channels * k), dtype=dtype_of.dtype)
    for c in range(channels):
        s = np.float64(spread[c])
        scale = math.sqrt(s + eps) if is_var else s
        a = np.float64(weight[c]) / scale
        for j in range(c * k, (c + 1) * k):
            coef[0, j] = mean[c]
            coef[1, j] = a
            coef[2, j] = bias[c]
    return coef


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _planar_rows(x, r0, r1, coef, y):
    """Rows r0..r1 of the (N * C) planar rows: y = (x - mean) a + b with a = w / s and
    b = bias, s = sqrt(running_var + eps) or the running scale (:func:`_coefficients`).
    Implements (a part of) ``reference.batch_norm_inference``,
    ``reference.lp_batch_norm_inference``."""
    c_total = x.shape[1]
    for r in range(r0, r1):
        n, c = r // c_total, r % c_total
        m, a, b = coef[0, c], coef[1, c], coef[2, c]
        xr = x[n, c]
        yr = y[n, c]
        for s in range(xr.shape[0]):
            yr[s] = (xr[s] - m) * a + b


@njit(cache=True, parallel=_PARALLEL)
def eval_planar(x, mean, spread, eps, is_var, weight, bias, y, row_blocks, parallel):
    """Eval normalization of (N, C, S) into y. Memory passes: read x, write y.
    Implements (a part of) ``reference.batch_norm_inference``,
    ``reference.lp_batch_norm_inference``."""
    n_total, c_total, _ = x.shape
    coef = _coefficients(mean, spread, eps, is_var, weight, bias, np.int64(1), x)
    rows = n_total * c_total
    if parallel:
        for t in prange(row_blocks):
            r0, r1 = _block(0, rows, t, row_blocks)
            _planar_rows(x, r0, r1, coef, y)
    else:
        _planar_rows(x, 0, rows, coef, y)


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _rows(x, r0, r1, coef, y):
    """Rows r0..r1 of (M, C * k): y = (x - mean) a + b per column (:func:`_coefficients`).
    Implements (a part of) ``reference.batch_norm_inference``,
    ``reference.lp_batch_norm_inference``."""
    m, a, b = coef[0], coef[1], coef[2]
    columns = x.shape[1]
    for r in range(r0, r1):  # 2-D indexing: a slice per short row costs more than the row
        for j in range(columns):
            y[r, j] = (x[r, j] - m[j]) * a[j] + b[j]


@njit(cache=True, parallel=_PARALLEL)
def eval_rows(x, k, mean, spread, eps, is_var, weight, bias, y, row_blocks, parallel):
    """Eval normalization of rows (M, C * k) into y. Memory passes: read x, write y.
    Implements (a part of) ``reference.batch_norm_inference``,
    ``reference.lp_batch_norm_inference``."""
    coef = _coefficients(mean, spread, eps, is_var, weight, bias, k, x)
    m_total = x.shape[0]
    if parallel:
        for t in prange(row_blocks):
            r0, r1 = _block(0, m_total, t, row_blocks)
            _rows(x, r0, r1, coef, y)
    else:
        _rows(x, 0, m_total, coef, y)


eval_planar_serial = _serial_twin(eval_planar)
eval_rows_serial = _serial_twin(eval_rows)
