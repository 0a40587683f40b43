"""A run SIGKILLed at any point and restarted ends bit for bit like an uninterrupted one.

The kills are real: the test hook BNLAB_TEST_KILL_AT makes a training process SIGKILL
itself mid-step (after backward, before the update), half-way through writing a metrics row,
half-way through writing a checkpoint file, and right after a checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bnlab.train import read_metrics, read_status, train
from train.train_cases import (
    assert_same_weights,
    final_weights,
    run_cli,
    tiny_config,
    train_in_child,
    write_config,
)

pytestmark = pytest.mark.slow

KILLS = ("step:3", "checkpoint:8", "metrics:10", "after_checkpoint:12")


def test_resume_after_sigkill_at_several_points_is_bitwise(tmp_path: Path) -> None:
    # noisy BN (layer generators), momentum, a warm-up + cosine schedule and 18 steps of batch
    # 64 over 1437 samples (22 per epoch) exercise every piece of saved state
    config = tiny_config(
        **{
            "steps": 18,
            "model.norm": "noisy_bn",
            "data.batch_size": 64,
            "schedule.name": "cosine",
            "schedule.warmup_steps": 2,
        }
    )
    path = write_config(tmp_path / "config.toml", config)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted reference runs in this process (one torch thread, as the config says)
    assert train(config, reference, progress=False).state == "finished"

    for kill in KILLS:
        where, step = kill.split(":")
        assert train_in_child(config, killed, kill_at=kill) == -signal.SIGKILL, kill
        status = read_status(killed)
        assert status is not None and status["state"] == "running"
        if where == "metrics":  # the torn line is on disk
            assert not (killed / "metrics.jsonl").read_text().endswith("\n")
        if where == "checkpoint":  # a half-written temp file, never a half checkpoint
            assert (killed / "checkpoints" / f".step-{int(step):08d}.ckpt.tmp").exists()
            assert not (killed / "checkpoints" / f"step-{int(step):08d}.ckpt").exists()

    # the last restart goes through the command line, as a user would resume
    result = run_cli("train", str(path), "--run-dir", str(killed), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"{killed}: finished at step 18" in result.stdout
    assert read_status(killed)["state"] == "finished"  # type: ignore[index]
    rows = read_metrics(killed)
    assert rows == read_metrics(reference)
    keys = [(r["step"], r["kind"]) for r in rows]
    assert len(keys) == len(set(keys)) == 18 + 6  # train rows; eval at 0, 4, 8, 12, 16, 18
    assert (killed / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert_same_weights(final_weights(killed), final_weights(reference))
