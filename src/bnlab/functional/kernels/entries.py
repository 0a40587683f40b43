"""C entry points of the loops (numba ``cfunc``), called by the native glue (:mod:`.native`).

Each entry takes raw pointers and sizes, wraps them as arrays (``numba.carray``, no copy) and
runs the same driver the Python path calls (:mod:`.loops`, :mod:`.eval_loops`), so both paths
compute the same numbers. BatchNorm, lp, ghost batches and noise come here (not renorm: its
arguments are the empty arrays the drivers take for "none").

An entry is compiled on first use for one (driver, parallel, dtype) and cached on disk like the
loops. numba checks a cached function against its own source file only, not against the loops
it calls, so each entry's name carries a hash of :mod:`.loops` and :mod:`.eval_loops`: edited
loops get entries of their own instead of stale cached ones.

Arguments, in order (``P``: pointer to the input dtype, ``D``: pointer to float64):

* forward: x P, y P, weight P, bias P, running mean P, running second P, stats D (5, G, C);
  n0, n1, n2, v, blocks, row_blocks; p (negative: lp's un-centred form), eps, momentum;
  kind; noise D, noise count, key.
  Planar: (n0, n1, n2) = (N, C, S), ``v`` samples per group. Rows: (M, C * k, k), ``v`` rows
  per group. ``kind`` 0: the running pointers are unused (may be null). noise: the
  configuration (n_mu, n_sigma, r_mu, r_sigma), count 4, or count 0 for none; key:
  the noise key packed in one int64 (low word first).
* backward: dy P, x P, dx P, stats D, weight P, dparams P (2, C); n0, n1, n2, v, blocks,
  row_blocks; p; need_dx; noise D, noise count, key.
* eval: x P, y P, mean P, spread P, weight P, bias P; n0, n1, n2, row_blocks; eps; is_var.
"""

from __future__ import annotations

import functools
import hashlib
import types as pytypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types

from bnlab.functional.kernels import _loops, eval_loops, loops

# Replaced per compiled twin (see _twin): the driver the entry calls and whether it runs on
# the thread pool.
_DRIVER: Any = None
_PARALLEL = False


@njit(cache=True)
def _key(packed):
    """The noise key as the drivers take it: (low word, high word) uint64."""
    key = np.empty(2, dtype=np.uint64)
    key[0] = packed & 0xFFFFFFFF
    key[1] = packed >> 32
    return key


