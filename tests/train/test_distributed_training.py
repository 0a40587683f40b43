"""`bnlab train --nproc 2` (torchrun, gloo, DDP, synced BN) matches one process on the same
global batch, and a distributed run killed after a checkpoint resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.train import read_metrics, read_status, train
from train.train_cases import final_weights, run_cli, tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_processes_match_one_process_and_resume(tmp_path: Path) -> None:
    # BN statistics are reduced over both ranks and DDP averages the two half-batch gradients,
    # so each step is the single-process step on the same 32 samples, up to float rounding.
    config = tiny_config(**{"steps": 6, "eval_every": 3, "checkpoint.every": 3, "optim.lr": 0.05})
    path = write_config(tmp_path / "config.toml", config)
    single, double = tmp_path / "single", tmp_path / "double"
    assert train(config, single, progress=False).state == "finished"

    args = ("train", str(path), "--run-dir", str(double), "--nproc", "2", "--no-progress")
    killed = run_cli(*args, kill_at="after_checkpoint:3", timeout=240)
    assert killed.returncode != 0
    assert read_status(double)["step"] == 3  # type: ignore[index]
    resumed = run_cli(*args, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(double)["state"] == "finished"  # type: ignore[index]

    rows_1, rows_2 = read_metrics(single), read_metrics(double)
    assert [(r["step"], r["kind"]) for r in rows_1] == [(r["step"], r["kind"]) for r in rows_2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    weights_1, weights_2 = final_weights(single), final_weights(double)
    assert weights_1.keys() == weights_2.keys()
    for key, value in weights_1.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights_2[key], value, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(weights_2[key], value), key
