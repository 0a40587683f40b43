"""A run SIGKILLed at any point and restarted ends bit for bit like an uninterrupted one.

The kills are real: the test hook BNLAB_TEST_KILL_AT makes a training process SIGKILL
itself mid-step (after backward, before the update), half-way through writing a metrics row,
half-way through writing a checkpoint file, and right after a checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bnlab.train import read_metrics, read_status
from train.train_cases import (
    assert_same_weights,
    final_weights,
    tiny_config,
    train_in_child,
)

pytestmark = pytest.mark.slow

KILLS = ("step:3", "checkpoint:8", "metrics:10", "after_checkpoint:12")


def test_resume_after_sigkill_at_several_points_is_bitwise(tmp_path: Path) -> None:
    # noisy BN (layer generators), momentum, a warm-up + cosine schedule and 18 steps of batch
    # 128 over 1438 samples (11 per epoch) exercise every piece of saved state
    config = tiny_config(
        **{
            "steps": 18,
            "model.norm": "noisy_bn",
            "data.batch_size": 128,
            "schedule.name": "cosine",
            "schedule.warmup_steps": 2,
        }
    )
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # every run starts the same way (forked from a fork server, one thread): bnlab's numba
    # kernels round differently in forked and fresh processes and for other thread counts
    assert train_in_child(config, reference) == 0

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

    assert train_in_child(config, killed) == 0
    assert read_status(killed)["state"] == "finished"  # type: ignore[index]
    rows = read_metrics(killed)
    assert rows == read_metrics(reference)
    keys = [(r["step"], r["kind"]) for r in rows]
    assert len(keys) == len(set(keys)) == 18 + 6  # train rows; eval at 0, 4, 8, 12, 16, 18
    assert (killed / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert_same_weights(final_weights(killed), final_weights(reference))
