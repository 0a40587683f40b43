"""Sweeps on a Ray cluster: every run of a sweep is a Ray task (``bnlab sweep --backend ray``).

The driver (the machine that runs ``bnlab sweep`` or ``bnlab reproduce``) decides what to run
exactly as the local pool does (:func:`bnlab.train.sweep.sweep` skips finished, diverged and
locked runs), then submits one task per remaining run with ``cpus_per_run`` CPUs and
``gpus_per_run`` GPUs. Every node must see the run store at the same path (a shared
filesystem) and have the same bnlab installed.

A task does not train in the Ray worker itself: it starts the local sweep's worker process
(:func:`bnlab.train.sweep._worker`, forked from a fork server that has the trainer imported)
and supervises it. So a run on Ray is the same kind of process as a run of the local pool, with
the same thread count when ``threads`` is unset (``cpus_per_run``, at least 1) or
``threads``: bnlab's CPU kernels run serially in forked workers and round differently in a
fresh process, so only this makes a run resumed on either backend bitwise equal to an
uninterrupted one. The training process dies with the Ray worker that supervises it (Linux's
parent-death signal, through the fork server), so a killed worker never leaves a trainer
behind.

Failures: a run that crashes fails only its own task (recorded as locally). A Ray worker that
is killed, or a node that is lost, makes Ray run the task again (``max_retries``); the new
attempt waits up to ``lock_wait_s`` for the run directory's lock (the old trainer may still be
ending, or, on NFS, its lock may outlive a lost node for the lease time), then resumes from the
newest checkpoint. The lock (:mod:`bnlab.train.lock`) makes sure no run has two writers.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from bnlab.train.config import TrainConfig, config_to_dict
from bnlab.train.lock import RunLock, RunLockedError, lock_holder
from bnlab.train.loop import RunResult
from bnlab.train.store import RunStore, read_status
from bnlab.train.sweep import _outcome, _worker, _worker_context

INSTALL_HINT = "pip install 'bnlab[ray]'"
FORWARDED_ENV = ("BNLAB_", "NUMBA_")
"""Variables of the driver's environment that every run sees (bnlab's and numba's settings);
the rest of a run's environment is its node's (CUDA_VISIBLE_DEVICES is set by Ray)."""


class RayUnavailableError(ImportError):
    """``--backend ray`` without Ray installed."""

    def __init__(self) -> None:
        super().__init__(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}")


class RayConnectError(ValueError):
    """No Ray cluster answers at the address given."""


def require_ray() -> ModuleType:
    """The ``ray`` module; raises RayUnavailableError (with the install command) without it."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailableError() from error
    return ray


