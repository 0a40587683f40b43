"""Statistics: per task partial sums of (x - shift), (x - shift)^2 or min/max; shift = the
group's first value of the channel, so a channel with mean 1e4 and unit std loses nothing.
p = 2 and p = inf: one read of x. p = 1: a second read for sum |x - mean|. Then the per-(group,
channel) statistics, the running buffers' update and the normalize pass's coefficients."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from bnlab.functional.kernels.loops.loop_common import (
    _A,
    _B,
    _CHUNK,
    _MEAN_HI,
    _MEAN_LO,
    _REDUCE,
    _SHORT_ROW,
    MEAN,
    SCALE,
    SPREAD,
    D,
    R,
    _block,
)


@njit(cache=True, fastmath=_REDUCE)
def _planar_sums_task(x, t, v, blocks, p, part):
    """Partial sums of task t (block b of (group g, channel c)) over d = x - shift,
    shift = the group's first value of the channel: s1 = sum d and s2 = sum d^2 (p = 2), s1
    (p = 1), s1, min d and max d (p = inf), into column t of ``part``.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_dispersion``."""
    n_total, c_total, size = x.shape
    b = t % blocks
    gc = t // blocks
    g, c = gc // c_total, gc % c_total
    n0, n1 = _block(g * v, min(n_total, (g + 1) * v), b, blocks)
    shift = x[g * v, c, 0]
    s1 = 0.0
    s2 = 0.0
    lo = math.inf
    hi = -math.inf
    if p == 2.0:
        for n in range(n0, n1):
            for s in range(size):
                d = np.float64(x[n, c, s] - shift)
                s1 += d
                s2 += d * d
    elif p == 1.0:
        for n in range(n0, n1):
            for s in range(size):
                s1 += np.float64(x[n, c, s] - shift)
    else:
        for n in range(n0, n1):
            for s in range(size):
                d = np.float64(x[n, c, s] - shift)
                s1 += d
                lo = min(lo, d)
                hi = max(hi, d)
    part[0, t] = s1
    part[1, t] = s2
    part[2, t] = lo
    part[3, t] = hi


@njit(cache=True, fastmath=_REDUCE)
def _planar_absdev_task(x, t, v, blocks, mean, part):
    """p = 1's second read: part[1, t] = sum |x - mean[g, c]| over task t's values.
    Implements (a part of) ``reference.lp_dispersion``."""
    n_total, c_total, size = x.shape
    b = t % blocks
    gc = t // blocks
    g, c = gc // c_total, gc % c_total
    n0, n1 = _block(g * v, min(n_total, (g + 1) * v), b, blocks)
    m = mean[g, c]
    acc = 0.0
    for n in range(n0, n1):
        for s in range(size):
            acc += abs(np.float64(x[n, c, s]) - m)
    part[1, t] = acc


@njit(cache=True, inline="always")
def _shifted4(x, r, c, k):
    """x[r .. r + 3, c] - k, each difference in x's dtype, as float64.
    A helper: no equation of its own."""
    return (
        np.float64(x[r, c] - k), np.float64(x[r + 1, c] - k),
        np.float64(x[r + 2, c] - k), np.float64(x[r + 3, c] - k),
    )  # fmt: skip


@njit(cache=True, fastmath=_REDUCE)
def _rows_sums_task(x, t, v_rows, blocks, p, part):
    """Row layout of :func:`_planar_sums_task`: per-column partial sums of block b of
    group g's rows into ``part[:, t]`` (s1, s2; lo, hi for p = inf).
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_dispersion``."""
    m_total, c_total = x.shape
    g, b = t // blocks, t % blocks
    r0, r1 = _block(g * v_rows, min(m_total, (g + 1) * v_rows), b, blocks)
    shift = x[g * v_rows]
    extremes = p != 1.0 and p != 2.0  # part has rows lo, hi only then
    s1, s2 = part[0, t], part[1, t]
    lo, hi = (part[2, t], part[3, t]) if extremes else (s1, s2)
    for c in range(c_total):
        s1[c] = 0.0
        s2[c] = 0.0
    if extremes:
        for c in range(c_total):
            lo[c] = math.inf
            hi[c] = -math.inf
    # Short rows take four rows per sweep over the accumulators (each sweep loads and stores
    # every s1[c] and s2[c] once): (131072, 16) 2.3x, (65536, 64) 1.3x faster. Rows of 128 and
    # 256 float32 measured slower that way when the tensor is larger than the cache ((16384,
    # 256): 2.3 ms against 1.3), so they keep one row per sweep.
    r4 = r0 + (r1 - r0) // 4 * 4 if c_total <= _SHORT_ROW else r0
    if p == 2.0:
        for r in range(r0, r4, 4):
            for c in range(c_total):
                d0, d1, d2, d3 = _shifted4(x, r, c, shift[c])
                s1[c] += (d0 + d1) + (d2 + d3)
                s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(r4, r1):
            for c in range(c_total):
                d = np.float64(x[r, c] - shift[c])
                s1[c] += d
                s2[c] += d * d
    elif p == 1.0:
        for r in range(r0, r4, 4):
            for c in range(c_total):
                d0, d1, d2, d3 = _shifted4(x, r, c, shift[c])
                s1[c] += (d0 + d1) + (d2 + d3)
        for r in range(r4, r1):
            for c in range(c_total):
                s1[c] += np.float64(x[r, c] - shift[c])
    else:
        for r in range(r0, r4, 4):
            for c in range(c_total):
                d0, d1, d2, d3 = _shifted4(x, r, c, shift[c])
                s1[c] += (d0 + d1) + (d2 + d3)
                lo[c] = min(lo[c], min(min(d0, d1), min(d2, d3)))
                hi[c] = max(hi[c], max(max(d0, d1), max(d2, d3)))
        for r in range(r4, r1):
            for c in range(c_total):
                d = np.float64(x[r, c] - shift[c])
                s1[c] += d
                lo[c] = min(lo[c], d)
                hi[c] = max(hi[c], d)


@njit(cache=True, fastmath=_REDUCE)
def _rows_absdev_task(x, t, v_rows, blocks, mean, part):
    """Row layout of :func:`_planar_absdev_task`: per column, sum |x - mean[g]|.
    Implements (a part of) ``reference.lp_dispersion``."""
    m_total, c_total = x.shape
    g, b = t // blocks, t % blocks
    r0, r1 = _block(g * v_rows, min(m_total, (g + 1) * v_rows), b, blocks)
    m = mean[g]
    acc = part[1, t]
    for c in range(c_total):
        acc[c] = 0.0
    for r in range(r0, r1):
        for c in range(c_total):
            acc[c] += abs(np.float64(x[r, c]) - m[c])


@njit(cache=True, inline="always")
def _rows_merge_unit(shift, part, p, scratch):
    """Scratch rows first, s1, s2, lo, hi of a batch of channels with one column each from
    part (rows, blocks, batch): the blocks' sums in order, as the column merge adds them.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_dispersion``."""
    width = shift.shape[0]
    first, s1, s2, lo, hi = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    for i in range(width):
        first[i] = np.float64(shift[i])
        s1[i], s2[i], lo[i], hi[i] = 0.0, 0.0, math.inf, -math.inf
    for b in range(part.shape[1]):
        a1, a2 = part[0, b], part[1, b]
        for i in range(width):
            s1[i] += a1[i]
        for i in range(width):
            s2[i] += a2[i]
        if p != 1.0 and p != 2.0:
            a_lo, a_hi = part[2, b], part[3, b]
            for i in range(width):
                lo[i] = min(lo[i], a_lo[i])
            for i in range(width):
                hi[i] = max(hi[i], a_hi[i])


