"""A full disk (ENOSPC) at a metrics row, a checkpoint or a status write ends the run `failed`
with the reason, keeps the newest good checkpoint and the metrics consistent, and the run
resumes once there is space, ending bit for bit like an uninterrupted run.

The fault is the hook BNLAB_TEST_DISK_FULL_AT (bnlab.train.faults): the targeted write stores
half its bytes and fails with OSError(ENOSPC), and so does every later write of new bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlab.train import read_metrics, read_status
from bnlab.train.checkpoint import list_checkpoints, read_checkpoint
from train.train_cases import (
    assert_same_weights,
    final_weights,
    run_cli,
    tiny_config,
    train_in_child,
    write_config,
)

pytestmark = pytest.mark.slow

# (fault, the newest checkpoint it must leave): a row of step 6 (checkpoint 4 is the newest);
# the checkpoint of step 8 itself (4 stays); the status after checkpoint 8 (it lands in place,
# and the next row, at step 9, fails)
FAULTS = (("metrics:6", 4), ("checkpoint:8", 4), ("status:8", 8))


def _assert_consistent(run: Path, newest: int, reference: Path) -> None:
    status = read_status(run)
    assert status is not None and status["state"] == "failed", status
    assert "No space left on device" in status["error"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no half files kept
    steps = [step for step, _ in list_checkpoints(run / "checkpoints")]
    assert steps[-1] == newest
    for _, path in list_checkpoints(run / "checkpoints"):
        read_checkpoint(path)  # every checkpoint left passes its checksum
    rows = read_metrics(run)
    assert rows == read_metrics(reference)[: len(rows)]  # complete rows, none invented


def test_a_full_disk_fails_the_run_cleanly_and_it_resumes_once_there_is_space(
    tmp_path: Path,
) -> None:
    config = tiny_config()
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert train_in_child(config, reference) == 0
    for fault, newest in FAULTS:
        assert train_in_child(config, run, disk_full_at=fault) == 1, fault
        _assert_consistent(run, newest, reference)

    assert train_in_child(config, run) == 0
    assert read_status(run)["state"] == "finished"  # type: ignore[index]
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert_same_weights(final_weights(run), final_weights(reference))


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", tiny_config(**{"steps": 4}))
    run = tmp_path / "run"
    result = run_cli(
        "train", str(path), "--run-dir", str(run), "--no-progress", disk_full_at="checkpoint:4"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {run} failed (failed at step 0): No space left on device: "
        f"{run / 'checkpoints' / '.step-00000004.ckpt.tmp'}; free space and run the same "
        "command again to resume\n"
    )
    assert list_checkpoints(run / "checkpoints") == []
