"""Small configs and helpers shared by the training tests."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bnlab.train import TrainConfig, config_from_dict, config_to_dict, to_toml, with_values
from bnlab.train.checkpoint import list_checkpoints, read_checkpoint


def tiny_config(**values: Any) -> TrainConfig:
    """vgg_digits with BN on digits, 12 steps of batch 32, a checkpoint every 4 steps; ``values``
    are dotted overrides (``{"optim.lr": 0.5}``)."""
    base = config_from_dict(
        {
            "seed": 1,
            "steps": 12,
            "eval_every": 4,
            "threads": 1,
            "data": {"batch_size": 32},
            "checkpoint": {"every": 4},
        }
    )
    return with_values(base, values) if values else base


def write_config(path: Path, config: TrainConfig) -> Path:
    path.write_text(to_toml(config))
    return path


def _fault_env(kill_at: str | None, disk_full_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_TEST_")}
    if kill_at is not None:
        env["BNLAB_TEST_KILL_AT"] = kill_at
    if disk_full_at is not None:
        env["BNLAB_TEST_DISK_FULL_AT"] = disk_full_at
    return env


def run_cli(
    *args: str, kill_at: str | None = None, disk_full_at: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m bnlab ARGS`` in a fresh process; ``kill_at`` arms the SIGKILL test hook,
    ``disk_full_at`` the full-disk one (bnlab.train.faults)."""
    env = _fault_env(kill_at, disk_full_at)
    return subprocess.run(
        [sys.executable, "-m", "bnlab", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of the run's newest checkpoint."""
    _, path = list_checkpoints(run_dir / "checkpoints")[-1]
    state: dict[str, torch.Tensor] = read_checkpoint(path)["model"]
    return state


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise equal state dicts (tensors, and the noise generators' extra state)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_same_weights(a[key], b[key])
        else:
            assert a[key] == b[key], key


def _train_child(config_data: dict[str, Any], run_dir: str, env: dict[str, str]) -> None:
    from bnlab.train import train

    os.environ.clear()
    os.environ.update(env)
    train(config_from_dict(config_data), run_dir, progress=False)


def train_in_child(
    config: TrainConfig,
    run_dir: Path,
    kill_at: str | None = None,
    disk_full_at: str | None = None,
) -> int | None:
    """Train in a separate process (forked from a fork server that has the trainer imported,
    so it starts fast); ``kill_at`` arms the SIGKILL test hook, ``disk_full_at`` the full-disk
    one. Returns the exit code."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bnlab.train.loop"])
    env = _fault_env(kill_at, disk_full_at)
    process = context.Process(target=_train_child, args=(config_to_dict(config), str(run_dir), env))
    process.start()
    process.join(timeout=300)
    return process.exitcode
