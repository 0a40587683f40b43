"""C entry points of the loops (numba ``cfunc``), called by the native glue (:mod:`.native`).

Each entry takes raw pointers and sizes, wraps them as arrays (``numba.carray``, no copy) and
runs the same driver the Python path calls (:mod:`.loops.drivers`, :mod:`.loops.eval_pass`), so
both paths compute the same numbers. BatchNorm, lp, ghost batches and noise come here (not
renorm: its arguments are the empty arrays the drivers take for "none").

An entry is compiled on first use for one (driver, parallel, dtype) and cached on disk like the
loops. The Python Function path calls the drivers through twins of its own
(:func:`python_driver`), which pass ``parallel`` as the entries do, so that both paths share
one compilation of each driver. numba checks a cached function against its own source file
only, not against the loops it calls, so each entry's name carries the digest of every loop
module (:func:`.loops.cache_locator.source_digest`, the loops' own cache stamp): edited loops
get entries of their own instead of stale cached ones.

Arguments, in order (``P``: pointer to the input dtype, ``D``: pointer to float64):

* forward: x P, y P, weight P, bias P, running mean P, running second P, stats D (5, G, C);
  n0, n1, n2, v, blocks, row_blocks; p (negative: lp's un-centred form), eps, momentum;
  kind; noise D, noise count, key; kept P, keep.
  Planar: (n0, n1, n2) = (N, C, S), ``v`` samples per group. Rows: (M, C * k, k), ``v`` rows
  per group. ``kind`` 0: the running pointers are unused (may be null). noise: the
  configuration (n_mu, n_sigma, r_mu, r_sigma), count 4, or count 0 for none; key:
  the noise key packed in one int64 (low word first); kept: x's shape, receives the noise
  multipliers s for the backward when ``keep`` is 1 (unused, may be null, when 0).
* backward: dy P, x P, dx P, stats D, weight P, dparams P (2, C); n0, n1, n2, v, blocks,
  row_blocks; p; need_dx; kept P (the forward's s), keep (1 with noise, else 0: unused).
* eval: x P, y P, mean P, spread P, weight P, bias P; n0, n1, n2, row_blocks; eps; is_var.
"""

from __future__ import annotations

import types as pytypes
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types

