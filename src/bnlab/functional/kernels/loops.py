"""The numba loops behind ``bnlab.functional.kernels``: imported on first use only.

Each function's docstring states what it computes and names the function of
:mod:`bnlab.functional.reference` (``reference.*``) it implements a part of, or says it is a
helper; ``tests/test_kernel_structure.py`` checks that every one does.

Two memory layouts, each a plain 2-D or 3-D NumPy view of the tensor's buffer:

* planar ``(N, C, S)``: contiguous NCHW-style input of any rank, S = prod(spatial);
* rows ``(M, C)``: channels-last (and (N, C) input), M = N * S rows of C channels.

Statistics are kept per (group, channel): a group is a virtual batch of ``v`` consecutive
samples (Ghost BatchNorm; ``v = N`` for BatchNorm), so every variant runs the same loops.
Per-(group, channel) vectors are float64 throughout; per-element arithmetic stays in the input
dtype except where the centring needs float64 to survive a large mean.

Parallelism: a pass is a list of tasks run with ``prange`` when the tensor is large enough to
pay for waking the thread pool (``parallel``), else serially. Planar reductions split over
(group, channel) and, when those are too few for the cores, over blocks of samples; row-layout
reductions split over blocks of rows, each task accumulating a partial vector over channels.

Per-element noise (noisy BatchNorm, Algorithm 1): a counter-based hash of (channel, logical
position, key) gives a uniform level u and a normal quantile z
(:mod:`bnlab.functional.noise`), deterministically for any number of threads. The forward
drivers take the noise as its configuration (n_mu, n_sigma, r_mu, r_sigma; empty for none)
and the key, and derive the per-channel mu_t, sigma_t from them; an activation a becomes
s a + m, s = sigma_t + r_sigma z, m = mu_t + r_mu u. When a gradient is wanted the forward
keeps s (one value per activation, in the input dtype, as dropout keeps its mask) and the
backward drivers take it: gy = dy s. Making z costs a gather from the 256 KiB quantile table
(about 0.5 ns per value here), more than reading a stored s back; the backward made it again
until this was measured (see the backward pass note).
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
from numba import njit, prange
from numba import types as numba_types
from numba.extending import overload

from bnlab.functional.noise import NORMAL_QUANTILES

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

# A literal int argument (a bare 0 or 1) makes numba compile a separate specialization of the
# called function (Literal[int](1) is a type of its own): calls pass np.int64(0) / np.int64(1).

# Rows of the (5, G, C) float64 statistics array the forward returns and the backward reads.
MEAN, SPREAD, SCALE, R, D = range(5)
# Rows of the (4, C) per-channel noise parameters (float64, or per column in the input dtype).
_MU_T, _SIGMA_T, _R_MU, _R_SIGMA = range(4)
# Rows of the (4, G, C) per-element coefficient array in the input dtype.
_MEAN_HI, _MEAN_LO, _A, _B = range(4)


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


@njit(cache=True, inline="always")
def _block(lo: int, hi: int, b: int, blocks: int) -> tuple[int, int]:
    """Block b of ``blocks`` equal parts of [lo, hi): (start, stop).
    A helper: no equation of its own."""
    span = hi - lo
    return lo + span * b // blocks, lo + span * (b + 1) // blocks


# --------------------------------------------------------------------------------------------
# Statistics: per task partial sums of (x - shift), (x - shift)^2 or min/max; shift = the
# group's first value of the channel, so a channel with mean 1e4 and unit std loses nothing.
# p = 2 and p = inf: one read of x. p = 1: a second read for sum |x - mean|.


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


_SHORT_ROW = 64
"""Rows of at most this many columns are summed four at a time (see _rows_sums_task)."""


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


_CHUNK = 256
"""Channels per batch of the row layout's per-(group, channel) finish (:func:`_rows_stats_task`)."""


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


# --------------------------------------------------------------------------------------------
# Normalize: one read of x, one write of y (with noise kept for a backward, one write of s).


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
    scratch = np.empty(_RUN if noise.shape[1] != 0 and kept.shape[0] == 0 else 0, x.dtype)
    for r in range(r0, r1):
        _planar_normalize_row(
            x, r // c_total, r % c_total, v, coef, noise, key, iota, y, kept, scratch
        )


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
            h = _iota_hash(iota, i, first, k0, k1)
            u, z = _level(h >> _S16, unit, x), _normal(h & _LOW16, x)
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


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always")
def _rows_noisy_normalize(x, r0, r1, v_rows, coef, noise, key, base, k, y, kept):
    """Noise, rows r0..r1 on tiles: y = y_bn s + (mu_t + r_mu u), s = sigma_t + r_sigma z
    per value, y_bn as :func:`_coefficients`, u and z from :func:`_hash_tile`; s is stored in
    ``kept`` (x's shape) for the backward, or (``kept`` empty) in a scratch tile.
    Implements (a part of) ``reference.noisy_batch_norm_forward``."""
    columns = x.shape[1]
    rows, counters, tiles = _noisy_tiles(x, base, k, noise[:2], 4)
    mh, ml, a, b = tiles[0], tiles[1], tiles[2], tiles[3]
    mu, sigma = tiles[4], tiles[5]
    # One value for every channel (the configuration's): scalars.
    r_mu, r_sigma = noise[_R_MU, 0], noise[_R_SIGMA, 0]
    xf, yf = x.reshape(-1), y.reshape(-1)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    draws = np.empty((2, counters.shape[0]), dtype=x.dtype)
    u, z = draws[0], draws[1]
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
            _hash_tile(counters, np.uint32(r * k), k0, k1, n, x, z, u)
            for i in range(n):
                bn = ((xs[i] - mh[i]) - ml[i]) * a[i] + b[i]
                multiplier = sigma[i] + r_sigma * z[i]
                ss[i] = multiplier
                ys[i] = bn * multiplier + (mu[i] + r_mu * u[i])


# --------------------------------------------------------------------------------------------
# Backward: one read of (dy, x) for sum(gy) and sum(gy * (x - mean)) (and sum(sign(x - mean))
# for p = 1), where gy = dy s is the gradient at the BN output (s = 1 without noise); then one
# read of (dy, x) and one write of dx. With noise both passes also read the forward's s. (Made
# again from the hash, z cost the backward more: one thread, float32, (64, 128, 16, 16)
# channels-last, the backward took 7.4 ms making z in both passes, 4.4 ms making it once.)
# p = inf also needs the arg-max of
# |x - mean| per channel: the row layout tracks it per column in the first pass; the planar
# layout adds a scan of x per (group, channel).


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
    scratch = np.empty(_RUN if noise.shape[1] != 0 and kept.shape[0] == 0 else 0, x.dtype)
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


forward_planar_serial = _serial_twin(forward_planar)
forward_rows_serial = _serial_twin(forward_rows)
backward_planar_serial = _serial_twin(backward_planar)
backward_rows_serial = _serial_twin(backward_rows)