@dataclass(frozen=True)
class RayBackend:
    """Where and how a sweep's runs run on Ray.

    ``address``: the cluster (``ray start --head`` prints it; ``auto`` finds a local one);
    None uses ``$RAY_ADDRESS`` or, without it, starts Ray on this machine only. An existing
    connection of this process (``ray.init`` called before) is used as it is.
    ``cpus_per_run`` / ``gpus_per_run``: each task's Ray resources (fractions allowed);
    ``max_retries``: attempts after a lost worker or node; ``lock_wait_s``: how long an attempt
    waits for a run directory another process still holds.
    """

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 3
    lock_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.cpus_per_run > 0:
            raise ValueError(f"--cpus-per-run must be > 0, got {self.cpus_per_run}")
        if self.gpus_per_run < 0:
            raise ValueError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    @property
    def threads(self) -> int:
        """Threads of a run that does not set ``threads``: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_run))

    def connect(self) -> ModuleType:
        """Connect this process to the cluster (once) and return the ``ray`` module. Raises
        RayConnectError when nothing listens at the address (Ray itself would wait for ever)."""
        ray = require_ray()
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                _check_reachable(address)
            local = {} if address else {"include_dashboard": False}
            ray.init(address=address, configure_logging=False, **local)
        return ray

    def run(
        self, todo: Sequence[tuple[str, TrainConfig]], out: Path, *, progress: bool, done: int
    ) -> dict[str, RunResult]:
        """Train every (name, config) of ``todo`` into ``out/<name>`` as Ray tasks; returns
        name -> RunResult when the last one has ended. ``done``: runs of the sweep already
        ended (for the progress view)."""
        if not todo:
            return {}
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        board = (
            ray.remote(ProgressBoard)
            .options(
                num_cpus=0,
                max_restarts=-1,  # progress only: a board lost with its node starts afresh
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
            )
            .remote()
        )
        task = ray.remote(_run_task).options(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.max_retries,
            retry_exceptions=False,  # a run's own errors are results, not reasons to retry
        )
        environment = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        # absolute paths and the driver's directory: relative --out and data paths mean on
        # every node what they mean here (the filesystem is shared at the same path)
        place = _Place(os.getcwd(), os.path.abspath(out), environment)
        refs = {}  # task -> run name
        for name, config in todo:
            data = config_to_dict(config)
            refs[task.remote(name, data, place, self.threads, board, self.lock_wait_s)] = name
        view = ClusterView(len(todo) + done, done, progress)
        results: dict[str, RunResult] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    name = refs[ref]
                    try:
                        results[name] = replace(ray.get(ref), run_dir=out / name)
                    except ray.exceptions.RayError as error:  # retries spent, node lost, ...
                        results[name] = _record_failure(out / name, _first_line(error))
                    view.ended(name, results[name])
                try:
                    view.show(ray.get(board.snapshot.remote()))
                except ray.exceptions.RayError:
                    pass  # the board is restarting; the next look will see it
        finally:
            for ref in pending:  # interrupted: stop the cluster's work; every run resumes
                ray.cancel(ref, force=True)
            view.close()
            ray.kill(board)
        return results


class ProgressBoard:
    """A Ray actor every task tells where its run is: name -> host, node, pid, step, total and
    attempt. The driver reads it to show one view of the whole cluster."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}

    def started(self, name: str, where: Mapping[str, Any], step: int, total: int) -> None:
        attempt = self.runs.get(name, {}).get("attempt", 0) + 1
        self.runs[name] = {**where, "step": step, "total": total, "attempt": attempt}

    def step(self, name: str, step: int) -> None:
        if name in self.runs:
            self.runs[name]["step"] = step

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.runs


