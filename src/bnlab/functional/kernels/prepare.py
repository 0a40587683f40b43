"""Build the native glue and compile the kernel entries ahead of their first use.

numba caches a compiled entry on disk next to its source and torch's extension builder keeps
the glue per checkout, so this is the package's build step: ``make install`` runs it (as
``bnlab compile``), and every later process loads what it made. Without it the first process
that needs an entry compiles it (10-40 CPU seconds each, see ``benchmarks/compile_time.py``)
and a fresh clone's first study pays for them.

Entries compile in worker processes, several at a time, each into the shared disk cache; the
glue builds in this process meanwhile (its compiler runs in a process of its own).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Entry:
    """One compiled unit: ``stage_layout`` (a template of :mod:`.entries`), thread-pool build
    or serial, and dtype."""

    name: str
    parallel: bool
    dtype: str

    def __str__(self) -> str:
        return f"{self.name} {'parallel' if self.parallel else 'serial'} {self.dtype}"


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` did: the glue's state ("built" or why not) and each entry's wall
    seconds in its worker (a cache load takes well under one)."""

    glue: str
    entries: dict[str, float]
    seconds: float


def entries_for(dtypes: Iterable[str], parallel: Iterable[bool]) -> list[Entry]:
    """Every template for each dtype and build, the slowest to compile first (the forward and
    backward entries; eval's are small) so the workers finish together."""
    dtypes, parallel = tuple(dtypes), tuple(parallel)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"kernel dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from bnlab.functional.kernels.entries import TEMPLATES

    found = [
        Entry(name, build, dtype) for build in parallel for dtype in dtypes for name in TEMPLATES
    ]
    return sorted(found, key=lambda e: (e.name.startswith("eval"), not e.parallel))


def _compile(entry: Entry) -> float:
    from bnlab.functional.kernels import entries

    start = time.perf_counter()
    entries.address(entry.name, entry.parallel, entry.dtype)
    return time.perf_counter() - start


def prepare(todo: Sequence[Entry], jobs: int = 2, *, glue: bool = True) -> Prepared:
    """Compile ``todo`` in ``jobs`` worker processes (into numba's disk cache) and, with
    ``glue``, build the native glue here meanwhile. Raises ValueError for jobs < 1."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    start = time.perf_counter()
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max(1, min(jobs, len(todo))), mp_context=multiprocessing.get_context(method)
    ) as pool:
        futures = {str(entry): pool.submit(_compile, entry) for entry in todo}
        state = "not asked"
        if glue:
            from bnlab.functional.kernels import native

            state = native.status()[1]
        seconds = {name: future.result() for name, future in futures.items()}
    return Prepared(state, seconds, time.perf_counter() - start)
