"""The kernels' runtime: loading numba and the loops (on first use, so ``import bnlab`` imports no
numba) and what a forked child may not do (run a parallel region of its parent's OpenMP pool)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

_loops_module: ModuleType | None = None
_numba_found: bool | None = None
_forked_child = False


def _mark_forked_child() -> None:
    # numba's default OpenMP layer (GNU libgomp) cannot run a parallel region in a child forked
    # from a process that used it: forked workers (e.g. the loss-surface pool) run serially.
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_mark_forked_child)


def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    global _numba_found
    if _numba_found is None:
        _numba_found = importlib.util.find_spec("numba") is not None
    return _numba_found


def load_loops() -> Any:
    global _loops_module
    if _loops_module is None:
        # numba's OpenMP pool, started here, resets the process-wide OpenMP thread count that
        # torch reads as its intra-op thread count: keep the user's torch.set_num_threads.
        threads = torch.get_num_threads()
        import numba

        loops = importlib.import_module("bnlab.functional.kernels.loops")
        numba.get_num_threads()  # starts the pool now rather than inside a later call
        torch.set_num_threads(threads)
        _loops_module = loops
    return _loops_module


def forked_child() -> bool:
    """Whether this process was forked from one that had started the kernels' thread pool."""
    return _forked_child
