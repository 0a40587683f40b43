"""The native glue: the fused kernels behind a C++ autograd node (``native.cpp``).

A Python ``autograd.Function`` costs about 15 us per forward and 25-30 us per backward on this
project's 2-core CPU before any loop runs, which is most of a small layer's time (the README's
benchmark section). The glue is a small torch C++ extension, built with torch's JIT extension
builder on first use (a C++ compiler and ninja are needed; about 30 s, then cached in torch's
extension directory). It calls the numba entry points (:mod:`.entries`) by address and wires a
plain C++ autograd node for the backward: same loops, same numbers, without the Python per
call.

It serves training normalization (BatchNorm, lp, ghost batches, noise; not renorm, which keeps
the Python Function) and eval without gradients. Set ``BNLAB_NATIVE=0`` to turn it
off; when it cannot be built, a warning says why and the Python Function path runs instead.
A backward with ``create_graph=True`` calls back into the torch-op formulas, as the Python
Function does.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from bnlab.functional import noise

SOURCE = Path(__file__).with_name("native.cpp")


def extension_name() -> str:
    """The extension's name, and so its build folder under torch's extensions root: one per
    checkout. torch's builder keys a folder on the name only, and its ninja file names the
    source's path, so two checkouts sharing one name rebuilt each other's glue on every import
    and waited on each other's build lock."""
    digest = hashlib.sha1(str(SOURCE.resolve()).encode(), usedforsecurity=False).hexdigest()
    return f"bnlab_native_{digest[:10]}"


NODE_NAME = "bnlab::TrainNormBackward"
"""``grad_fn.name()`` of an output of the glue."""

_module: Any = None
_state: bool | None = None
"""None: not tried yet; True: built and loaded; False: off or failed (see :func:`status`)."""
_why = ""
_off = False
"""Set by :func:`disabled`: the Python Function path runs even where the glue is built."""
_double_backward: Any = None
"""The double-backward path (torch-op formulas), set by the kernels package
(:func:`use_double_backward`): this module imports neither it nor the ops."""


def use_double_backward(function: Any) -> None:
    """Register the function a backward with ``create_graph=True`` calls (see native.cpp);
    before the glue is loaded, or into the loaded glue."""
    global _double_backward
    _double_backward = function
    if _module is not None:
        _module.set_double_backward(function)


def enabled() -> bool:
    """Whether the glue may be used (``BNLAB_NATIVE`` is not 0)."""
    return os.environ.get("BNLAB_NATIVE", "1") != "0"


def load() -> Any:
    """The built extension module, or None when it is turned off or cannot be built (then a
    warning says why, once per process)."""
    global _module, _state, _why
    if _state is None:
        if not enabled():
            _state, _why = False, "turned off by BNLAB_NATIVE=0"
            return None
        limit = _cache_limit_from_environment()  # a bad value raises here, before any build
        try:
            from torch.utils import cpp_extension

            module = cpp_extension.load(
                name=extension_name(),
                sources=[str(SOURCE)],
                extra_cflags=["-O2"],
                verbose=False,
            )
            if _double_backward is not None:
                module.set_double_backward(_double_backward)
        except Exception as error:  # a missing compiler or ninja, or a failed build
            _state, _why = False, f"{type(error).__name__}: {error}"
            warnings.warn(
                "bnlab: the native kernel glue could not be built, so the kernels run behind "
                f"a Python autograd.Function (slower per call). Reason: {_why}",
                stacklevel=3,
            )
            return None
        _module, _state, _why = module, True, "built"
        if limit is not None:
            module.output_cache(limit)
    return _module


def active() -> Any:
    """The module to call now, or None (turned off, failed, or within :func:`disabled`)."""
    return None if _off else load()


def loaded() -> Any:
    """The module when it is already built and loaded and not within :func:`disabled`, else
    None; never builds it."""
    return _module if _state and not _off else None


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block the kernels run behind the Python autograd.Function (as where the glue
    cannot be built); for tests and comparisons. Not thread-local."""
    global _off
    saved, _off = _off, True
    try:
        yield
    finally:
        _off = saved


def status() -> tuple[bool, str]:
    """(whether the glue is loaded, why not / "built"); builds it if not tried yet."""
    load()
    return bool(_state), _why


def _cache_limit_from_environment() -> int | None:
    text = os.environ.get("BNLAB_OUTPUT_CACHE_MB")
    if text is None:
        return None
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib >= 0:
        raise ValueError(f"BNLAB_OUTPUT_CACHE_MB must be a number of MiB >= 0, got {text!r}")
    return int(mib * 2**20)


def output_cache(limit: int | None = None) -> tuple[int, int]:
    """(bytes held, limit in bytes) of the glue's cache of freed large outputs; with ``limit``,
    sets it first (0: keep nothing, releasing what is held).

    Outputs of 4 MiB and more (y, dx) that the glue allocated go back to this cache when
    freed, and the next output of the same size reuses the block: a training step then pays no
    fresh-page zeroing for them (about 6 ms per 100 MB tensor on this project's 2-core VM).
    The least recently freed blocks are released first when it would hold more than the
    limit: 1 GiB by default, or ``BNLAB_OUTPUT_CACHE_MB`` at load. Builds the glue if it was
    not tried yet; (0, 0) when it is off or cannot be built.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"output cache limit must be >= 0 bytes, got {limit}")
    module = load()
    if module is None:
        return 0, 0
    held, cap = module.output_cache(limit)
    return int(held), int(cap)


def _draw_key(generator: Any) -> int | None:
    """A noise key drawn by the glue (as int64 ``random_`` draws it), or None when the glue is
    not loaded or within :func:`disabled` (then :func:`noise.draw` draws it with a tensor)."""
    glue = loaded()
    return None if glue is None else int(glue.draw_key(generator))


noise.use_key_source(_draw_key)


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    track_mean: Tensor | None,
    track_second: Tensor | None,
    ints: tuple[int, ...],
    reals: tuple[float, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, spread) through the C++ glue, the statistics (G, C) float64; see
    native.cpp for ``ints`` and ``reals``."""
    y, mean, spread = _module.train(x, weight, bias, track_mean, track_second, ints, reals, True)
    return y, mean, spread


def eval_forward(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    ints: tuple[int, ...],
    eps: float,
    is_var: bool,
) -> Tensor:
    y: Tensor = _module.eval(x, mean, spread, weight, bias, ints, eps, is_var)
    return y