@njit(cache=True, inline="always")
def _rows_merge_channel(shift, part, g, blocks, c, k, n, first, p, means_only):
    """(s1, s2, lo, hi) of channel c's k columns re-centred on ``first`` (see
    :func:`_rows_stats_task`); p = 1 after the absolute deviations: s2 is their plain sum.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_dispersion``."""
    s1, s2, lo, hi = 0.0, 0.0, math.inf, -math.inf
    for j in range(c * k, (c + 1) * k):
        j1, j2, j_lo, j_hi = 0.0, 0.0, math.inf, -math.inf
        for b in range(blocks):
            j1 += part[0, g * blocks + b, j]
            j2 += part[1, g * blocks + b, j]
            if p != 1.0 and p != 2.0:
                j_lo = min(j_lo, part[2, g * blocks + b, j])
                j_hi = max(j_hi, part[3, g * blocks + b, j])
        delta = np.float64(shift[j]) - first
        s1 += j1 + n * delta
        s2 += j2 + 2.0 * delta * j1 + n * delta * delta
        lo = min(lo, j_lo + delta)
        hi = max(hi, j_hi + delta)
    if p == 1.0 and not means_only:  # part[1]: absolute deviations, not shifted
        s2 = 0.0
        for b in range(blocks):
            for j in range(c * k, (c + 1) * k):
                s2 += part[1, g * blocks + b, j]
    return s1, s2, lo, hi


