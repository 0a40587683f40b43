"""The run store: one run = one directory of plain files.

```
RUN/
  config.toml      the TrainConfig
  env.json         versions, seed, device, world size
  metrics.jsonl    one JSON object per line: {"step", "kind", ...values}, appended and flushed
  status.json      {"state": running|finished|diverged|failed, "step", "started", "updated"}
  traceback.txt    the error of the last failed attempt
  checkpoints/     step-00000100.ckpt ... (atomic, checksummed)
```

Metrics rows use Python's JSON dialect: non-finite floats are written ``NaN``/``Infinity``.
``read_metrics`` and ``read_status`` are all a reader of finished runs needs.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bnlab.train.faults import write_through

STATES: tuple[str, ...] = ("running", "finished", "diverged", "failed")
FINAL_STATES: tuple[str, ...] = ("finished", "diverged")


def _jsonable(value: Any) -> Any:
    """Tensors and NumPy scalars/arrays as Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def write_atomic(path: Path, data: bytes, *, where: str = "file", step: int = 0) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename: readers see the old
    file or the new one, never a part. A failed write (a full disk) removes its temp file and
    raises, leaving the old file. ``where``/``step`` name the write for the fault hooks."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as handle:
            write_through(handle, data, where, step)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


DISK_FULL: tuple[int, ...] = (errno.ENOSPC, errno.EDQUOT)


def _overwrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite the small file ``path`` without a temp file: on a full disk its own blocks take
    the new bytes. Not atomic; only for recording a failure when nothing else can be written."""
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_lines(text: str) -> Iterator[dict[str, Any]]:
    """Complete rows of a metrics file; a torn last line (no newline or bad JSON) is skipped."""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            return
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The metric rows of a run (all, or those of ``kind``: "train", "eval", "probe"), in the
    order written. A run without metrics gives []."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = list(_parse_lines(path.read_text()))
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status.json as a dict, or None when the run has not started."""
    path = Path(run_dir) / "status.json"
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return status


class RunStore:
    """Writer of one run directory (see the module docstring for its layout).

    ``writer=False`` (distributed ranks other than 0) turns every write into a no-op, so the
    loop can call the store unconditionally.
    """

    def __init__(self, run_dir: str | Path, writer: bool = True) -> None:
        self.root = Path(run_dir)
        self.writer = writer
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.status_path = self.root / "status.json"
        self._metrics: Any = None
        previous = read_status(self.root)
        self._started = float(previous["started"]) if previous else time.time()
        if writer:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    # -- files written once
    def write_config(self, toml_text: str) -> None:
        if self.writer:
            write_atomic(self.root / "config.toml", toml_text.encode())

    def read_config_text(self) -> str | None:
        path = self.root / "config.toml"
        return path.read_text() if path.exists() else None

    def write_env(self, seed: int, device: str, world_size: int, extra: Mapping[str, Any]) -> None:
        """env.json: versions of Python, torch, numpy, bnlab, the platform, seed and device."""
        if not self.writer:
            return
        import numpy
        import torch

        import bnlab

        env = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "bnlab": bnlab.__version__,
            "platform": platform.platform(),
            "seed": seed,
            "device": device,
            "world_size": world_size,
            "torch_threads": torch.get_num_threads(),
            **dict(extra),
        }
        write_atomic(self.root / "env.json", (json.dumps(env, indent=2) + "\n").encode())

    # -- status
    def set_status(self, state: str, step: int, **extra: Any) -> None:
        """status.json with ``state`` (one of STATES), ``step`` and wall-clock times."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; known states: {', '.join(STATES)}")
        if not self.writer:
            return
        now = time.time()
        status = {"state": state, "step": step, "started": self._started, "updated": now}
        status.update(extra)
        data = (json.dumps(status, indent=2) + "\n").encode()
        try:
            write_atomic(self.status_path, data, where="status", step=step)
        except OSError as error:
            # a full disk must not hide how the run ended: status.json's own blocks take it
            if error.errno not in DISK_FULL or not self.status_path.exists():
                raise
            _overwrite_in_place(self.status_path, data)

    def write_traceback(self, text: str) -> None:
        if self.writer:
            write_atomic(self.root / "traceback.txt", text.encode())

    # -- metrics
    def truncate_metrics(self, last_step: int) -> None:
        """Keep only complete rows with ``step <= last_step`` (rows written after the checkpoint
        being resumed from, and a torn last line, go); ``last_step < 0`` empties the file."""
        if not self.writer:
            return
        self.close()
        kept = []
        if self.metrics_path.exists():
            rows = _parse_lines(self.metrics_path.read_text())
            kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= last_step]
        write_atomic(self.metrics_path, "".join(self._line(r) for r in kept).encode())

    @staticmethod
    def _line(row: Mapping[str, Any]) -> str:
        return json.dumps(_jsonable(row), allow_nan=True) + "\n"

    def append(self, step: int, kind: str, **values: Any) -> dict[str, Any]:
        """Append the row ``{"step", "kind", **values}`` and flush it to the OS."""
        row = {"step": step, "kind": kind, **values}
        if self.writer:
            if self._metrics is None:
                self._metrics = open(self.metrics_path, "ab")  # kept open: one row per flush
            try:
                write_through(self._metrics, self._line(row).encode(), "metrics", step)
            except OSError:
                self.close()  # a torn last row is left; readers skip it, resume drops it
                raise
        return row

    def sync(self) -> None:
        """fsync the metrics written so far (before a checkpoint that covers them)."""
        if self._metrics is not None:
            self._metrics.flush()
            os.fsync(self._metrics.fileno())

    def close(self) -> None:
        """Close the metrics file; a failure to flush its rest (a full disk) is not raised:
        the rows that matter are complete on disk, a torn tail is dropped on resume."""
        if self._metrics is not None:
            handle, self._metrics = self._metrics, None
            try:
                handle.close()
            except OSError:
                pass


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
