"""Sweeps: a grid over any config keys, one run directory per point, parallel worker processes.

A sweep file is a train config plus a ``[sweep.grid]`` table of dotted keys and value lists::

    [sweep.grid]
    "model.norm" = ["none", "bn"]
    "optim.lr" = [0.1, 0.5]
    seed = [0, 1]

Each point runs in its own process (``jobs`` at a time) in ``OUT/<name>``, named from its grid
values (``norm=bn,lr=0.1,seed=0``). Running the sweep again skips finished and diverged runs and
resumes the others; a worker that crashes fails its own run only, with its traceback in
``OUT/<name>/traceback.txt``. A run another process is writing (its lock is held: a second
sweep, a ``bnlab train``) is skipped and reported ``locked``, its directory untouched.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import os
import queue as queue_module
import re
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnlab.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    read_toml,
    with_values,
)
from bnlab.train.lock import RunLock, RunLockedError, lock_holder
from bnlab.train.loop import RunResult
from bnlab.train.store import FINAL_STATES, RunStore, read_status

if TYPE_CHECKING:
    from bnlab.train.ray_backend import RayBackend

LOCKED_EXIT = 75  # a worker's exit code for "the run's lock is held by another process"


@dataclass
class SweepConfig:
    """A base TrainConfig and a grid: dotted config key -> the values to try."""

    base: TrainConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.grid.{key}", f"expected a non-empty list, got {values!r}")
            for value in values:
                with_values(self.base, {key: value})  # names the key if a value is bad


def load_sweep_config(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """A SweepConfig from a TOML file (a train config plus ``[sweep.grid]``); ``overrides``
    (``key=value``) apply to the base config. Raises ConfigError naming the bad key."""
    data = read_toml(path)
    section = data.pop("sweep", {})
    if not isinstance(section, Mapping) or set(section) - {"grid"}:
        raise ConfigError("sweep", "expected a table with one key: grid")
    grid = section.get("grid", {})
    if not isinstance(grid, Mapping):
        raise ConfigError("sweep.grid", f"expected a table of key = [values], got {grid!r}")
    return SweepConfig(config_from_dict(apply_overrides(data, overrides)), dict(grid))


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "x".join(_format(v) for v in value)
    if isinstance(value, Mapping):
        return "+".join(f"{k}{_format(v)}" for k, v in value.items())
    return str(value)


def run_names(config: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """(directory name, config) of every grid point, in grid order (the last key varies
    fastest). Names use the last part of each key unless two keys share it."""
    keys = list(config.grid)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = [s if last.count(s) == 1 else k for s, k in zip(last, keys, strict=True)]
    points = []
    for values in itertools.product(*(config.grid[k] for k in keys)):
        name = ",".join(f"{s}={_format(v)}" for s, v in zip(short, values, strict=True)) or "run"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
        points.append((name, with_values(config.base, dict(zip(keys, values, strict=True)))))
    return points


def _worker_context() -> Any:
    """Worker processes come from a fork server that has imported the trainer once (fast
    starts, no fork of a parent that may hold torch thread pools); spawn where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # what every run imports, once: the trainer, torch._dynamo (torch.optim imports it
        # when the first optimizer is made: 1.7 s of CPU per worker), scikit-learn (the
        # embedded data sets: 1.4 s) and numba (the norm kernels' compiler)
        preload = ["bnlab.train.loop", "torch._dynamo"]
        preload += [m for m in ("sklearn.datasets", "numba") if importlib.util.find_spec(m)]
        context.set_forkserver_preload(preload)
        return context
    return multiprocessing.get_context("spawn")