@njit(cache=True, error_model="numpy")
def _rows_stats_task(
    t, col_mean, stats, coef, x, cblocks, v_rows, k, blocks, rows, count, p, centered, eps, part,
    running, limits, weight, bias, track_mean, track_second, momentum, track_kind,
):  # fmt: skip
    """Channels of block t of ``cblocks``, every group: merge the per-(task, column) partials
    into per-channel sums re-centred on the channel's first column's shift (sum (x - K) =
    S1 + n delta, sum (x - K)^2 = S2 + 2 delta S1 + n delta^2, delta = K_column - K), then the
    stats, the per-column coefficients and the running buffers. ``col_mean`` not empty (p = 1,
    before the absolute deviations): only the means, into stats MEAN and col_mean per column.

    Rows of stats, coef and part lie a multiple of 4 KiB apart (C = 4096: 32 KiB per group):
    a loop that touches many of them at once thrashes the L1 sets (and 4k-aliases loads with
    stores), measured 13 ns per (group, channel). So a batch of channels goes through scratch
    rows, and each output row is written by a loop of its own.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_dispersion``."""
    channels = x.shape[1] // k
    c0, c1 = _block(0, channels, t, cblocks)
    means_only = col_mean.shape[0] != 0
    scratch = np.empty((5, _CHUNK + 8))  # padded: scratch rows are not 4 KiB apart
    first, s1, s2, lo, hi = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    fin = np.empty((5, _CHUNK + 8))
    for g in range(rows.shape[0]):
        n = rows[g]
        m = count[g]
        shift = x[g * v_rows]
        for ca in range(c0, c1, _CHUNK):
            cb = min(c1, ca + _CHUNK)
            width = cb - ca
            if k == 1:  # delta = 0: the block sums add up, row by row (loops that vectorize)
                _rows_merge_unit(
                    shift[ca:cb], part[:, g * blocks : (g + 1) * blocks, ca:cb], p, scratch
                )
            else:
                for i in range(width):
                    c = ca + i
                    first[i] = np.float64(shift[c * k])
                    s1[i], s2[i], lo[i], hi[i] = _rows_merge_channel(
                        shift, part, g, blocks, c, k, n, first[i], p, means_only
                    )
            if means_only:
                mean_row = stats[MEAN, g, ca:cb]
                for i in range(width):
                    mean_row[i] = first[i] + s1[i] / m
                for i in range(width):
                    for j in range((ca + i) * k, (ca + i + 1) * k):
                        col_mean[g, j] = mean_row[i]
                continue
            # The stats are finished in scratch rows (fin), then each output row is written by
            # a copy loop of its own, and the coefficients are read from fin: the rows of stats
            # lie a multiple of 4 KiB apart, so reading one while writing another stalled on
            # 4K aliasing (one thread, (1024, 4096) in groups of 32: 1.24 ms for the 131072
            # (group, channel) pairs, 0.76 ms now; most of the rest is the division per pair).
            if p == 2.0 and centered and running.shape[0] != 2:  # BN: a loop that vectorizes
                for i in range(width):
                    mean_shifted = s1[i] / m
                    var = max(s2[i] / m - mean_shifted * mean_shifted, 0.0)
                    fin[MEAN, i] = first[i] + mean_shifted
                    fin[SPREAD, i] = mean_shifted if math.isnan(mean_shifted) else var
                for i in range(width):
                    fin[SCALE, i] = math.sqrt(fin[SPREAD, i] + eps)
                    fin[R, i] = 1.0
                    fin[D, i] = 0.0
            else:
                for i in range(width):
                    c = ca + i
                    values = _finish_one(
                        s1[i], s2[i], lo[i], hi[i], first[i], m, p, centered, eps, running,
                        limits, c,
                    )  # fmt: skip
                    fin[MEAN, i], fin[SPREAD, i], fin[SCALE, i], fin[R, i], fin[D, i] = values
            for row in range(5):
                out, done = stats[row, g, ca:cb], fin[row]
                for i in range(width):
                    out[i] = done[i]
            _store_coefficient_rows(fin, ca, cb, weight, bias, k, coef[:, g])
    if not means_only:
        _update_running(stats, count, track_mean, track_second, momentum, track_kind, c0, c1)


