"""One writer per run directory: an advisory lock held for the whole life of a run.

``RUN/lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking). The kernel drops the lock
when its holder's file is closed, so a process that ends in any way, SIGKILL included, never
leaves a stale lock; the file's text (``host pid``) only names the holder for the error message.
A second writer fails at once with :class:`RunLockedError` and writes nothing.

```
with RunLock(run_dir):      # RunLockedError if another process holds it
    ...                     # the only writer of run_dir
holder = lock_holder(run_dir)   # None when free; never creates anything
```

Locks belong to open files, not processes: two ``RunLock`` of one directory in one process
exclude each other too. Linux emulates ``flock`` on NFS with byte-range locks, so the lock also
holds between machines that share the run directory.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_NAME = "lock"


class RunLockedError(RuntimeError):
    """The run directory is held by another process (``host`` and ``pid`` as it wrote them;
    empty / 0 in the instant between its lock and its note)."""

    def __init__(self, run_dir: Path, host: str, pid: int) -> None:
        self.run_dir, self.host, self.pid = run_dir, host, pid
        who = f"process {pid} on host {host}" if pid else "another process"
        super().__init__(
            f"{run_dir} is in use by {who} (bnlab allows one writer per run directory); "
            "wait for it to end or stop it, then run again"
        )


def _read_holder(handle: int) -> tuple[str, int]:
    text = os.pread(handle, 256, 0).decode(errors="replace").split()
    if len(text) == 2 and text[1].isdigit():
        return text[0], int(text[1])
    return "", 0


def _try_lock(handle: int) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunLock:
    """The exclusive lock of ``run_dir`` (created if missing) while the ``with`` block runs.

    Raises RunLockedError on entry when another process holds it; nothing is written then.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._handle: int | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> RunLock:
        if self._handle is not None:
            raise RuntimeError(f"the lock of {self.run_dir} is already held by this RunLock")
        path = self.run_dir / LOCK_NAME
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(handle):
            host, pid = _read_holder(handle)
            os.close(handle)
            raise RunLockedError(self.run_dir, host, pid)
        note = f"{socket.gethostname()} {os.getpid()}\n".encode()
        os.ftruncate(handle, 0)
        os.pwrite(handle, note, 0)
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            os.ftruncate(handle, 0)  # still ours: no one reads a finished holder's name
        finally:
            os.close(handle)  # closing the last descriptor drops the lock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> tuple[str, int] | None:
    """(host, pid) of the process holding ``run_dir``'s lock, or None when it is free or
    absent. Probes without creating or changing anything."""
    path = Path(run_dir) / LOCK_NAME
    try:
        handle = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(handle):
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
        return _read_holder(handle)
    finally:
        os.close(handle)
