"""The per-element noise of noisy BatchNorm (Algorithm 1) as the loops make it: the keyed
counter hash, its uniform level u and normal z (:mod:`bnlab.functional.noise` mirrors them),
the per-channel noise parameters, the noise counters of the row layout's columns, and the tiles
the noisy row loops run on."""

from __future__ import annotations

import numpy as np
from numba import njit

from bnlab.functional.kernels.loops.loop_common import _MU_T, _R_MU, _R_SIGMA, _SIGMA_T
from bnlab.functional.noise import NORMAL_CENTRE, NORMAL_COEFFICIENTS, TOP_BIT

# The noise hash works on uint32 values, each step wrapped back to uint32 (numba widens
# uint32 * uint32 to 64 bits): LLVM then runs it on 32-bit vector lanes (vpmulld).
_MUL1 = np.uint32(0x7FEB352D)
_MUL2 = np.uint32(0x846CA68B)
_S15 = np.uint32(15)
_S16 = np.uint32(16)
_LEVEL_OFFSET = np.int32(1 - (1 << 16))
_UNIT_SCALE = 1.0 / (1 << 16)
# z (noise.normals): four 12-bit digits of h's low 16 bits and the second hash h2 (of the
# counter XOR _TOP), summed, centred, through an odd polynomial; every step on 32-bit lanes.
# Measured on the 2-core AMD EPYC VM (Zen 4, AVX-512, no SVML), float32, one thread: the
# vectorized hash costs 0.13 ns per value; the exact quantile look-up this replaced (a gather
# from a 2^16-entry table) 0.5 ns alone, and in the channels-last forward it also kept the
# draws in a loop of their own (a gather in the normalizing loop kept LLVM from vectorizing
# it): noisy BatchNorm's forward cost about 1.0 ns per value more than BatchNorm's with the
# table, 0.75 with this polynomial in its place, 0.5 with the draws fused into the normalizing
# loop (:func:`_draws`, called there).
_TOP = np.uint32(TOP_BIT)
_DIGIT = np.uint32(0xFFF)
_S4 = np.uint32(4)
_S8 = np.uint32(8)
_S12 = np.uint32(12)
_S24 = np.uint32(24)
_LOW4 = np.uint32(0xF)
_CENTRE = np.int32(NORMAL_CENTRE)
_C0, _C1, _C2, _C3, _C4 = NORMAL_COEFFICIENTS
# Noise values are hashed from a vector of counters (iota, or a tile's counters) in the loop
# that uses them, which vectorizes. Each such loop indexes its arrays by its own counter from
# 0 (slices, or whole rows): an index such as c0 + i, which LLVM cannot prove non-negative,
# keeps numba's negative-index wraparound and turns each load into a gather.
_RUN = 256


@njit(cache=True, inline="always")
def _hash32(counter: np.uint32, k0: np.uint32, k1: np.uint32) -> np.uint32:
    """lowbias32 (C. Wellons), keyed: mirrored by noise.hash32 (whose counter is taken mod
    2^32, as the uint32 counters here wrap).
    Implements (a part of) ``reference._lowbias32``."""
    x = np.uint32(counter ^ k0)
    x = np.uint32(x ^ (x >> _S16))
    x = np.uint32(x * _MUL1)
    x = np.uint32(x ^ (x >> _S15))
    x = np.uint32(x * _MUL2)
    x = np.uint32(x ^ (x >> _S16))
    return np.uint32(x + k1)


@njit(cache=True, inline="always")
def _level(bits, unit, like):
    """16-bit integer k -> sqrt(3) (2k + 1 - 2^16) / 2^16 in the dtype of the array ``like``
    (unit = sqrt(3) / 2^16 in that dtype): noise.levels. The integer is converted first:
    int32 times float32 would be computed in float64.
    Implements (a part of) ``reference.noise_draws``."""
    return like.dtype.type(np.int32(np.int32(bits) * np.int32(2) + _LEVEL_OFFSET)) * unit


@njit(cache=True, inline="always")
def _normal(h, h2, like):
    """Standard normal z in the dtype of the array ``like`` from the hash h (its low 16 bits)
    and the second hash h2: noise.normals (the four 12-bit digits of (h & 0xFFFF) << 32 | h2,
    summed, centred, scaled by 1/4096, through the odd polynomial), on 32-bit lanes.
    Implements (a part of) ``reference._normal_from_bits``, ``reference.noise_draws``."""
    a = np.uint32(h2 & _DIGIT)
    b = np.uint32(np.uint32(h2 >> _S12) & _DIGIT)
    c = np.uint32(np.uint32(h2 >> _S24) | np.uint32(np.uint32(h & _LOW4) << _S8))
    d = np.uint32(np.uint32(h >> _S4) & _DIGIT)
    total = np.int32(np.int32(np.uint32(np.uint32(a + b) + np.uint32(c + d))) - _CENTRE)
    t = like.dtype.type
    w = t(total) * t(1.0 / 4096)
    w2 = w * w
    return w * (t(_C0) + w2 * (t(_C1) + w2 * (t(_C2) + w2 * (t(_C3) + w2 * t(_C4)))))


@njit(cache=True, inline="always")
def _draws(counter, k0, k1, unit, like):
    """(u, z) of the activation with noise counter ``counter`` (uint32) in the dtype of the
    array ``like`` (unit = 1 / 2^16 in that dtype): u the level of the hash h's high 16 bits, z
    from h and the hash of the counter XOR _TOP (noise.unit_noise).
    Implements (a part of) ``reference.noise_draws``."""
    h = _hash32(counter, k0, k1)
    z = _normal(h, _hash32(np.uint32(counter ^ _TOP), k0, k1), like)
    return _level(h >> _S16, unit, like), z