def _worker(
    config_data: dict[str, Any],
    run_dir: str,
    messages: Any,
    threads: int,
    environment: dict[str, str],
) -> None:
    """One run in a worker process; progress goes to ``messages`` as (dir, step, total).
    ``environment`` is the parent's at launch (a fork server keeps the one it started with)."""
    os.environ.clear()
    os.environ.update(environment)
    from bnlab.train.loop import set_threads, train

    config = config_from_dict(config_data)
    if not config.threads:
        set_threads(threads)
    last = [0.0]

    def report(step: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2 or step == total:
            last[0] = now
            messages.put((run_dir, step, total))

    try:
        train(config, run_dir, progress=report)
    except RunLockedError:
        sys.exit(LOCKED_EXIT)  # another process took the run since the sweep looked
    except BaseException:
        # train() records its own errors; this also covers those raised before it could
        with RunLock(run_dir), suppress(OSError):
            RunStore(run_dir).write_traceback(traceback.format_exc())
        raise


def sweep(
    config: SweepConfig,
    out_dir: str | Path,
    jobs: int = 1,
    progress: bool = True,
    backend: RayBackend | None = None,
) -> dict[str, RunResult]:
    """Run every grid point of ``config`` into ``out_dir/<name>`` with ``jobs`` worker
    processes; returns name -> RunResult (state finished, diverged, failed, or locked: held by
    another process). Finished and diverged runs are skipped, unfinished ones resumed, locked
    ones left alone. With a ``backend`` (:class:`bnlab.train.ray_backend.RayBackend`) the runs
    train as tasks on a Ray cluster instead, and ``jobs`` is unused."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = run_names(config)
    results: dict[str, RunResult] = {}
    todo = []
    for name, run_config in points:
        status = read_status(out / name)
        holder = lock_holder(out / name)
        if status is not None and status["state"] in FINAL_STATES:
            results[name] = RunResult(out / name, status["state"], int(status["step"]))
        elif holder is not None:
            results[name] = _locked(out / name, *holder)
        else:
            todo.append((name, run_config))
    if backend is not None:  # each run a task on a Ray cluster instead of a local process
        results.update(backend.run(todo, out, progress=progress, done=len(results)))
        return {name: results[name] for name, _ in points}

    from tqdm.auto import tqdm

    overall = tqdm(
        total=len(points), initial=len(results), desc="sweep", disable=not progress, position=0
    )
    context = _worker_context()
    messages = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict[str, tuple[Any, Any]] = {}  # name -> (process, bar)
    free_slots = list(range(1, jobs + 1))
    slot_of: dict[str, int] = {}
    pending = list(todo)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, run_config = pending.pop(0)
                process = context.Process(
                    target=_worker,
                    args=(
                        config_to_dict(run_config),
                        str(out / name),
                        messages,
                        threads,
                        dict(os.environ),
                    ),
                    name=f"bnlab-sweep-{name}",
                )
                process.start()
                slot_of[name] = free_slots.pop(0)
                bar = tqdm(
                    total=run_config.steps,
                    desc=name,
                    leave=False,
                    disable=not progress,
                    position=slot_of[name],
                )
                running[name] = (process, bar)
            _drain(messages, running)
            for name in [n for n, (p, _) in running.items() if not p.is_alive()]:
                process, bar = running.pop(name)
                process.join()
                _drain(messages, {name: (process, bar), **running})
                bar.close()
                free_slots.append(slot_of.pop(name))
                free_slots.sort()
                results[name] = _outcome(out / name, process.exitcode)
                overall.update(1)
            time.sleep(0.05)
    finally:
        for process, bar in running.values():
            process.kill()
            process.join()
            bar.close()
        overall.close()
    return {name: results[name] for name, _ in points}


def _drain(messages: Any, running: Mapping[str, tuple[Any, Any]]) -> None:
    """Move each run's bar to the step its worker last reported."""
    while True:
        try:
            run_dir, step, _ = messages.get_nowait()
        except queue_module.Empty:
            return
        name = Path(run_dir).name
        if name in running:
            bar = running[name][1]
            bar.update(step - bar.n)


def _locked(run_dir: Path, host: str, pid: int) -> RunResult:
    status = read_status(run_dir)
    step = int(status["step"]) if status else 0
    return RunResult(run_dir, "locked", step, str(RunLockedError(run_dir, host, pid)))


def _outcome(run_dir: Path, exitcode: int | None) -> RunResult:
    """The run's state after its worker exited; a worker that died without saying so (killed,
    crashed interpreter) marks its run failed here, under the run's lock."""
    status = read_status(run_dir)
    step = int(status["step"]) if status else 0
    if exitcode == 0 and status is not None and status["state"] in FINAL_STATES:
        return RunResult(run_dir, status["state"], step)
    if exitcode == LOCKED_EXIT:
        return _locked(run_dir, *(lock_holder(run_dir) or ("", 0)))
    try:
        with RunLock(run_dir):
            status = read_status(run_dir)
            step = int(status["step"]) if status else 0
            if status is None or status["state"] != "failed":
                store = RunStore(run_dir)
                how = (
                    f"killed by signal {-exitcode}"
                    if exitcode and exitcode < 0
                    else f"exit code {exitcode}"
                )
                store.set_status("failed", step, error=f"worker process ended ({how})")
                if not (run_dir / "traceback.txt").exists():
                    store.write_traceback(
                        f"worker process ended ({how}) without a Python traceback\n"
                    )
                status = read_status(run_dir)
    except RunLockedError as error:
        return _locked(run_dir, error.host, error.pid)
    reason = str(status.get("error", "")) if status else ""
    return RunResult(run_dir, "failed", step, reason)
