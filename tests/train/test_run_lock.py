"""One writer per run directory: a second `bnlab train` stops at once (exit 2, one line naming
the holder, nothing written), a SIGKILLed writer leaves no stale lock, sweeps skip held runs."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.train import RunLock, RunLockedError, lock_holder, read_status
from train.train_cases import run_cli, snapshot, tiny_config, write_config


def _wait_for_rows(run: Path, process: subprocess.Popen[str], timeout: float = 180) -> None:
    """Until ``process`` has written the first metric rows of ``run``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size:
            return
        time.sleep(0.1)
    raise AssertionError(f"{process.pid} never started its run in {run}")


def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert lock_holder(run) is None and not run.exists()  # probing creates nothing
    with RunLock(run):
        assert (run / "lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        assert lock_holder(run) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunLockedError) as caught, RunLock(run):
            pass
        error = caught.value
        assert (error.host, error.pid) == (socket.gethostname(), os.getpid())
        assert f"process {os.getpid()} on host {socket.gethostname()}" in str(error)
    assert lock_holder(run) is None
    with RunLock(run):  # released: taken again
        pass


def test_a_second_writer_stops_at_once_and_a_killed_writer_leaves_no_lock(
    tmp_path: Path,
) -> None:
    # the first writer trains for long; stopped (SIGSTOP) while it holds the lock, its run
    # directory must not change by a byte while a second `bnlab train` tries the same run
    path = write_config(tmp_path / "c.toml", tiny_config(**{"steps": 100_000}))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_TEST_KILL_AT"}
    first = subprocess.Popen(
        [sys.executable, "-m", "bnlab", "train", str(path), "--run-dir", str(run), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_rows(run, first)
        os.kill(first.pid, signal.SIGSTOP)
        assert (run / "lock").read_text() == f"{socket.gethostname()} {first.pid}\n"
        before = snapshot(run)
        second = run_cli("train", str(path), "--run-dir", str(run), "--no-progress")
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stdout == ""
        assert second.stderr == (
            f"error: {run} is in use by process {first.pid} on host {socket.gethostname()} "
            "(bnlab allows one writer per run directory); wait for it to end or stop it, "
            "then run again\n"
        )
        assert snapshot(run) == before
    finally:
        first.kill()  # SIGKILL, also for a stopped process
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert lock_holder(run) is None  # the kernel dropped it with the process
    assert read_status(run)["state"] == "running"  # type: ignore[index]
    with RunLock(run):  # so the next `bnlab train` resumes
        pass


def test_sweep_skips_and_reports_runs_another_process_holds(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("steps = 2\nthreads = 1\n[sweep.grid]\nseed = [0, 1]\n")
    out = tmp_path / "out"
    args = ["sweep", str(path), "--out", str(out), "--no-progress"]
    with RunLock(out / "seed=0"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    held = RunLockedError(out / "seed=0", socket.gethostname(), os.getpid())
    assert result.output.splitlines() == [
        f"locked    step      0  {out / 'seed=0'}  ({held})",
        f"finished  step      2  {out / 'seed=1'}",
    ]
    assert [p.name for p in (out / "seed=0").iterdir()] == ["lock"]  # nothing else written
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[0] == f"finished  step      2  {out / 'seed=0'}"


def test_a_sweep_worker_that_finds_its_run_taken_leaves_it_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the run is taken between the sweep's look and its worker's start: the worker's own
    # lock stops it, and the sweep reports the run locked instead of failing it
    path = tmp_path / "s.toml"
    path.write_text("steps = 2\nthreads = 1\n[sweep.grid]\nseed = [0]\n")
    out = tmp_path / "out"
    sweep_module = importlib.import_module("bnlab.train.sweep")  # the package exports sweep()
    monkeypatch.setattr(sweep_module, "lock_holder", lambda run_dir: None)
    with RunLock(out / "seed=0"):
        result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"locked    step      0  {out / 'seed=0'}  (")
    assert [p.name for p in (out / "seed=0").iterdir()] == ["lock"]
