"""The training drivers the glues call: forward_planar, forward_rows, backward_planar,
backward_rows (and their serial twins), each running the passes of :mod:`.stats_pass`,
:mod:`.normalize_pass` and :mod:`.backward_pass` as a list of tasks (see the package
docstring)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnlab.functional.kernels.loops.backward_pass import (
    _add_at_argmax,
    _grad_coefficients,
    _planar_argmax_task,
    _planar_dx_row,
    _planar_dx_task,
    _planar_grad_sums_task,
    _rows_dx_task,
    _rows_grad_sums_task,
    _rows_grad_task,
    _store_grad_coefficients,
)
from bnlab.functional.kernels.loops.loop_common import _PARALLEL, MEAN, _serial_twin
from bnlab.functional.kernels.loops.noise_draws import (
    _column_base,
    _iota,
    _noise_columns,
    _noise_params,
)
from bnlab.functional.kernels.loops.normalize_pass import (
    _planar_normalize_row,
    _planar_normalize_task,
    _row_scratch,
    _rows_normalize_task,
)
from bnlab.functional.kernels.loops.stats_pass import (
    _coefficients,
    _finish_into,
    _finish_stats,
    _planar_absdev_task,
    _planar_sums_task,
    _rows_absdev_task,
    _rows_stats_task,
    _rows_sums_task,
    _store_coefficient_rows,
    _update_running,
)


@njit(cache=True)
def _fill(a, value):
    """a[:] = value (a helper: no equation of its own).
    A helper: no equation of its own."""
    a[...] = value


@njit(cache=True)
def _filled(value, shape):
    """A new array of ``shape`` holding ``value`` (a helper: no equation of its own).
    A helper: no equation of its own."""
    a = np.empty(shape)
    a[...] = value
    return a


@njit(cache=True)
def _no_index(groups, channels):
    """An empty index array: no arg-max to correct (a helper: no equation of its own).
    A helper: no equation of its own."""
    return np.full((groups, channels), -1)


@njit(cache=True)
def _group_counts(n_total, v, per_sample):
    """Values per (group, channel): groups of ``v`` samples, the last one possibly smaller.
    A helper: no equation of its own."""
    groups = (n_total + v - 1) // v
    count = np.empty(groups)
    for g in range(groups):
        count[g] = (min(n_total, (g + 1) * v) - g * v) * per_sample
    return count


@njit(cache=True)
def _planar_fused_forward_task(
    x, t, v, p, centered, eps, count, weight, bias, running, limits, noise, key, part, mean,
    stats, coef, y, kept,
):  # fmt: skip
    """Statistics, coefficients and normalized rows of (group, channel) t: the unfused passes'
    own functions on one task, in their order (the same numbers, bit for bit).
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.batch_renorm_forward``,
    ``reference.noisy_batch_norm_forward``."""
    c_total = x.shape[1]
    g, c = t // c_total, t % c_total
    _planar_sums_task(x, t, v, np.int64(1), p, part)
    shift = x[g * v, c, 0]
    if p == 1.0:  # sum |x - mean|, or sum |x| (un-centred)
        mean[g, c] = shift + part[0, t] / count[g] if centered else 0.0
        _planar_absdev_task(x, t, v, np.int64(1), mean, part)
    _finish_into(
        stats, g, c, part[0, t], part[1, t], part[2, t], part[3, t], shift, count[g], p,
        centered, eps, running, limits,
    )  # fmt: skip
    _store_coefficient_rows(stats[:, g, c : c + 1], c, c + 1, weight, bias, 1, coef[:, g])
    iota = _iota()
    scratch = _row_scratch(noise, kept, x)
    for n in range(g * v, min(x.shape[0], (g + 1) * v)):
        _planar_normalize_row(x, n, c, v, coef, noise, key, iota, y, kept, scratch)


@njit(cache=True, parallel=_PARALLEL)
def forward_planar(
    x,
    v,
    blocks,
    row_blocks,
    p,
    eps,
    weight,
    bias,
    running,
    limits,
    track_mean,
    track_second,
    momentum,
    track_kind,
    noise,
    key,
    kept,
    y,
    stats,
    parallel,
):
    """Training forward on (N, C, S); fills ``stats``, the (5, G, C) float64 statistics (the
    caller's array: the native glue's tensor), and returns it. With noise, ``kept`` (x's
    shape) receives each activation's multiplier s for the backward; empty: not kept (no
    gradient wanted).

    y = weight (r (x - mean) / s + d) + bias per (group, channel), with s = sqrt(var + eps)
    (BatchNorm: ``reference.batch_norm_forward``), s = the lp dispersion + eps
    (``reference.lp_batch_norm_forward``), r, d from renorm's running statistics (else 1, 0;
    ``reference.batch_renorm_forward``); with noise, y <- y (sigma_t + r_sigma z) + (mu_t +
    r_mu u) (Algorithm 1, ``reference.noisy_batch_norm_forward``). Groups: virtual batches.

    Memory passes: p = 2, inf: read x (stats), read x + write y (normalize). p = 1: one more
    read of x for the mean absolute deviation. With ``blocks`` 1 a task does all of this for
    one (group, channel), so the second read comes from the cache wherever one channel's values
    fit in it (1.6 MB for (128, 64, 56, 56) float32): one read of x from memory. ``p`` < 0:
    lp's un-centred form of |p| (:func:`_finish_one`).
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.batch_renorm_forward``,
    ``reference.noisy_batch_norm_forward``, ``reference.running_update``.
    """
    centered = p > 0.0
    p = abs(p)
    n_total, c_total, size = x.shape
    count = _group_counts(n_total, v, size)
    groups = count.shape[0]
    tasks = groups * c_total * blocks
    part = np.empty((4, tasks))
    if blocks == 1:
        coef = np.empty((4, groups, c_total), dtype=x.dtype)
        mean = np.empty((groups, c_total))
        params = _noise_params(noise, key, c_total)
        if parallel:
            for t in prange(tasks):
                _planar_fused_forward_task(
                    x, t, v, p, centered, eps, count, weight, bias, running, limits, params, key,
                    part, mean, stats, coef, y, kept,
                )  # fmt: skip
        else:
            for t in range(tasks):
                _planar_fused_forward_task(
                    x, t, v, p, centered, eps, count, weight, bias, running, limits, params, key,
                    part, mean, stats, coef, y, kept,
                )  # fmt: skip
        _update_running(
            stats, count, track_mean, track_second, momentum, track_kind, np.int64(0), c_total
        )
        return stats
    if parallel:
        for t in prange(tasks):
            _planar_sums_task(x, t, v, blocks, p, part)
    else:
        for t in range(tasks):
            _planar_sums_task(x, t, v, blocks, p, part)
    sums = _filled(0.0, (4, groups, c_total))
    _fill(sums[2], math.inf)
    _fill(sums[3], -math.inf)
    shift = np.empty((groups, c_total))
    for g in range(groups):
        for c in range(c_total):
            shift[g, c] = x[g * v, c, 0]
    for t in range(tasks):
        gc = t // blocks
        g, c = gc // c_total, gc % c_total
        sums[0, g, c] += part[0, t]
        sums[1, g, c] += part[1, t]
        sums[2, g, c] = min(sums[2, g, c], part[2, t])
        sums[3, g, c] = max(sums[3, g, c], part[3, t])
    if p == 1.0:  # sum |x - mean|, or sum |x| (un-centred: about 0)
        mean = np.empty((groups, c_total))
        for g in range(groups):
            for c in range(c_total):
                mean[g, c] = shift[g, c] + sums[0, g, c] / count[g] if centered else 0.0
        if parallel:
            for t in prange(tasks):
                _planar_absdev_task(x, t, v, blocks, mean, part)
        else:
            for t in range(tasks):
                _planar_absdev_task(x, t, v, blocks, mean, part)
        _fill(sums[1], 0.0)
        for t in range(tasks):
            gc = t // blocks
            sums[1, gc // c_total, gc % c_total] += part[1, t]
    _finish_stats(sums, shift, count, p, centered, eps, running, limits, stats)
    _update_running(
        stats, count, track_mean, track_second, momentum, track_kind, np.int64(0), c_total
    )
    coef = np.empty((4, groups, c_total), dtype=x.dtype)
    _coefficients(stats, weight, bias, coef)
    params = _noise_params(noise, key, c_total)
    if parallel:
        for t in prange(row_blocks):
            _planar_normalize_task(x, t, row_blocks, v, coef, params, key, y, kept)
    else:
        _planar_normalize_task(x, np.int64(0), np.int64(1), v, coef, params, key, y, kept)
    return stats


@njit(cache=True)
def _columns(a, k):
    """Per-channel values (A, G, C) -> per column (A, G, C * k): channel c covers k columns.
    A helper: no equation of its own."""
    n_a, groups, channels = a.shape
    out = np.empty((n_a, groups, channels * k), dtype=a.dtype)
    for i in range(n_a):
        for g in range(groups):
            for c in range(channels):
                for s in range(k):
                    out[i, g, c * k + s] = a[i, g, c]
    return out


@njit(cache=True, parallel=_PARALLEL)
def forward_rows(
    x,
    k,
    v_rows,
    blocks,
    row_blocks,
    p,
    eps,
    weight,
    bias,
    running,
    limits,
    track_mean,
    track_second,
    momentum,
    track_kind,
    noise,
    key,
    kept,
    y,
    stats,
    parallel,
):
    """Training forward on rows (M, C * k): column j holds channel j // k (k = 1 for
    channels-last, k = S for a contiguous input with a small feature map); groups are
    ``v_rows`` rows. Fills and returns the (5, G, C) ``stats``. Memory passes, ``p`` and
    ``kept`` as :func:`forward_planar`.
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.batch_renorm_forward``,
    ``reference.noisy_batch_norm_forward``, ``reference.running_update``.
    """
    centered = p > 0.0
    p = abs(p)
    m_total, columns = x.shape
    channels = columns // k
    rows = _group_counts(m_total, v_rows, np.int64(1))
    count = _group_counts(m_total, v_rows, k)
    groups = rows.shape[0]
    tasks = groups * blocks
    cblocks = min(channels, row_blocks)  # the merge and finish, per block of channels
    part = np.empty((2 if p == 1.0 or p == 2.0 else 4, tasks, columns))
    if parallel:
        for t in prange(tasks):
            _rows_sums_task(x, t, v_rows, blocks, p, part)
    else:
        for t in range(tasks):
            _rows_sums_task(x, t, v_rows, blocks, p, part)
    coef = np.empty((4, groups, columns), dtype=x.dtype)
    finish = (
        x, cblocks, v_rows, k, blocks, rows, count, p, centered, eps, part, running, limits,
        weight, bias, track_mean, track_second, momentum, track_kind,
    )  # fmt: skip
    if p == 1.0:  # sum |x - mean| per column, or sum |x| (un-centred: no means needed)
        col_mean = _filled(0.0, (groups, columns))
        if parallel:
            if centered:
                for t in prange(cblocks):
                    _rows_stats_task(t, col_mean, stats, coef, *finish)
            for t in prange(tasks):
                _rows_absdev_task(x, t, v_rows, blocks, col_mean, part)
        else:
            if centered:
                for t in range(cblocks):
                    _rows_stats_task(t, col_mean, stats, coef, *finish)
            for t in range(tasks):
                _rows_absdev_task(x, t, v_rows, blocks, col_mean, part)
    no_mean = np.empty((0, 0))
    if parallel:
        for t in prange(cblocks):
            _rows_stats_task(t, no_mean, stats, coef, *finish)
    else:
        for t in range(cblocks):
            _rows_stats_task(t, no_mean, stats, coef, *finish)
    col_noise = _noise_columns(_noise_params(noise, key, channels), k, x)
    base = _column_base(columns, k, m_total)
    if parallel:
        for t in prange(row_blocks):
            _rows_normalize_task(x, t, v_rows, row_blocks, coef, col_noise, key, base, k, y, kept)
    else:
        _rows_normalize_task(
            x, np.int64(0), v_rows, np.int64(1), coef, col_noise, key, base, k, y, kept
        )
    return stats


@njit(cache=True)
def _planar_fused_backward_task(
    dy, x, t, v, p, centered, center, stats, count, weight, kept, part, argmax_at, argmax_sign,
    coef, terms, dx, need_dx,
):  # fmt: skip
    """Sums, coefficients and dx rows of (group, channel) t, as the unfused passes compute them
    (bit for bit): part[2, t] becomes the arg-max addend (p = inf), terms[t] the group's
    d weight term.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    c_total = x.shape[1]
    g, c = t // c_total, t % c_total
    mean = stats[MEAN]
    _planar_grad_sums_task(dy, x, t, v, np.int64(1), p, mean, kept, part)
    if p != 1.0 and p != 2.0:
        _planar_argmax_task(x, t, v, center, argmax_at, argmax_sign)
    part[2, t], terms[t] = _store_grad_coefficients(
        part[0, t], part[1, t], part[2, t], argmax_sign[g, c], stats, count[g], p, centered,
        weight, g, c, c, c + 1, coef,
    )  # fmt: skip
    if need_dx:
        for n in range(g * v, min(x.shape[0], (g + 1) * v)):
            _planar_dx_row(dy, x, n, c, v, p, coef, kept, dx)


