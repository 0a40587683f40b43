"""Normalize: one read of x, one write of y (with noise kept for a backward, one write of s)."""

from __future__ import annotations

import numpy as np
from numba import njit

from bnlab.functional.kernels.loops.loop_common import (
    _ELEMENTWISE,
    _MU_T,
    _R_MU,
    _R_SIGMA,
    _SIGMA_T,
    _block,
)
from bnlab.functional.kernels.loops.noise_draws import (
    _RUN,
    _UNIT_SCALE,
    _draws,
    _iota,
    _noisy_tiles,
    _tile,
)


@njit(cache=True, fastmath=_ELEMENTWISE)
def _planar_normalize_task(x, t, row_blocks, v, coef, noise, key, y, kept):
    """Rows (n, c) of block t of ``row_blocks``: a block amortizes the call over many short
    rows (S = 16 for a 4x4 feature map). ``noise``: (4, C) per-channel parameters, or (4, 0);
    ``kept``: where the noise multipliers s go (see :func:`_planar_normalize_row`).
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.noisy_batch_norm_forward``."""
    n_total, c_total, _ = x.shape
    r0, r1 = _block(0, n_total * c_total, t, row_blocks)
    iota = _iota()
    scratch = _row_scratch(noise, kept, x)
    for r in range(r0, r1):
        _planar_normalize_row(
            x, r // c_total, r % c_total, v, coef, noise, key, iota, y, kept, scratch
        )


@njit(cache=True, inline="always")
def _row_scratch(noise, kept, like):
    """Where :func:`_planar_normalize_row` puts a run's noise multipliers when the forward
    keeps none: _RUN values in like's dtype with noise and ``kept`` empty, else empty.
    A helper: no equation of its own."""
    return np.empty(_RUN if noise.shape[1] != 0 and kept.shape[0] == 0 else 0, like.dtype)


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _planar_normalize_row(x, n, c, v, coef, noise, key, iota, y, kept, scratch):
    """Row (n, c): y = ((x - mean_hi) - mean_lo) a + b (see :func:`_coefficients`);
    with noise, y <- y s + m, s = sigma_t + r_sigma z and m = mu_t + r_mu u, u and z hashed
    from the activation's logical position; s is stored in ``kept`` (x's shape) for the
    backward, or (``kept`` empty) in the run of ``scratch`` (_RUN values).
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.noisy_batch_norm_forward``."""
    n_total, _, size = x.shape
    g = n // v
    mh, ml, a, b = coef[0, g, c], coef[1, g, c], coef[2, g, c], coef[3, g, c]
    if noise.shape[1] == 0:
        for s in range(size):
            y[n, c, s] = ((x[n, c, s] - mh) - ml) * a + b
        return
    # In the input dtype, as the torch-op path: y_bn * (sigma_t + r_sigma z) + (mu_t + r_mu u).
    dtype = x.dtype.type
    mu, sigma = dtype(noise[_MU_T, c]), dtype(noise[_SIGMA_T, c])
    r_mu, r_sigma = dtype(noise[_R_MU, c]), dtype(noise[_R_SIGMA, c])
    unit = dtype(_UNIT_SCALE)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    start = (c * n_total + n) * size
    keep = kept.shape[0] != 0
    for s0 in range(0, size, _RUN):
        run = min(_RUN, size - s0)
        first = np.uint32(start + s0)
        x_run, y_run = x[n, c, s0 : s0 + run], y[n, c, s0 : s0 + run]
        s_run = kept[n, c, s0 : s0 + run] if keep else scratch[:run]
        for i in range(run):
            u, z = _draws(np.uint32(iota[i] + first), k0, k1, unit, x)
            multiplier = sigma + r_sigma * z
            s_run[i] = multiplier
            bn = ((x_run[i] - mh) - ml) * a + b
            y_run[i] = bn * multiplier + (mu + r_mu * u)


@njit(cache=True, fastmath=_ELEMENTWISE)
def _rows_normalize_task(x, t, v_rows, row_blocks, coef, noise, key, base, k, y, kept):
    """Rows of block t; ``noise`` (4, C * k) per column in the input dtype, or (4, 0);
    ``kept`` as :func:`_rows_noisy_normalize`.
    Implements (a part of) ``reference.batch_norm_forward``,
    ``reference.lp_batch_norm_forward``, ``reference.noisy_batch_norm_forward``."""
    m_total, c_total = x.shape
    r0, r1 = _block(0, m_total, t, row_blocks)
    if noise.shape[1] != 0:
        _rows_noisy_normalize(x, r0, r1, v_rows, coef, noise, key, base, k, y, kept)
        return
    # By group, then row: a short row (channels-last with few channels) must not pay a
    # division and four slices each (measured 2x at (1024, 16)).
    for g in range(r0 // v_rows, (r1 + v_rows - 1) // v_rows if r1 > r0 else 0):
        mh, ml, a, b = coef[0, g], coef[1, g], coef[2, g], coef[3, g]
        g0, g1 = max(r0, g * v_rows), min(r1, (g + 1) * v_rows)
        for r in range(g0, g1):
            for c in range(c_total):
                y[r, c] = ((x[r, c] - mh[c]) - ml[c]) * a[c] + b[c]


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _rows_noisy_normalize(x, r0, r1, v_rows, coef, noise, key, base, k, y, kept):
    """Noise, rows r0..r1 on tiles: y = y_bn s + (mu_t + r_mu u), s = sigma_t + r_sigma z
    per value, y_bn as :func:`_coefficients`, u and z hashed from the tile's counters in the
    same loop; s is stored in ``kept`` (x's shape) for the backward, or (``kept`` empty) in a
    scratch tile.
    Implements (a part of) ``reference.noisy_batch_norm_forward``."""
    columns = x.shape[1]
    rows, counters, tiles = _noisy_tiles(x, base, k, noise[:2], 4)
    mh, ml, a, b = tiles[0], tiles[1], tiles[2], tiles[3]
    mu, sigma = tiles[4], tiles[5]
    # One value for every channel (the configuration's): scalars.
    r_mu, r_sigma = noise[_R_MU, 0], noise[_R_SIGMA, 0]
    xf, yf = x.reshape(-1), y.reshape(-1)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    unit = x.dtype.type(_UNIT_SCALE)
    keep = kept.shape[0] != 0
    kf = kept.reshape(-1)
    scratch = np.empty(0 if keep else counters.shape[0], dtype=x.dtype)
    for g in range(r0 // v_rows, (r1 + v_rows - 1) // v_rows if r1 > r0 else 0):
        for j in range(4):
            _tile(coef[j, g], rows, tiles[j])
        g0, g1 = max(r0, g * v_rows), min(r1, (g + 1) * v_rows)
        for r in range(g0, g1, rows):
            n = min(rows, g1 - r) * columns
            lo = r * columns
            xs, ys = xf[lo : lo + n], yf[lo : lo + n]
            ss = kf[lo : lo + n] if keep else scratch[:n]
            offset = np.uint32(r * k)
            for i in range(n):
                u, z = _draws(np.uint32(counters[i] + offset), k0, k1, unit, x)
                bn = ((xs[i] - mh[i]) - ml[i]) * a[i] + b[i]
                multiplier = sigma[i] + r_sigma * z
                ss[i] = multiplier
                ys[i] = bn * multiplier + (mu[i] + r_mu * u)
