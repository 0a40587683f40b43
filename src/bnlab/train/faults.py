"""A test hook: make the process SIGKILL itself at a chosen point, to prove resume works.

``BNLAB_TEST_KILL_AT="where:step"`` with ``where`` one of ``step`` (after the backward pass,
before the optimizer update), ``metrics`` (half-way through writing a row), ``checkpoint``
(half-way through writing the checkpoint file) or ``after_checkpoint``. Unset, it costs one
dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

KILL_POINTS: tuple[str, ...] = ("step", "metrics", "checkpoint", "after_checkpoint")


def kill_point(where: str, step: int, fire: bool = False) -> bool:
    """Whether the kill hook targets (``where``, ``step``); with ``fire``, die there."""
    target = os.environ.get("BNLAB_TEST_KILL_AT")
    if not target or target != f"{where}:{step}":
        return False
    if fire:
        os.kill(os.getpid(), signal.SIGKILL)
    return True