class ClusterView:
    """The driver's view: one bar of runs ended out of all, with the counts of running and
    failed runs, and a line for each run that starts (on which host), is retried, or ends."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, initial=done, desc="sweep (ray)", disable=not enabled)
        self.attempts: dict[str, int] = {}
        self.ended_names: set[str] = set()
        self.failed = 0
        self.running: dict[str, dict[str, Any]] = {}

    def _say(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)

    def show(self, board: Mapping[str, Mapping[str, Any]]) -> None:
        for name, run in board.items():
            if name in self.ended_names or self.attempts.get(name) == run["attempt"]:
                continue
            self.attempts[name] = run["attempt"]
            again = f"retry {run['attempt'] - 1} of " if run["attempt"] > 1 else ""
            where = f"{run['host']} (node {run['node']}, pid {run['pid']})"
            self._say(f"{again}{name}: started on {where} at step {run['step']}")
        self.running = {n: dict(r) for n, r in board.items() if n not in self.ended_names}
        steps = ", ".join(f"{n} {r['step']}/{r['total']}" for n, r in self.running.items())
        self.bar.set_postfix_str(
            f"running {len(self.running)}, failed {self.failed}" + (f": {steps}" if steps else ""),
            refresh=True,
        )

    def ended(self, name: str, result: RunResult) -> None:
        self.ended_names.add(name)
        self.failed += result.state == "failed"
        reason = f": {result.reason}" if getattr(result, "reason", "") else ""
        self._say(f"{name}: {result.state} at step {result.step}{reason}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise RayConnectError unless something accepts a TCP connection at ``host:port``
    (``auto`` and ``ray://`` addresses are left to Ray)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise RayConnectError(
            f"--address {address}: no Ray cluster answers there ({error}); start one with "
            "`ray start --head` and give the address it prints"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _record_failure(run_dir: Path, reason: str) -> RunResult:
    """Mark a run whose task Ray gave up on ``failed`` (under its lock; a run someone else
    holds is reported locked and left alone)."""
    try:
        with RunLock(run_dir):
            status = read_status(run_dir)
            step = int(status["step"]) if status else 0
            store = RunStore(run_dir)
            store.set_status("failed", step, error=f"Ray task failed ({reason})")
            store.write_traceback(f"Ray task failed: {reason}\n")
    except RunLockedError as error:
        return RunResult(run_dir, "locked", 0, str(error))
    return RunResult(run_dir, "failed", step, f"Ray task failed ({reason})")


# -- what runs on a cluster node


@dataclass(frozen=True)
class _Place:
    """Where the driver is: its working directory, the sweep's folder (absolute) and the
    environment variables every run sees."""

    cwd: str
    out: str
    environment: Mapping[str, str]


def _run_task(
    name: str,
    config_data: dict[str, Any],
    place: _Place,
    threads: int,
    board: Any,
    lock_wait_s: float,
) -> RunResult:
    """One run, as a Ray task: wait while another process still holds the run, then train it
    in a worker process as the local pool does, reporting progress to ``board``."""
    run_dir = os.path.join(place.out, name)
    run = Path(run_dir)
    if not os.path.isdir(place.out):  # the driver made it: this node does not share it
        return RunResult(
            run,
            "failed",
            0,
            f"{place.out} does not exist on {socket.gethostname()}: the run store must be on a "
            "filesystem every node mounts at the same path",
        )
    if os.path.isdir(place.cwd):
        os.chdir(place.cwd)  # the trainer starts here (multiprocessing passes the directory)
    deadline = time.monotonic() + lock_wait_s
    while lock_holder(run) is not None and time.monotonic() < deadline:
        time.sleep(0.5)  # a killed attempt's trainer, or its NFS lock, is still going away
    status = read_status(run)
    step = int(status["step"]) if status else 0
    total = int(config_data["steps"])
    import ray

    node = ray.get_runtime_context().get_node_id()[:8]
    where = {"host": socket.gethostname(), "node": node, "pid": os.getpid()}
    # the board numbers attempts by the starts it has recorded, so wait until it has this one:
    # a call left in flight (queued while the board actor is still being created) dies with a
    # worker killed moments later, and the retry would then count as the first attempt
    try:
        ray.get(board.started.remote(name, where, step, total), timeout=60)
    except ray.exceptions.RayError:
        pass  # the board is restarting (progress only): train regardless
    context = _worker_context()
    messages = context.Queue()
    process = context.Process(
        target=_train_tied_to_parent,
        args=(config_data, run_dir, messages, threads, {**os.environ, **place.environment}),
        name=f"bnlab-ray-{name}",
    )
    process.start()
    try:
        while process.is_alive():
            process.join(0.2)
            _forward(messages, name, board)
    finally:
        if process.is_alive():  # the task was cancelled
            process.kill()
            process.join()
    _forward(messages, name, board)
    return _outcome(run, process.exitcode)


def _forward(messages: Any, name: str, board: Any) -> None:
    """Send the newest step the worker reported to the board."""
    newest = None
    while True:
        try:
            _, newest, _ = messages.get_nowait()
        except queue.Empty:
            break
    if newest is not None:
        board.step.remote(name, newest)


def _train_tied_to_parent(*args: Any) -> None:
    """The local sweep's worker, killed when its parent (the fork server, which ends with the
    Ray worker) dies: Linux's PR_SET_PDEATHSIG; elsewhere the trainer may outlive a killed
    worker, and the run's lock keeps a retry from writing beside it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)
    _worker(*args)
