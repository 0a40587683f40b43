"""The per-element noise of noisy BatchNorm (Algorithm 1) as the loops make it: the keyed
counter hash, its uniform level u and normal quantile z (:mod:`bnlab.functional.noise` mirrors
them), the per-channel noise parameters, the noise counters of the row layout's columns, and the
tiles the noisy row loops run on."""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import types as numba_types
from numba.extending import overload

from bnlab.functional.kernels.loops.loop_common import _MU_T, _R_MU, _R_SIGMA, _SIGMA_T
from bnlab.functional.noise import NORMAL_QUANTILES

# The noise hash works on uint32 values, each step wrapped back to uint32 (numba widens
# uint32 * uint32 to 64 bits): LLVM then runs it on 32-bit vector lanes (vpmulld).
_MUL1 = np.uint32(0x7FEB352D)
_MUL2 = np.uint32(0x846CA68B)
_S15 = np.uint32(15)
_S16 = np.uint32(16)
_LOW16 = np.uint32(0xFFFF)
_LEVEL_OFFSET = np.int32(1 - (1 << 16))
_UNIT_SCALE = 1.0 / (1 << 16)
# z = Phi^-1((k + 1/2) / 2^16) for the hash's low 16 bits k: global arrays, which numba
# compiles in as constants (noise.NORMAL_QUANTILES, the torch-op path's table, and its float32
# rounding, which the torch-op path computes for float32). A float32 loop gathers from the
# 256 KiB float32 table. Measured on the 2-core AMD EPYC VM (Zen 4, AVX-512, no SVML), float32,
# one thread, per value: the vectorized hash 0.13 ns; the look-up 0.5 ns (the loads, not the
# gather instruction: scalar loads cost the same; a 1024-entry table in L1 0.35); an
# arithmetic quantile (Giles' single-precision erfinv with a bit-level log, within 4 float32
# ulp of this table, vectorized) adds 1.2 ns in the row forward loop where the look-up adds
# 0.7, so the table stays. A step makes z twice per value: in the forward and in the
# backward's sums pass (which keeps gy for the dx pass).
_NORMAL = NORMAL_QUANTILES
_NORMAL32 = NORMAL_QUANTILES.astype(np.float32)
# Noise values are hashed per batch into a scratch vector of counters, then turned into u and
# z in the loop that uses them; both loops vectorize. Each such loop indexes its arrays by
# its own counter from 0 (slices, or whole rows): an index such as c0 + i, which LLVM cannot
# prove non-negative, keeps numba's negative-index wraparound and turns each load into a
# gather.
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


def _quantiles(like):
    """The quantile table in the dtype of the array ``like`` (compiled by the overload).
    Implements (a part of) ``reference._normal_quantiles``."""
    raise NotImplementedError("numba only")


@overload(_quantiles, inline="always")
def _quantiles_for(like):
    """The overload behind :func:`_quantiles`: the float32 table for float32 arrays.
    A helper: no equation of its own."""
    if like.dtype == numba_types.float32:
        return lambda like: _NORMAL32
    return lambda like: _NORMAL


@njit(cache=True, inline="always")
def _normal(bits, like):
    """16-bit integer k -> Phi^-1((k + 1/2) / 2^16) in the dtype of the array ``like``:
    noise.normal_levels.
    Implements (a part of) ``reference._normal_quantiles``, ``reference.noise_draws``."""
    return _quantiles(like)[bits]


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


@njit(cache=True, inline="always")
def _hash_tile(counters, offset, k0, k1, n, like, z, u):
    """z[i] (and, when u is not empty, u[i]) of tile values i < n, counter counters[i] + offset:
    the hash and the quantile look-up in a loop of their own. In the loop that uses them, the
    look-up's gather kept LLVM from vectorizing (4 ns per value against 1.2 ns so, one thread,
    (8192, 32) float32).
    Implements (a part of) ``reference.noise_draws``."""
    unit = like.dtype.type(_UNIT_SCALE)
    if u.shape[0] == 0:
        for i in range(n):
            z[i] = _normal(_hash32(np.uint32(counters[i] + offset), k0, k1) & _LOW16, like)
        return
    for i in range(n):
        h = _hash32(np.uint32(counters[i] + offset), k0, k1)
        u[i] = _level(h >> _S16, unit, like)
        z[i] = _normal(h & _LOW16, like)


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