@njit(cache=True, parallel=_PARALLEL)
def backward_planar(dy, x, v, blocks, row_blocks, p, stats, weight, kept, dx, need_dx, parallel):
    """Fused backward on (N, C, S); writes dx (if ``need_dx``), returns (2, C) d weight, d bias.

    dx = a gy + b phi(x - mean) + offset per (group, channel) (:func:`_store_grad_coefficients`;
    gy = dy, or dy s with noise, ``kept`` the forward's multipliers s, else empty):
    ``reference.batch_norm_backward``, ``reference.lp_batch_norm_backward``,
    ``reference.noisy_batch_norm_backward``.

    Memory passes: read dy and x (sums), read dy and x, write dx (with noise both passes also
    read s). p = inf: plus a scan of x per (group, channel) for the arg-max of |x - mean|.
    With ``blocks`` 1 a task does all of this for one (group, channel) (see
    :func:`forward_planar`): one read of dy and x from memory where a channel fits the cache.
    ``p`` < 0: lp's un-centred form of |p|.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``.
    """
    centered = p > 0.0
    p = abs(p)
    n_total, c_total, size = x.shape
    count = _group_counts(n_total, v, size)
    groups = count.shape[0]
    tasks = groups * c_total * blocks
    part = np.empty((3, tasks))
    mean = stats[MEAN]
    # p = inf: the arg-max of |x - center|, center the mean or (un-centred) 0.
    center = mean if centered else _filled(0.0, (groups, c_total))
    argmax_sign = _filled(0.0, (groups, c_total))
    argmax_at = _no_index(groups, c_total)
    dparams = np.empty((2, c_total), dtype=weight.dtype)
    if blocks == 1:
        coef = np.empty((5, groups, c_total), dtype=x.dtype)
        terms = np.empty(tasks)
        if parallel:
            for t in prange(tasks):
                _planar_fused_backward_task(
                    dy, x, t, v, p, centered, center, stats, count, weight, kept, part,
                    argmax_at, argmax_sign, coef, terms, dx, need_dx,
                )  # fmt: skip
        else:
            for t in range(tasks):
                _planar_fused_backward_task(
                    dy, x, t, v, p, centered, center, stats, count, weight, kept, part,
                    argmax_at, argmax_sign, coef, terms, dx, need_dx,
                )  # fmt: skip
        totals = np.zeros((2, c_total))
        for t in range(tasks):
            totals[0, t % c_total] += terms[t]
            totals[1, t % c_total] += part[0, t]
        for c in range(c_total):
            dparams[0, c] = totals[0, c]
            dparams[1, c] = totals[1, c]
        if need_dx:
            _add_at_argmax(dx, argmax_at, part[2].reshape((groups, c_total)))
        return dparams
    if parallel:
        for t in prange(tasks):
            _planar_grad_sums_task(dy, x, t, v, blocks, p, mean, kept, part)
    else:
        for t in range(tasks):
            _planar_grad_sums_task(dy, x, t, v, blocks, p, mean, kept, part)
    sums = _filled(0.0, (3, groups, c_total))
    for t in range(tasks):
        gc = t // blocks
        g, c = gc // c_total, gc % c_total
        for i in range(3):
            sums[i, g, c] += part[i, t]
    if p != 1.0 and p != 2.0:
        if parallel:
            for gc in prange(groups * c_total):
                _planar_argmax_task(x, gc, v, center, argmax_at, argmax_sign)
        else:
            for gc in range(groups * c_total):
                _planar_argmax_task(x, gc, v, center, argmax_at, argmax_sign)
    coef = np.empty((5, groups, c_total), dtype=x.dtype)
    _grad_coefficients(sums, stats, count, p, centered, weight, coef, argmax_sign, dparams)
    if need_dx:
        if parallel:
            for t in prange(row_blocks):
                _planar_dx_task(dy, x, t, row_blocks, v, p, coef, kept, dx)
        else:
            _planar_dx_task(dy, x, np.int64(0), np.int64(1), v, p, coef, kept, dx)
        _add_at_argmax(dx, argmax_at, sums[2])
    return dparams


