"""Test hooks that make a training process meet a fault at a chosen point, to prove that nothing
is lost: unset, each costs one dictionary lookup per call.

``BNLAB_TEST_KILL_AT="where:step"``: the process SIGKILLs itself; ``where`` is ``step`` (after
the backward pass, before the optimizer update), ``metrics`` (half-way through writing a row),
``checkpoint`` (half-way through writing the checkpoint file) or ``after_checkpoint``.

``BNLAB_TEST_DISK_FULL_AT="where:step"``: the disk fills up. The write ``where`` (``metrics``,
``checkpoint``, ``status``) of ``step`` stores half its bytes and fails with ``OSError(ENOSPC)``,
and so does every later write of new bytes in the process (rewriting a file's existing bytes in
place needs no new blocks and still works, as on a real full disk).
"""

from __future__ import annotations

import errno
import os
import signal
from typing import BinaryIO

KILL_POINTS: tuple[str, ...] = ("step", "metrics", "checkpoint", "after_checkpoint")
DISK_FULL_POINTS: tuple[str, ...] = ("metrics", "checkpoint", "status")

_disk_filled_by: list[str] = []  # the DISK_FULL_AT value that has fired in this process


def kill_point(where: str, step: int, fire: bool = False) -> bool:
    """Whether the kill hook targets (``where``, ``step``); with ``fire``, die there."""
    target = os.environ.get("BNLAB_TEST_KILL_AT")
    if not target or target != f"{where}:{step}":
        return False
    if fire:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _disk_full(where: str, step: int) -> bool:
    target = os.environ.get("BNLAB_TEST_DISK_FULL_AT")
    if not target:
        return False
    if target in _disk_filled_by:
        return True
    if target == f"{where}:{step}":
        _disk_filled_by.append(target)
        return True
    return False


def write_through(handle: BinaryIO, data: bytes, where: str, step: int) -> None:
    """Write ``data`` to ``handle`` and flush it to the OS; the SIGKILL hook tears the write at
    (``where``, ``step``) and the disk-full hook fails it with ENOSPC."""
    if kill_point(where, step):
        handle.write(data[: len(data) // 2])
        handle.flush()
        kill_point(where, step, fire=True)
    if _disk_full(where, step):
        handle.write(data[: len(data) // 2])
        handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)
    handle.write(data)
    handle.flush()