from bnlab.functional.kernels.loops import drivers, eval_pass
from bnlab.functional.kernels.loops.cache_locator import source_digest
from bnlab.functional.kernels.runtime import load_loops

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
    noisep, nnoise, key, keptp, keep,
):  # fmt: skip
    x = carray(xp, (n0, n1, n2))
    y = carray(yp, (n0, n1, n2))
    tracked = n1 if kind != 0 else 0
    stats = carray(statsp, (5, (n0 + v - 1) // v, n1))
    _DRIVER(
        x, v, blocks, row_blocks, p, eps, carray(wp, (n1,)), carray(bp, (n1,)),
        np.empty((0, 0)), np.zeros(2), carray(mp, (tracked,)), carray(sp, (tracked,)),
        momentum, kind, carray(noisep, (nnoise,)), _key(key),
        carray(keptp, (n0 * keep, n1, n2)), y, stats, _PARALLEL,
    )  # fmt: skip


def _forward_rows(
    xp, yp, wp, bp, mp, sp, statsp, n0, n1, n2, v, blocks, row_blocks, p, eps, momentum, kind,
    noisep, nnoise, key, keptp, keep,
):  # fmt: skip
    x = carray(xp, (n0, n1))
    y = carray(yp, (n0, n1))
    channels = n1 // n2
    tracked = channels if kind != 0 else 0
    stats = carray(statsp, (5, (n0 + v - 1) // v, channels))
    _DRIVER(
        x, n2, v, blocks, row_blocks, p, eps, carray(wp, (channels,)), carray(bp, (channels,)),
        np.empty((0, 0)), np.zeros(2), carray(mp, (tracked,)), carray(sp, (tracked,)),
        momentum, kind, carray(noisep, (nnoise,)), _key(key), carray(keptp, (n0 * keep, n1)),
        y, stats, _PARALLEL,
    )  # fmt: skip


def _backward_planar(
    dyp, xp, dxp, statsp, wp, dpp, n0, n1, n2, v, blocks, row_blocks, p, need, keptp, keep,
):  # fmt: skip
    x = carray(xp, (n0, n1, n2))
    groups = (n0 + v - 1) // v
    dparams = _DRIVER(
        carray(dyp, (n0, n1, n2)), x, v, blocks, row_blocks, p,
        carray(statsp, (5, groups, n1)), carray(wp, (n1,)), carray(keptp, (n0 * keep, n1, n2)),
        carray(dxp, (n0, n1, n2)), need != 0, _PARALLEL,
    )  # fmt: skip
    carray(dpp, dparams.shape)[...] = dparams


def _backward_rows(
    dyp, xp, dxp, statsp, wp, dpp, n0, n1, n2, v, blocks, row_blocks, p, need, keptp, keep,
):  # fmt: skip
    x = carray(xp, (n0, n1))
    channels = n1 // n2
    groups = (n0 + v - 1) // v
    dparams = _DRIVER(
        carray(dyp, (n0, n1)), x, n2, v, blocks, row_blocks, p,
        carray(statsp, (5, groups, channels)), carray(wp, (channels,)),
        carray(keptp, (n0 * keep, n1)), carray(dxp, (n0, n1)), need != 0, _PARALLEL,
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


# The Python Function path's calls (:class:`bnlab.functional.kernels.FusedTrainNorm`): the
# same drivers, with ``parallel`` passed as the constant of the twin, as the C entries pass it.
# numba types a constant argument as a literal and prunes the branch it decides, so the
# driver compiled here is the entry's (one compilation serves both paths); a driver called
# from Python with a run-time bool compiled both branches again, gufuncs included (most of a
# parallel driver's compile time).


def _py_forward_planar(
    x, v, blocks, row_blocks, p, eps, weight, bias, running, limits, track_mean, track_second,
    momentum, kind, noise, key, kept, y, stats,
):  # fmt: skip
    return _DRIVER(
        x, v, blocks, row_blocks, p, eps, weight, bias, running, limits, track_mean,
        track_second, momentum, kind, noise, key, kept, y, stats, _PARALLEL,
    )  # fmt: skip


def _py_forward_rows(
    x, k, v_rows, blocks, row_blocks, p, eps, weight, bias, running, limits, track_mean,
    track_second, momentum, kind, noise, key, kept, y, stats,
):  # fmt: skip
    return _DRIVER(
        x, k, v_rows, blocks, row_blocks, p, eps, weight, bias, running, limits, track_mean,
        track_second, momentum, kind, noise, key, kept, y, stats, _PARALLEL,
    )  # fmt: skip


def _py_backward_planar(dy, x, v, blocks, row_blocks, p, stats, weight, kept, dx, need):
    return _DRIVER(dy, x, v, blocks, row_blocks, p, stats, weight, kept, dx, need, _PARALLEL)


def _py_backward_rows(dy, x, k, v_rows, blocks, row_blocks, p, stats, weight, kept, dx, need):
    return _DRIVER(
        dy, x, k, v_rows, blocks, row_blocks, p, stats, weight, kept, dx, need, _PARALLEL
    )


def _py_eval_planar(x, mean, spread, eps, is_var, weight, bias, y, row_blocks):
    _DRIVER(x, mean, spread, eps, is_var, weight, bias, y, row_blocks, _PARALLEL)


def _py_eval_rows(x, k, mean, spread, eps, is_var, weight, bias, y, row_blocks):
    _DRIVER(x, k, mean, spread, eps, is_var, weight, bias, y, row_blocks, _PARALLEL)


ARGUMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "forward": (
        ("xp", "P"), ("yp", "P"), ("wp", "P"), ("bp", "P"), ("mp", "P"), ("sp", "P"),
        ("statsp", "D"), ("n0", "I"), ("n1", "I"), ("n2", "I"), ("v", "I"), ("blocks", "I"),
        ("row_blocks", "I"), ("p", "F"), ("eps", "F"), ("momentum", "F"), ("kind", "I"),
        ("noisep", "D"), ("nnoise", "I"), ("key", "I"), ("keptp", "P"), ("keep", "I"),
    ),
    "backward": (
        ("dyp", "P"), ("xp", "P"), ("dxp", "P"), ("statsp", "D"), ("wp", "P"), ("dpp", "P"),
        ("n0", "I"), ("n1", "I"), ("n2", "I"), ("v", "I"), ("blocks", "I"), ("row_blocks", "I"),
        ("p", "F"), ("need", "I"), ("keptp", "P"), ("keep", "I"),
    ),
    "eval": (
        ("xp", "P"), ("yp", "P"), ("mp", "P"), ("sp", "P"), ("wp", "P"), ("bp", "P"),
        ("n0", "I"), ("n1", "I"), ("n2", "I"), ("row_blocks", "I"), ("eps", "F"),
        ("is_var", "I"),
    ),
}  # fmt: skip
"""The C interface of the entries, per stage: (parameter name, type) in order; types ``P``
pointer to the input dtype, ``D`` pointer to float64, ``I`` int64, ``F`` float64 (see the
module docstring). The templates' parameters and the cfunc signatures follow it, and a test
checks native.cpp's function pointer types against it (tests/test_kernel_structure.py)."""


def _signature(stage: str, dtype: Any) -> Any:
    codes = {
        "P": types.CPointer(dtype), "D": types.CPointer(types.float64), "I": types.int64,
        "F": types.float64,
    }  # fmt: skip
    return types.void(*(codes[code] for _, code in ARGUMENTS[stage]))


_TEMPLATES: dict[str, tuple[Callable[..., None], Any]] = {
    "forward_planar": (_forward_planar, drivers),
    "forward_rows": (_forward_rows, drivers),
    "backward_planar": (_backward_planar, drivers),
    "backward_rows": (_backward_rows, drivers),
    "eval_planar": (_eval_planar, eval_pass),
    "eval_rows": (_eval_rows, eval_pass),
}
TEMPLATES: tuple[str, ...] = tuple(_TEMPLATES)
"""Every entry's name, ``stage_layout`` (what :func:`address` and :func:`python_driver` take)."""
_PY_TEMPLATES: dict[str, Callable[..., Any]] = {
    "forward_planar": _py_forward_planar,
    "forward_rows": _py_forward_rows,
    "backward_planar": _py_backward_planar,
    "backward_rows": _py_backward_rows,
    "eval_planar": _py_eval_planar,
    "eval_rows": _py_eval_rows,
}
_compiled: dict[tuple[str, bool, str], Any] = {}
"""The compiled entries, kept alive: an address is valid while its entry is."""
_python: dict[tuple[str, bool], Any] = {}


def _twin(name: str, parallel: bool, python: bool = False) -> Callable[..., Any]:
    """The template of ``name`` (the C entry's, or with ``python`` the Python path's) bound to
    its driver (serial or parallel build)."""
    module = _TEMPLATES[name][1]
    template = _PY_TEMPLATES[name] if python else _TEMPLATES[name][0]
    suffix = "" if parallel else "_serial"
    env = dict(template.__globals__)
    env["_DRIVER"] = getattr(module, name + suffix)
    env["_PARALLEL"] = parallel
    qualname = f"{name}{suffix}_{'python' if python else 'entry'}_{source_digest()[:12]}"
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
        load_loops()
        stage = name.split("_")[0]
        numba_dtype = types.float32 if key[2] == "float32" else types.float64
        compiled = cfunc(_signature(stage, numba_dtype), cache=True)(_twin(name, parallel))
        _compiled[key] = compiled
    found: int = compiled.address
    return found


def python_driver(name: str, parallel: bool) -> Any:
    """The driver ``name`` (a key of the templates) for the Python Function path, called with
    the driver's arguments less ``parallel``: compiled on first use per dtype (numba ``njit``,
    cached on disk), sharing the driver's compilation with the C entry (see the templates)."""
    key = (name, parallel)
    found = _python.get(key)
    if found is None:
        load_loops()
        found = _python[key] = njit(cache=True)(_twin(name, parallel, python=True))
    return found
