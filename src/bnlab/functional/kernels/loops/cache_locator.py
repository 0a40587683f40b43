"""numba's disk cache for the loops: one source stamp for every loop module.

numba checks a cached function against the stamp of its own source file only (a hash of its
bytes), not against the files of the functions it inlines or calls, nor of the globals it
compiles in as constants: after an edit of :mod:`.noise_draws`, :mod:`.drivers`' cached machine
code would still load. The locators here give every function defined in this package the digest
of all the package's modules (:func:`source_digest`) as its stamp, so an edit of any loop module
recompiles every loop. They keep numba's choice of folder (``NUMBA_CACHE_DIR``, else the
``__pycache__`` beside the source, else the user-wide folder); functions outside this package
keep numba's own locators. Importing this module puts them in front of numba's: the package's
``__init__`` imports it before any loop module, so before any loop is decorated. (A locator
list given in ``NUMBA_CACHE_LOCATOR_CLASSES`` replaces numba's list, and these with it.)
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from numba.core import caching

PACKAGE = Path(__file__).resolve().parent
"""The loops' folder: every module in it is a loop module."""


def source_digest() -> str:
    """SHA-256 (hex) of every loop module's name and bytes, in name order: the loops' cache
    stamp, and the version in the C entries' names (:mod:`bnlab.functional.kernels.entries`).
    Read again when a file's modification time or size changes, as numba reads its stamp."""
    files = sorted(PACKAGE.glob("*.py"))
    return _digest(tuple((path, path.stat().st_mtime_ns, path.stat().st_size) for path in files))


@functools.cache
def _digest(files: tuple[tuple[Path, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _PackageStamp:
    """A locator for the functions of this package only, stamped with :func:`source_digest`."""

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> Any:
        if Path(py_file).resolve().parent != PACKAGE:
            return None
        return super().from_function(py_func, py_file)  # type: ignore[misc]

    def get_source_stamp(self) -> str:
        return source_digest()


class _UserProvidedLocator(_PackageStamp, caching.UserProvidedCacheLocator):
    """numba's ``NUMBA_CACHE_DIR`` locator with the package's stamp."""


class _InTreeLocator(_PackageStamp, caching.InTreeCacheLocator):
    """numba's ``__pycache__`` locator with the package's stamp."""


class _UserWideLocator(_PackageStamp, caching.UserWideCacheLocator):
    """numba's user-wide locator with the package's stamp."""


LOCATORS = (_UserProvidedLocator, _InTreeLocator, _UserWideLocator)
"""In numba's order: each is tried before the next, and all before numba's own."""


def register() -> None:
    """Put :data:`LOCATORS` in front of numba's locators (once per process)."""
    found = caching.CacheImpl._locator_classes
    if not any(locator in found for locator in LOCATORS):
        found[:0] = LOCATORS


register()