@njit(cache=True)
def _finish_stats(part, shift, count, p, centered, eps, running, limits, stats):
    """(4, G, C) sums -> stats rows MEAN, SPREAD, SCALE, R, D.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_scale``,
    ``reference.batch_renorm_forward``."""
    groups, channels = shift.shape
    for g in range(groups):
        for c in range(channels):
            s1, s2, lo, hi = part[0, g, c], part[1, g, c], part[2, g, c], part[3, g, c]
            _finish_into(
                stats, g, c, s1, s2, lo, hi, shift[g, c], count[g], p, centered, eps, running,
                limits,
            )  # fmt: skip


@njit(cache=True, inline="always")
def _finish_into(stats, g, c, s1, s2, lo, hi, k, m, p, centered, eps, running, limits):
    """:func:`_finish_one` of (group g, channel c) into the stats rows.
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_scale``,
    ``reference.batch_renorm_forward``."""
    values = _finish_one(s1, s2, lo, hi, k, m, p, centered, eps, running, limits, c)
    stats[MEAN, g, c], stats[SPREAD, g, c], stats[SCALE, g, c] = values[:3]
    stats[R, g, c], stats[D, g, c] = values[3], values[4]


@njit(cache=True, inline="always")
def _finish_one(s1, s2, lo, hi, k, m, p, centered, eps, running, limits, c):
    """(mean, spread, scale, r, d) of channel c from its sums shifted by k over m values (for
    p = 1, s2 is the sum of |x - mean| (``centered``) or of |x|). ``centered`` False: lp's
    un-centred spread, the mean square (p = 2) or max |x| (p = inf).
    Implements (a part of) ``reference.batch_norm_forward``, ``reference.lp_scale``,
    ``reference.batch_renorm_forward``."""
    mean_shifted = s1 / m
    mean = k + mean_shifted
    if p == 2.0:
        spread = max(s2 / m - mean_shifted * mean_shifted, 0.0)
        if not centered:
            spread += mean * mean  # E[x^2] = var + mean^2
        if math.isnan(mean_shifted):
            spread = mean_shifted
        scale = math.sqrt(spread + eps)
    elif p == 1.0:
        spread = s2 / m
        scale = spread + eps
    else:
        if centered:
            spread = max(hi - mean_shifted, mean_shifted - lo)
        else:
            spread = max(k + hi, -(k + lo))
        if math.isnan(mean_shifted):
            spread = mean_shifted
        scale = spread + eps
    r, d = 1.0, 0.0
    if running.shape[0] == 2:
        sigma = math.sqrt(running[1, c] + eps)
        r = min(max(scale / sigma, 1.0 / limits[0]), limits[0])
        d = min(max((mean - running[0, c]) / sigma, -limits[1]), limits[1])
    return mean, spread, scale, r, d