@njit(cache=True, inline="always")
def _iota_hash(iota, i, first, k0, k1):
    """Hash of counter first + i (uint32, wrapping), i < len(iota) = _RUN. The counter is read
    from the vector iota = 0, 1, ...: hashing a uint32 load keeps LLVM on 32-bit lanes
    (hashing first + i from the loop index, it vectorized over 64-bit lanes at half the speed).
    Implements (a part of) ``reference.noise_draws``."""
    return _hash32(np.uint32(iota[i] + first), k0, k1)


@njit(cache=True)
def _iota():
    """0, 1, ..., _RUN - 1 as uint32: the offsets :func:`_iota_hash` adds to a run's counter.
    A helper: no equation of its own."""
    return np.arange(_RUN, dtype=np.uint32)


@njit(cache=True)
def _hash_run(start, count, key, h):
    """h[i] = hash of counter start + i for i < count, in batches of _RUN as the planar loops
    hash (the tests' window on them).
    Implements (a part of) ``reference.noise_draws``."""
    iota = _iota()
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    for s0 in range(0, count, _RUN):
        first = np.uint32(start + s0)
        out = h[s0 : min(count, s0 + _RUN)]
        for i in range(out.shape[0]):
            out[i] = _iota_hash(iota, i, first, k0, k1)


@njit(cache=True)
def _noise_params(conf, key, channels):
    """Per-channel rows mu_t, sigma_t, r_mu, r_sigma (4, C) float64 from the noise
    configuration ``conf`` (n_mu, n_sigma, r_mu, r_sigma; empty: no noise, (4, 0) returned) and
    the key: mu_t, sigma_t as NoiseDraw.channel_params (same operations, no contraction, so the
    same bits). r_mu and r_sigma are the configuration's, one for all channels: the row loops
    read them as scalars.
    Implements (a part of) ``reference.algorithm1_noise``."""
    if conf.shape[0] == 0:
        return np.empty((4, 0))
    params = np.empty((4, channels))
    k0, k1 = np.uint32(key[1]), np.uint32(key[0])  # the swapped key
    n_mu, n_sigma = conf[0], conf[1]
    for c in range(channels):
        u_mu = (np.float64(_hash32(np.uint32(2 * c), k0, k1)) + 0.5) * 2.0**-32
        u_sigma = (np.float64(_hash32(np.uint32(2 * c + 1), k0, k1)) + 0.5) * 2.0**-32
        params[_MU_T, c] = u_mu * (2 * n_mu) + (-n_mu)
        params[_SIGMA_T, c] = u_sigma * (n_sigma - 1.0) + 1.0
        params[_R_MU, c] = conf[2]
        params[_R_SIGMA, c] = conf[3]
    return params


# The noisy row loops run on tiles: whole rows flattened to one run of about _TILE values, the
# per-column coefficients, noise parameters and counters repeated across the tile's rows once
# (per group), so that a short row (channels-last with few channels) pays no loop set-up of its
# own and the hash, the noise and the normalization run in one vectorized loop. One thread at
# (8192, 32) float32: noisy normalize 0.12 ms against 0.085 ms without noise.
_TILE = 512


@njit(cache=True, inline="always")
def _tile_rows(columns):
    """Rows per tile and values per tile for rows of ``columns`` values.
    A helper: no equation of its own."""
    rows = max(1, _TILE // columns)
    return rows, rows * columns


@njit(cache=True, inline="always")
def _tile_counters(base, k, columns, rows):
    """Counter of each tile value (row t of the tile, column j), less the tile's first row
    times k: base[j] + t k.
    A helper: no equation of its own."""
    counters = np.empty(rows * columns, dtype=np.uint32)
    for t in range(rows):
        for j in range(columns):
            counters[t * columns + j] = np.uint32(base[j] + np.uint32(t * k))
    return counters


@njit(cache=True, inline="always")
def _tile(values, rows, out):
    """out = values (one per column) repeated for each of the tile's rows.
    A helper: no equation of its own."""
    columns = values.shape[0]
    for t in range(rows):
        row = out[t * columns : (t + 1) * columns]
        for j in range(columns):
            row[j] = values[j]


@njit(cache=True, inline="always")
def _noisy_tiles(x, base, k, per_column, n_coef):
    """(rows per tile, tile counters, tiles) for the noisy row loops: ``n_coef`` tiles of
    per-group coefficients (filled by the caller per group), then ``per_column`` tiled.
    A helper: no equation of its own."""
    columns = x.shape[1]
    rows, span = _tile_rows(columns)
    tiles = np.empty((n_coef + per_column.shape[0], span), dtype=x.dtype)
    for j in range(per_column.shape[0]):
        _tile(per_column[j], rows, tiles[n_coef + j])
    return rows, _tile_counters(base, k, columns, rows), tiles


@njit(cache=True)
def _column_base(columns, k, m_total):
    """Noise counter of column j at row r: base[j] + r * k, i.e. c * (N * S) + n * S + s,
    mod 2^32 (wrapping, as the hash takes it).
    A helper: no equation of its own."""
    base = np.empty(columns, dtype=np.uint32)
    for c in range(columns // k):  # no division per column: it cost microseconds per call
        for s in range(k):
            base[c * k + s] = np.uint32(c * (m_total * k) + s)
    return base


@njit(cache=True)
def _noise_columns(noise, k, like):
    """Per-channel noise parameters (4, C) float64 -> per column (4, C * k) in like's dtype.
    Implements (a part of) ``reference.algorithm1_noise``."""
    n_rows, channels = noise.shape
    out = np.empty((n_rows, channels * k), dtype=like.dtype)
    for i in range(n_rows):
        for c in range(channels):
            for s in range(k):
                out[i, c * k + s] = noise[i, c]
    return out
