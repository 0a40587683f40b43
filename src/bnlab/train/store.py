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
import warnings
from collections.abc import Mapping
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


class RunStoreWarning(UserWarning):
    """A damaged run-store file (a torn metrics row, an unreadable status.json, an edited
    config.toml) was repaired."""


def _parse_rows(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a metrics file and the number of damaged lines skipped: a torn
    last line (no newline), bytes that are not UTF-8 JSON, JSON that is not a row."""
    rows, damaged = [], 0
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line.decode()) if line.endswith(b"\n") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            damaged += 1
    return rows, damaged


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The metric rows of a run (all, or those of ``kind``: "train", "eval", "probe"), in the
    order written; damaged lines (a torn last row of a running or killed run) are skipped. A
    run without metrics gives []."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows, _ = _parse_rows(path.read_bytes())
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def _load_status(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(status, "") for a good status.json; (None, what is wrong) for a damaged one; (None, "")
    for none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    try:
        status = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "empty" if not data.strip() else "not JSON"
    if not isinstance(status, dict):
        return None, f"not a JSON object: {type(status).__name__}"
    if status.get("state") not in STATES:
        return None, f"unknown state {status.get('state')!r}"
    step = status.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"bad step {step!r}"
    if not is_finite_number(status.get("started", 0)):
        status.pop("started")
    return status, ""


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status.json as a dict (``state`` one of STATES, ``step`` >= 0), or None when
    the run has not started or the file is damaged (:func:`status_damage` says how)."""
    return _load_status(Path(run_dir) / "status.json")[0]


def status_damage(run_dir: str | Path) -> str:
    """What is wrong with the run's status.json ("empty", "not JSON", ...), "" if nothing."""
    return _load_status(Path(run_dir) / "status.json")[1]


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
        self._started = float(previous.get("started", time.time())) if previous else time.time()
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
        rows: list[dict[str, Any]] = []
        if self.metrics_path.exists():
            rows, damaged = _parse_rows(self.metrics_path.read_bytes())
            if damaged:
                warnings.warn(
                    f"{self.metrics_path}: dropped {damaged} damaged line(s) (a row torn by a "
                    "crash or a full disk); the rows up to the checkpoint are kept",
                    RunStoreWarning,
                    stacklevel=2,
                )
        kept = [r for r in rows if r["step"] <= last_step]
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
