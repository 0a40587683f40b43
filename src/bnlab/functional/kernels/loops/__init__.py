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
position, key) gives a uniform level u and, with a second hash, a normal z
(:mod:`bnlab.functional.noise`), deterministically for any number of threads. The forward
drivers take the noise as its configuration (n_mu, n_sigma, r_mu, r_sigma; empty for none)
and the key, and derive the per-channel mu_t, sigma_t from them; an activation a becomes
s a + m, s = sigma_t + r_sigma z, m = mu_t + r_mu u. When a gradient is wanted the forward
keeps s (one value per activation, in the input dtype, as dropout keeps its mask) and the
backward drivers take it: gy = dy s. When that was measured, making z cost a gather from a
256 KiB quantile table (about 0.5 ns per value here), more than reading a stored s back; the
backward had made it again (see the backward pass note). z is now two hashes and a polynomial
(:func:`.noise_draws._normal`), and the backward still reads s.

The modules, by pass: :mod:`.stats_pass` (the statistics, the running buffers, the normalize
coefficients), :mod:`.normalize_pass`, :mod:`.backward_pass`, :mod:`.noise_draws` (the noise
hash, its normal, the noise parameters and the row loops' tiles) and :mod:`.eval_pass` (eval
mode), with what they share in :mod:`.loop_common`; the training drivers the glues call
(:func:`forward_planar`, :func:`forward_rows`, :func:`backward_planar`, :func:`backward_rows`
and their serial twins) in :mod:`.drivers`. :mod:`.cache_locator` keys numba's disk cache of
every loop on all of these files (imported first, before any loop is compiled).
"""

from __future__ import annotations

from bnlab.functional.kernels.loops import cache_locator
from bnlab.functional.kernels.loops.drivers import (
    backward_planar,
    backward_planar_serial,
    backward_rows,
    backward_rows_serial,
    forward_planar,
    forward_planar_serial,
    forward_rows,
    forward_rows_serial,
)
from bnlab.functional.kernels.loops.eval_pass import (
    eval_planar,
    eval_planar_serial,
    eval_rows,
    eval_rows_serial,
)

__all__ = [
    "backward_planar",
    "backward_planar_serial",
    "backward_rows",
    "backward_rows_serial",
    "cache_locator",
    "eval_planar",
    "eval_planar_serial",
    "eval_rows",
    "eval_rows_serial",
    "forward_planar",
    "forward_planar_serial",
    "forward_rows",
    "forward_rows_serial",
]
