"""`bnlab train` / `bnlab sweep`: thin shells; a bad config is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.train import read_metrics, read_status
from bnlab.train.distributed import torchrun_command
from train.train_cases import tiny_config, write_config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optim.lr=-1"], "error: optim.lr: must be > 0, got -1.0"),
        (["--set", "optim.lrr=1"], "error: optim.lrr: unknown key; allowed keys: name, lr,"),
        (["--set", "model.norm=batch"], "error: model.norm: unknown value 'batch'; allowed"),
        (["--set", "data.spec=mnist:/nonexistent"], "error: MNIST: /nonexistent is not a folder"),
        (["--set", "optim.lr"], "error: optim.lr: an override must look like key=value"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_code_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = write_config(tmp_path / "c.toml", tiny_config())
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(path), "--run-dir", str(run), *args])
    assert result.exit_code == 2
    assert result.output.startswith(message)
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_train_command_trains_and_reports(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", tiny_config(**{"steps": 3}))
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", str(path), "--run-dir", str(run), "--no-progress", "--set", "seed=4"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"{run}: finished at step 3\n"
    assert read_status(run)["state"] == "finished"  # type: ignore[index]
    assert "seed = 4" in (run / "config.toml").read_text()


def test_sweep_command_lists_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("steps = 2\nthreads = 1\n[sweep.grid]\nseed = [0, 1]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"finished  step      2  {out / 'seed=0'}",
        f"finished  step      2  {out / 'seed=1'}",
    ]
    assert len(read_metrics(out / "seed=1", "train")) == 2
    bad = CliRunner().invoke(main, ["sweep", str(path), "--set", "steps=0"])
    assert bad.exit_code == 2 and bad.output == "error: steps: must be > 0, got 0\n"


def test_torchrun_command_lines() -> None:
    single = torchrun_command("c.toml", "runs/x", 2, ["optim.lr=0.1"])
    assert single[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "bnlab.train.distributed",
        "c.toml",
        "runs/x",
        "--set",
        "optim.lr=0.1",
    ]
    multi = torchrun_command(
        "c.toml", "runs/x", 4, nnodes="2", node_rank=1, rdzv_endpoint="host:29500"
    )
    assert "--standalone" not in multi
    joined = " ".join(multi)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:29500 --node-rank 1" in joined