def _forward_planar(
    xp, yp, wp, bp, mp, sp, statsp, n0, n1, n2, v, blocks, row_blocks, p, eps, momentum, kind,
    noisep, nnoise, key,
):  # fmt: skip
    x = carray(xp, (n0, n1, n2))
    y = carray(yp, (n0, n1, n2))
    tracked = n1 if kind != 0 else 0
    stats = carray(statsp, (5, (n0 + v - 1) // v, n1))
    _DRIVER(
        x, v, blocks, row_blocks, p, eps, carray(wp, (n1,)), carray(bp, (n1,)),
        np.empty((0, 0)), np.zeros(2), carray(mp, (tracked,)), carray(sp, (tracked,)),
        momentum, kind, carray(noisep, (nnoise,)), _key(key), y, stats, _PARALLEL,
    )  # fmt: skip


def _forward_rows(
    xp, yp, wp, bp, mp, sp, statsp, n0, n1, n2, v, blocks, row_blocks, p, eps, momentum, kind,
    noisep, nnoise, key,
):  # fmt: skip
    x = carray(xp, (n0, n1))
    y = carray(yp, (n0, n1))
    channels = n1 // n2
    tracked = channels if kind != 0 else 0
    stats = carray(statsp, (5, (n0 + v - 1) // v, channels))
    _DRIVER(
        x, n2, v, blocks, row_blocks, p, eps, carray(wp, (channels,)), carray(bp, (channels,)),
        np.empty((0, 0)), np.zeros(2), carray(mp, (tracked,)), carray(sp, (tracked,)),
        momentum, kind, carray(noisep, (nnoise,)), _key(key), y, stats, _PARALLEL,
    )  # fmt: skip


def _backward_planar(
    dyp, xp, dxp, statsp, wp, dpp, n0, n1, n2, v, blocks, row_blocks, p, need, noisep, nnoise,
    key,
):  # fmt: skip
    x = carray(xp, (n0, n1, n2))
    groups = (n0 + v - 1) // v
    dparams = _DRIVER(
        carray(dyp, (n0, n1, n2)), x, v, blocks, row_blocks, p,
        carray(statsp, (5, groups, n1)), carray(wp, (n1,)), carray(noisep, (nnoise,)),
        _key(key), carray(dxp, (n0, n1, n2)), need != 0, _PARALLEL,
    )  # fmt: skip
    carray(dpp, dparams.shape)[...] = dparams


def _backward_rows(
    dyp, xp, dxp, statsp, wp, dpp, n0, n1, n2, v, blocks, row_blocks, p, need, noisep, nnoise,
    key,
):  # fmt: skip
    x = carray(xp, (n0, n1))
    channels = n1 // n2
    groups = (n0 + v - 1) // v
    dparams = _DRIVER(
        carray(dyp, (n0, n1)), x, n2, v, blocks, row_blocks, p,
        carray(statsp, (5, groups, channels)), carray(wp, (channels,)),
        carray(noisep, (nnoise,)), _key(key), carray(dxp, (n0, n1)), need != 0, _PARALLEL,
    )  # fmt: skip
    carray(dpp, dparams.shape)[...] = dparams


def _eval_planar(xp, yp, mp, sp, wp, bp, n0, n1, n2, row_blocks, eps, is_var):
    _DRIVER(
        carray(xp, (n0, n1, n2)), carray(mp, (n1,)), carray(sp, (n1,)), eps, is_var != 0,
        carray(wp, (n1,)), carray(bp, (n1,)), carray(yp, (n0, n1, n2)), row_blocks, _PARALLEL,
    )  # fmt: skip


def _eval_rows(xp, yp, mp, sp, wp, bp, n0, n1, n2, row_blocks, eps, is_var):
    channels = n1 // n2
    _DRIVER(
        carray(xp, (n0, n1)), n2, carray(mp, (channels,)), carray(sp, (channels,)), eps,
        is_var != 0, carray(wp, (channels,)), carray(bp, (channels,)), carray(yp, (n0, n1)),
        row_blocks, _PARALLEL,
    )  # fmt: skip


_I = types.int64
_F = types.float64


def _signature(stage: str, dtype: Any) -> Any:
    p = types.CPointer(dtype)
    d = types.CPointer(types.float64)
    if stage == "forward":
        return types.void(p, p, p, p, p, p, d, _I, _I, _I, _I, _I, _I, _F, _F, _F, _I, d, _I, _I)
    if stage == "backward":
        return types.void(p, p, p, d, p, p, _I, _I, _I, _I, _I, _I, _F, _I, d, _I, _I)
    return types.void(p, p, p, p, p, p, _I, _I, _I, _I, _F, _I)


_TEMPLATES: dict[str, tuple[Callable[..., None], Any]] = {
    "forward_planar": (_forward_planar, loops),
    "forward_rows": (_forward_rows, loops),
    "backward_planar": (_backward_planar, loops),
    "backward_rows": (_backward_rows, loops),
    "eval_planar": (_eval_planar, eval_loops),
    "eval_rows": (_eval_rows, eval_loops),
}
_compiled: dict[tuple[str, bool, str], Any] = {}
"""The compiled entries, kept alive: an address is valid while its entry is."""


@functools.cache
def _loops_version() -> str:
    """A hash of the loops' sources (see the module docstring)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for module in (loops, eval_loops):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:12]


def _twin(name: str, parallel: bool) -> Callable[..., None]:
    """The template of ``name`` bound to its driver (serial or parallel build)."""
    template, module = _TEMPLATES[name]
    suffix = "" if parallel else "_serial"
    env = dict(template.__globals__)
    env["_DRIVER"] = getattr(module, name + suffix)
    env["_PARALLEL"] = parallel
    qualname = f"{name}{suffix}_entry_{_loops_version()}"
    twin = pytypes.FunctionType(template.__code__, env, qualname, template.__defaults__)
    twin.__qualname__ = qualname
    return twin


def address(name: str, parallel: bool, dtype: str) -> int:
    """The C address of entry ``name`` (a key of the templates) for ``dtype`` ("float32" or
    "float64"), compiled (or loaded from the disk cache) on first use."""
    key = (name, parallel, dtype)
    compiled: Any = _compiled.get(key)
    if compiled is None:
        # The thread pool must be up first: it registers the symbols (allocate_sched, ...)
        # that a parallel entry loaded from the cache links against.
        _loops()
        stage = name.split("_")[0]
        numba_dtype = types.float32 if key[2] == "float32" else types.float64
        compiled = cfunc(_signature(stage, numba_dtype), cache=True)(_twin(name, parallel))
        _compiled[key] = compiled
    found: int = compiled.address
    return found
