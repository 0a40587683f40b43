"""Backward: one read of (dy, x) for sum(gy) and sum(gy * (x - mean)) (and sum(sign(x - mean))
for p = 1), where gy = dy s is the gradient at the BN output (s = 1 without noise); then one
read of (dy, x) and one write of dx. With noise both passes also read the forward's s. (Made
again from the hash, z cost the backward more: one thread, float32, (64, 128, 16, 16)
channels-last, the backward took 7.4 ms making z in both passes, 4.4 ms making it once.)
p = inf also needs the arg-max of |x - mean| per channel: the row layout tracks it per column
in the first pass; the planar layout adds a scan of x per (group, channel)."""

from __future__ import annotations

import numpy as np
from numba import njit

from bnlab.functional.kernels.loops.loop_common import (
    _CHUNK,
    _ELEMENTWISE,
    _REDUCE,
    _SHORT_ROW,
    MEAN,
    SCALE,
    D,
    R,
    _block,
)
from bnlab.functional.kernels.loops.noise_draws import _tile, _tile_rows


@njit(cache=True, fastmath=_REDUCE)
def _planar_grad_sums_task(dy, x, t, v, blocks, p, mean, kept, part):
    """Sums of task t; with noise (``kept``: the forward's s, else empty) gy = dy s.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    n_total, c_total, size = x.shape
    b = t % blocks
    gc = t // blocks
    g, c = gc // c_total, gc % c_total
    n0, n1 = _block(g * v, min(n_total, (g + 1) * v), b, blocks)
    m = mean[g, c]
    s_gy = 0.0
    s_gx = 0.0
    s_sign = 0.0
    noisy = kept.shape[0] != 0  # with p = 2 only (NormSpec checks)
    for n in range(n0, n1):
        grad = dy[n, c]
        x_row = x[n, c]
        if noisy:
            s_row = kept[n, c]
            for s in range(size):
                gy = np.float64(grad[s] * s_row[s])
                s_gy += gy
                s_gx += gy * (np.float64(x_row[s]) - m)
            continue
        for s in range(size):
            gy = np.float64(grad[s])
            xc = np.float64(x_row[s]) - m
            s_gy += gy
            s_gx += gy * xc
            if p == 1.0:
                s_sign += (xc > 0.0) - (xc < 0.0)
    part[0, t] = s_gy
    part[1, t] = s_gx
    part[2, t] = s_sign


@njit(cache=True, fastmath=_REDUCE, inline="always")
def _rows_noisy_grad_sums(dy, x, r0, r1, m, kept, s_gy, s_gx):
    """Noise, rows r0..r1 of one group, on tiles (see _TILE): gy = dy s (``kept``: the
    forward's s) summed per tile value, then folded into the per-column sums ``s_gy``,
    ``s_gx`` (which start at 0).
    Implements (a part of) ``reference.noisy_batch_norm_backward``."""
    columns = x.shape[1]
    rows, span = _tile_rows(columns)
    mean = np.empty(span)
    acc_gy, acc_gx = np.zeros(span), np.zeros(span)
    _tile(m, rows, mean)
    dyf, xf, sf = dy.reshape(-1), x.reshape(-1), kept.reshape(-1)
    for r in range(r0, r1, rows):
        n = min(rows, r1 - r) * columns
        lo = r * columns
        dys, xs, ss = dyf[lo : lo + n], xf[lo : lo + n], sf[lo : lo + n]
        for i in range(n):
            gy = np.float64(dys[i] * ss[i])
            acc_gy[i] += gy
            acc_gx[i] += gy * (np.float64(xs[i]) - mean[i])
    for t in range(rows):
        tile_gy = acc_gy[t * columns : (t + 1) * columns]
        tile_gx = acc_gx[t * columns : (t + 1) * columns]
        for j in range(columns):
            s_gy[j] += tile_gy[j]
            s_gx[j] += tile_gx[j]


@njit(cache=True, fastmath=_REDUCE, inline="always")
def _grad_sums4(dy, x, r, m, s_gy, s_gx):
    """Rows r .. r + 3 into the per-column sums of gy = dy and gy (x - m) (short rows: one load
    and store of the sums for four values).
    Implements (a part of) ``reference.batch_norm_backward``."""
    for c in range(x.shape[1]):
        mc = m[c]
        g0, g1 = np.float64(dy[r, c]), np.float64(dy[r + 1, c])
        g2, g3 = np.float64(dy[r + 2, c]), np.float64(dy[r + 3, c])
        s_gy[c] += (g0 + g1) + (g2 + g3)
        s_gx[c] += (g0 * (np.float64(x[r, c]) - mc) + g1 * (np.float64(x[r + 1, c]) - mc)) + (
            g2 * (np.float64(x[r + 2, c]) - mc) + g3 * (np.float64(x[r + 3, c]) - mc)
        )


@njit(cache=True, fastmath=_REDUCE)
def _rows_grad_sums_task(dy, x, t, v_rows, blocks, p, mean, center, kept, part, top, first):
    """Per-column partial sums of block t; p = inf: ``top``/``first`` get each column's
    largest |x - center| (center: the mean, or 0 for the un-centred form) and the first row
    holding it (merged by :func:`_rows_argmax_channel`). With noise (``kept``: the forward's
    s, else empty) gy = dy s.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``."""
    m_total, c_total = x.shape
    g, b = t // blocks, t % blocks
    r0, r1 = _block(g * v_rows, min(m_total, (g + 1) * v_rows), b, blocks)
    m = mean[g]
    centre = center[g]
    # part has a sign row for p = 1 only: elsewhere s_sign stands in for s_gy, never written.
    s_gy, s_gx = part[0, t], part[1, t]
    s_sign = part[2, t] if p == 1.0 else s_gy
    track = p != 1.0 and p != 2.0
    top_t, first_t = (top[t], first[t]) if track else (top[0], first[0])
    for c in range(c_total):
        s_gy[c] = 0.0
        s_gx[c] = 0.0
    if p == 1.0:
        for c in range(c_total):
            s_sign[c] = 0.0
    if track:
        for c in range(c_total):
            top_t[c] = -1.0
            first_t[c] = -1
    if kept.shape[0] != 0:  # with p = 2 only (NormSpec checks)
        if c_total < _SHORT_ROW:
            _rows_noisy_grad_sums(dy, x, r0, r1, m, kept, s_gy, s_gx)
            return
        for r in range(r0, r1):
            for c in range(c_total):
                gy = np.float64(dy[r, c] * kept[r, c])
                s_gy[c] += gy
                s_gx[c] += gy * (np.float64(x[r, c]) - m[c])
        return
    if not track:  # 2-D indexing, no row slices: short rows pay for slices
        if p == 2.0:  # short rows: four rows per sweep, as the forward's sums
            r4 = r0 + (r1 - r0) // 4 * 4 if c_total <= _SHORT_ROW else r0
            for r in range(r0, r4, 4):
                _grad_sums4(dy, x, r, m, s_gy, s_gx)
            r0 = r4
        for r in range(r0, r1):
            if p == 1.0:
                for c in range(c_total):
                    gy = np.float64(dy[r, c])
                    xc = np.float64(x[r, c]) - m[c]
                    s_gy[c] += gy
                    s_gx[c] += gy * xc
                    s_sign[c] += (xc > 0.0) - (xc < 0.0)
            else:
                for c in range(c_total):
                    gy = np.float64(dy[r, c])
                    s_gy[c] += gy
                    s_gx[c] += gy * (np.float64(x[r, c]) - m[c])
        return
    r4 = r0 + (r1 - r0) // 4 * 4 if c_total <= _SHORT_ROW else r0  # p = inf from here
    for r in range(r0, r4, 4):  # short rows: four rows per sweep, as the p = 2 sums
        _grad_sums4(dy, x, r, m, s_gy, s_gx)
        for c in range(c_total):  # the rows in order: strict >, so the first row keeps a tie
            mc = centre[c]
            best, at = top_t[c], first_t[c]
            for i in range(4):
                deviation = abs(np.float64(x[r + i, c]) - mc)
                better = deviation > best
                best = deviation if better else best
                at = r + i if better else at
            top_t[c] = best
            first_t[c] = at
    for r in range(r4, r1):
        grad, x_row = dy[r], x[r]
        for c in range(c_total):
            gy = np.float64(grad[c])
            s_gy[c] += gy
            s_gx[c] += gy * (np.float64(x_row[c]) - m[c])
        for c in range(c_total):  # a loop of its own, on the row just read: it vectorizes
            deviation = abs(np.float64(x_row[c]) - centre[c])
            better = deviation > top_t[c]  # strict: the first row keeps a tie
            top_t[c] = deviation if better else top_t[c]
            first_t[c] = r if better else first_t[c]


@njit(cache=True)
def _grad_coefficients(sums, stats, count, p, centered, weight, coef, argmax_sign, dparams):
    """dx = A gy + B phi(x - mean) + C per (group, channel); phi = x - mean (p = 2), its sign
    (p = 1), of x itself for the un-centred form; p = inf adds -A (S_gx / s) sign_k at the
    arg-max k (into sums[2]). Also d weight, d bias.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference._dispersion_gradient``."""
    groups, channels = coef.shape[1], coef.shape[2]
    totals = np.zeros((2, channels))
    for g in range(groups):
        for c in range(channels):
            s_gy, s_gx, s_sign = sums[0, g, c], sums[1, g, c], sums[2, g, c]
            sums[2, g, c], total = _store_grad_coefficients(
                s_gy, s_gx, s_sign, argmax_sign[g, c], stats, count[g], p, centered, weight, g,
                c, c, c + 1, coef,
            )  # fmt: skip
            totals[0, c] += total
            totals[1, c] += s_gy
    for c in range(channels):
        dparams[0, c] = totals[0, c]
        dparams[1, c] = totals[1, c]


@njit(cache=True, inline="always")
def _store_grad_coefficients(
    s_gy, s_gx, s_sign, k_sign, stats, m, p, centered, weight, g, c, j0, j1, coef
):  # fmt: skip
    """:func:`_grad_coefficients` of (group g, channel c) into columns j0 <= j < j1 of coef;
    returns (the arg-max addend for p = inf, else s_sign; the group's d weight term).

    Un-centred (lp as the paper defines it): s depends on x, not on x - mean, so its gradient
    skips the mean subtraction's projection (the s_sign and k_sign terms of the offset) and
    phi takes x itself (the coefficients' mean is 0).
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``."""
    s = stats[SCALE, g, c]
    r = stats[R, g, c]
    a = np.float64(weight[c]) * r / s
    mean = stats[MEAN, g, c] if centered else 0.0
    addend = s_sign
    if p == 2.0:
        b = -a * s_gx / (s * s * m)
        offset = -a * s_gy / m
    elif p == 1.0:
        b = -a * s_gx / (s * m)
        offset = -a * s_gy / m
        if centered:
            offset += a * (s_gx / s) * s_sign / (m * m)
    else:
        b = 0.0
        offset = -a * s_gy / m
        if centered:
            offset += a * (s_gx / s) * k_sign / m
        addend = -a * (s_gx / s) * k_sign
    hi = coef.dtype.type(mean)
    lo = coef.dtype.type(mean - np.float64(hi))
    a_t, b_t, offset_t = coef.dtype.type(a), coef.dtype.type(b), coef.dtype.type(offset)
    for j in range(j0, j1):
        coef[0, g, j] = hi
        coef[1, g, j] = lo
        coef[2, g, j] = a_t
        coef[3, g, j] = b_t
        coef[4, g, j] = offset_t
    return addend, r * s_gx / s + stats[D, g, c] * s_gy


@njit(cache=True, fastmath=_ELEMENTWISE)
def _planar_dx_task(dy, x, t, row_blocks, v, p, coef, kept, dx):
    """dx = a gy + b phi + k over rows (n, c) of block t; gy = dy, or with noise dy s
    (``kept``: the forward's s, else empty).
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    n_total, c_total, _ = x.shape
    r0, r1 = _block(0, n_total * c_total, t, row_blocks)
    for r in range(r0, r1):
        _planar_dx_row(dy, x, r // c_total, r % c_total, v, p, coef, kept, dx)


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _planar_dx_row(dy, x, n, c, v, p, coef, kept, dx):
    """Row (n, c): dx = a gy + b phi(x - mean) + k, phi the identity (p = 2) or the sign
    (p = 1); gy = dy, or with noise dy s (``kept``: the forward's s, else empty).
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    size = x.shape[2]
    g = n // v
    mh, ml, a, b, k = coef[0, g, c], coef[1, g, c], coef[2, g, c], coef[3, g, c], coef[4, g, c]
    if kept.shape[0] != 0:  # p = 2
        dy_row, s_row, x_row, dx_row = dy[n, c], kept[n, c], x[n, c], dx[n, c]
        for s in range(size):
            dx_row[s] = a * (dy_row[s] * s_row[s]) + b * ((x_row[s] - mh) - ml) + k
    elif p == 1.0:
        one_t = x.dtype.type  # the sign in x's dtype: an integer sign made the loop float64
        for s in range(size):
            xc = (x[n, c, s] - mh) - ml
            dx[n, c, s] = a * dy[n, c, s] + b * (one_t(xc > 0) - one_t(xc < 0)) + k
    else:
        for s in range(size):
            dx[n, c, s] = a * dy[n, c, s] + b * ((x[n, c, s] - mh) - ml) + k


@njit(cache=True, fastmath=_ELEMENTWISE)
def _rows_dx_task(dy, x, t, v_rows, row_blocks, p, coef, kept, dx):
    """Row-layout :func:`_planar_dx_task`.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``, ``reference.noisy_batch_norm_backward``."""
    m_total, c_total = x.shape
    r0, r1 = _block(0, m_total, t, row_blocks)
    for g in range(r0 // v_rows, (r1 + v_rows - 1) // v_rows if r1 > r0 else 0):  # as normalize
        mh, ml, a, b, offset = coef[0, g], coef[1, g], coef[2, g], coef[3, g], coef[4, g]
        g0, g1 = max(r0, g * v_rows), min(r1, (g + 1) * v_rows)
        if kept.shape[0] != 0:  # p = 2; gy = dy s
            for r in range(g0, g1):
                for c in range(c_total):
                    gy = dy[r, c] * kept[r, c]
                    dx[r, c] = a[c] * gy + b[c] * ((x[r, c] - mh[c]) - ml[c]) + offset[c]
        elif p == 1.0:
            one_t = x.dtype.type  # the sign in x's dtype (see _planar_dx_row)
            for r in range(g0, g1):
                for c in range(c_total):
                    xc = (x[r, c] - mh[c]) - ml[c]
                    sign = one_t(xc > 0) - one_t(xc < 0)
                    dx[r, c] = a[c] * dy[r, c] + b[c] * sign + offset[c]
        else:
            for r in range(g0, g1):
                for c in range(c_total):
                    dx[r, c] = a[c] * dy[r, c] + b[c] * ((x[r, c] - mh[c]) - ml[c]) + offset[c]


@njit(cache=True)
def _planar_argmax_task(x, gc, v, mean, argmax_at, argmax_sign):
    """The first (in (n, spatial) order) largest |x - mean| of one (group, channel): where
    p = inf's divisor takes its gradient (the reference's tie rule).
    Implements (a part of) ``reference._dispersion_gradient``."""
    n_total, c_total, size = x.shape
    g, c = gc // c_total, gc % c_total
    m = mean[g, c]
    best = -1.0
    for n in range(g * v, min(n_total, (g + 1) * v)):
        for s in range(size):
            xc = np.float64(x[n, c, s]) - m
            if abs(xc) > best:
                best = abs(xc)
                argmax_at[g, c] = (n * c_total + c) * size + s
                argmax_sign[g, c] = (xc > 0.0) - (xc < 0.0)


@njit(cache=True, error_model="numpy")
def _rows_grad_task(
    x, t, cblocks, k, blocks, count, p, centered, part, top, first, col_center, stats, weight,
    coef, argmax_at, addend, totals, dparams,
):  # fmt: skip
    """Channels of block t of ``cblocks``, every group: the per-channel sums from the
    per-(task, column) partials (in task, then column order), the arg-max for p = inf, the dx
    coefficients per column (:func:`_store_grad_coefficients`) and d weight, d bias.
    Implements (a part of) ``reference.batch_norm_backward``,
    ``reference.lp_batch_norm_backward``."""
    columns = x.shape[1]
    c0, c1 = _block(0, columns // k, t, cblocks)
    track = p != 1.0 and p != 2.0
    for c in range(c0, c1):
        totals[0, c] = 0.0
        totals[1, c] = 0.0
    sums = np.empty((3, _CHUNK + 8))  # padded: its rows are not 4 KiB apart
    for g in range(count.shape[0]):
        for ca in range(c0, c1, _CHUNK):
            cb = min(c1, ca + _CHUNK)
            width = cb - ca
            for i in range(3):
                row = sums[i]
                for c in range(width):
                    row[c] = 0.0
            for b in range(blocks):
                for i in range(part.shape[0]):  # the sign row (p = 1 only) stays 0 otherwise
                    row, partial = sums[i], part[i, g * blocks + b]
                    if k == 1:
                        partial = partial[ca:cb]
                        for c in range(width):
                            row[c] += partial[c]
                    else:
                        for c in range(width):
                            for j in range((ca + c) * k, (ca + c + 1) * k):
                                row[c] += partial[j]
            for c in range(ca, cb):
                k_sign = 0.0
                if track:
                    k_sign = _rows_argmax_channel(
                        x, g, c, k, blocks, col_center, top, first, argmax_at
                    )
                s_gy = sums[0, c - ca]
                extra, total = _store_grad_coefficients(
                    s_gy, sums[1, c - ca], sums[2, c - ca], k_sign, stats, count[g], p, centered,
                    weight, g, c, c * k, (c + 1) * k, coef,
                )  # fmt: skip
                if track:
                    addend[g, c] = extra
                totals[0, c] += total
                totals[1, c] += s_gy
    for c in range(c0, c1):
        dparams[0, c] = totals[0, c]
        dparams[1, c] = totals[1, c]


@njit(cache=True, inline="always")
def _rows_argmax_channel(x, g, c, k, blocks, col_center, top, first, argmax_at):
    """The first largest |x - mean| of (group g, channel c) in its logical order, row-major over
    (row, column), from the per-(task, column) maxima of :func:`_rows_grad_sums_task`: the
    largest ``top`` with the smallest flat index. Stores the flat index, returns the sign.
    Implements (a part of) ``reference._dispersion_gradient``."""
    columns = x.shape[1]
    best = -1.0
    at_best = -1
    k_sign = 0.0
    for b in range(blocks):
        for j in range(c * k, (c + 1) * k):
            r = first[g * blocks + b, j]
            if r < 0:
                continue
            at = r * columns + j
            value = top[g * blocks + b, j]
            if value > best or (value == best and at < at_best):
                best = value
                at_best = at
                xc = np.float64(x[r, j]) - col_center[g, j]
                k_sign = (xc > 0.0) - (xc < 0.0)
    argmax_at[g, c] = at_best
    return k_sign


@njit(cache=True)
def _add_at_argmax(dx, argmax_at, addend):
    """p = inf: dx at each (group, channel)'s arg-max (a flat index, -1: none) += its addend.
    Implements (a part of) ``reference._dispersion_gradient``."""
    flat = dx.reshape(-1)
    for g in range(argmax_at.shape[0]):
        for c in range(argmax_at.shape[1]):
            if argmax_at[g, c] >= 0:
                flat[argmax_at[g, c]] += addend[g, c]