@njit(cache=True, parallel=_PARALLEL)
def backward_rows(
    dy, x, k, v_rows, blocks, row_blocks, p, stats, weight, kept, dx, need_dx, parallel,
):  # fmt: skip
    """Row-layout :func:`backward_planar` (columns as :func:`forward_rows`). Memory passes:
    read dy and x (sums, and the arg-max for p = inf), read dy and x, write dx (with noise as
    :func:`backward_planar`). ``p`` and ``kept`` as :func:`backward_planar`.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    centered = p > 0.0
    p = abs(p)
    m_total, columns = x.shape
    channels = columns // k
    count = _group_counts(m_total, v_rows, k)
    groups = count.shape[0]
    tasks = groups * blocks
    cblocks = min(channels, row_blocks)  # the merge and coefficients, per block of channels
    part = np.empty((3 if p == 1.0 else 2, tasks, columns))  # sums of gy, gy (x - mean), sign
    track = p != 1.0 and p != 2.0
    tracked = (tasks, columns) if track else (1, 0)
    top = np.empty(tracked)
    first = np.empty(tracked, dtype=np.int64)
    col_mean = stats[MEAN] if k == 1 else _columns(stats[MEAN : MEAN + 1], k)[0]
    col_center = col_mean if centered else _filled(0.0, (groups, columns))
    if parallel:
        for t in prange(tasks):
            _rows_grad_sums_task(
                dy, x, t, v_rows, blocks, p, col_mean, col_center, kept, part, top, first
            )  # fmt: skip
    else:
        for t in range(tasks):
            _rows_grad_sums_task(
                dy, x, t, v_rows, blocks, p, col_mean, col_center, kept, part, top, first
            )  # fmt: skip
    argmax = (groups, channels) if track else (0, 0)
    argmax_at = np.empty(argmax, dtype=np.int64)
    addend = np.empty(argmax)
    coef = np.empty((5, groups, columns), dtype=x.dtype)
    totals = np.empty((2, channels))
    dparams = np.empty((2, channels), dtype=weight.dtype)
    if parallel:
        for t in prange(cblocks):
            _rows_grad_task(
                x, t, cblocks, k, blocks, count, p, centered, part, top, first, col_center,
                stats, weight, coef, argmax_at, addend, totals, dparams,
            )  # fmt: skip
    else:
        for t in range(cblocks):
            _rows_grad_task(
                x, t, cblocks, k, blocks, count, p, centered, part, top, first, col_center,
                stats, weight, coef, argmax_at, addend, totals, dparams,
            )  # fmt: skip
    if need_dx:
        if parallel:
            for t in prange(row_blocks):
                _rows_dx_task(dy, x, t, v_rows, row_blocks, p, coef, kept, dx)
        else:
            _rows_dx_task(dy, x, np.int64(0), v_rows, np.int64(1), p, coef, kept, dx)
        _add_at_argmax(dx, argmax_at, addend)
    return dparams


forward_planar_serial = _serial_twin(forward_planar)
forward_rows_serial = _serial_twin(forward_rows)
backward_planar_serial = _serial_twin(backward_planar)
backward_rows_serial = _serial_twin(backward_rows)
