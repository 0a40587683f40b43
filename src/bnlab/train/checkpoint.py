"""Checkpoints: atomic, checksummed files that hold everything a run needs to continue.

File layout: the magic line ``BNLABCKPT1``, the SHA-256 of the payload in hex, a newline, then
the payload (``torch.save`` of a dict of tensors and plain values). A truncated or corrupted
file fails the checksum; :func:`load_latest` then warns and falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from bnlab.train.store import write_atomic

MAGIC = b"BNLABCKPT1\n"
_NAME = re.compile(r"^step-(\d{8})\.ckpt$")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is truncated, altered, or not a bnlab checkpoint; ``reason``
    says which."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.ckpt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (temp file + fsync + rename), then delete
    all but the newest ``keep`` checkpoints. A failed write (OSError, e.g. a full disk) removes
    its temp file and raises; the older checkpoints stay."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    path = checkpoint_path(folder, step)
    write_atomic(path, data, where="checkpoint", step=step)  # a failure leaves the older ones
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state stored in ``path``; CorruptCheckpoint if the checksum or format is wrong."""
    data = path.read_bytes()
    header = len(MAGIC) + 65
    if not data.startswith(MAGIC) or len(data) < header or data[header - 1 : header] != b"\n":
        raise CorruptCheckpoint(path, "not a bnlab checkpoint (bad header)")
    digest, payload = data[len(MAGIC) : header - 1].decode(errors="replace"), data[header:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CorruptCheckpoint(path, "checksum mismatch: truncated or corrupted")
    state: dict[str, Any] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return state


def load_latest(folder: Path, warn: bool = True) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest readable checkpoint in ``folder``, or None. A damaged one
    raises a CheckpointWarning (unless ``warn`` is False) and the one before it is tried."""
    found = list_checkpoints(folder)
    for step, path in reversed(found):
        try:
            return step, read_checkpoint(path)
        except (CorruptCheckpoint, OSError, RuntimeError, pickle.UnpicklingError) as error:
            if warn:
                reason = error.reason if isinstance(error, CorruptCheckpoint) else str(error)
                warnings.warn(
                    f"skipping damaged checkpoint {path} ({reason}); trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
    if found and warn:
        warnings.warn(
            f"no readable checkpoint in {folder}; the run starts again from step 0",
            CheckpointWarning,
            stacklevel=2,
        )
    return None