@njit(cache=True)
def _update_running(stats, count, track_mean, track_second, momentum, kind, c0, c1):
    """running <- lerp(running, batch value, momentum) in place, as ``Tensor.lerp_``, for
    channels c0 <= c < c1: the mean, and the unbiased variance (``kind`` 1; averaged over
    groups) or the divisor s (``kind`` 2).
    Implements (a part of) ``reference.running_update``, ``reference.unbiased_variance``."""
    if kind == 0:
        return
    groups = stats.shape[1]
    sums = np.zeros((2, c1 - c0))  # g outer: stats[:, g, c] and [:, g + 1, c] are 4k-aliased
    mean, second = sums[0], sums[1]
    for g in range(groups):
        factor = count[g] / (count[g] - 1.0)
        for c in range(c0, c1):
            mean[c - c0] += stats[MEAN, g, c]
            if kind == 1:
                second[c - c0] += stats[SPREAD, g, c] * factor
            else:
                second[c - c0] += stats[SCALE, g, c]
    for c in range(c0, c1):
        track_mean[c] = _lerp(track_mean[c], mean[c - c0] / groups, momentum)
        track_second[c] = _lerp(track_second[c], second[c - c0] / groups, momentum)


@njit(cache=True, inline="always")
def _lerp(old, end, weight):
    """``torch.lerp``'s formula (in float64; the caller stores it in the buffer's dtype).
    Implements (a part of) ``reference.running_update``."""
    old64 = np.float64(old)
    if weight < 0.5:
        return old64 + weight * (end - old64)
    return end - (end - old64) * (1.0 - weight)


@njit(cache=True)
def _coefficients(stats, weight, bias, coef):
    """y = ((x - mean_hi) - mean_lo) * a + b with a = w r / s, b = w d + bias.
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.batch_renorm_forward``."""
    for g in range(coef.shape[1]):
        _store_coefficient_rows(stats[:, g], 0, coef.shape[2], weight, bias, 1, coef[:, g])


@njit(cache=True, inline="always")
def _store_coefficient_rows(stats, c0, c1, weight, bias, k, coef):
    """:func:`_coefficients` of channels c0 <= c < c1 (stats (5, c1 - c0) rows, from column 0)
    into coef (4, C * k) columns c k to (c + 1) k, one row per loop (indexed from 0).
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.batch_renorm_forward``."""
    dtype = coef.dtype.type
    width = c1 - c0
    mean, scale, r, d = stats[MEAN], stats[SCALE], stats[R], stats[D]
    w, bias_c = weight[c0:c1], bias[c0:c1]
    if k == 1:
        hi_row, lo_row = coef[_MEAN_HI, c0:c1], coef[_MEAN_LO, c0:c1]
        a_row, b_row = coef[_A, c0:c1], coef[_B, c0:c1]
        for i in range(width):  # lo from hi in a register: not re-read from a 4K-aliased row
            hi = dtype(mean[i])
            hi_row[i] = hi
            lo_row[i] = dtype(mean[i] - np.float64(hi))
        for i in range(width):
            a_row[i] = dtype(np.float64(w[i]) * r[i] / scale[i])
        for i in range(width):
            b_row[i] = dtype(np.float64(w[i]) * d[i] + np.float64(bias_c[i]))
        return
    for i in range(width):
        hi = dtype(mean[i])
        lo = dtype(mean[i] - np.float64(hi))
        a = dtype(np.float64(w[i]) * r[i] / scale[i])
        b = dtype(np.float64(w[i]) * d[i] + np.float64(bias_c[i]))
        for j in range((c0 + i) * k, (c0 + i + 1) * k):
            coef[_MEAN_HI, j], coef[_MEAN_LO, j], coef[_A, j], coef[_B, j] = hi, lo, a, b
