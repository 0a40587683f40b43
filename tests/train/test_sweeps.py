"""Sweeps: one directory per grid point, parallel workers, skip finished, resume the rest, a
crashing worker fails its own run only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnlab.train import ConfigError, SweepConfig, load_sweep_config, read_status, run_names, sweep
from train.train_cases import tiny_config

pytestmark = pytest.mark.slow


def test_run_names_are_deterministic_and_unambiguous() -> None:
    grid = {"model.norm": ["none", "bn"], "optim.lr": [0.1, 0.5], "seed": [0]}
    names = [name for name, _ in run_names(SweepConfig(tiny_config(), grid))]
    assert names == [
        "norm=none,lr=0.1,seed=0",
        "norm=none,lr=0.5,seed=0",
        "norm=bn,lr=0.1,seed=0",
        "norm=bn,lr=0.5,seed=0",
    ]
    configs = [c for _, c in run_names(SweepConfig(tiny_config(), grid))]
    assert (configs[3].model.norm, configs[3].optim.lr) == ("bn", 0.5)
    clash = {"optim.options.eps": [1e-8], "model.norm_options.eps": [1e-3]}
    adam = tiny_config(**{"optim.name": "Adam"})
    assert [n for n, _ in run_names(SweepConfig(adam, clash))] == [
        "optim.options.eps=1e-08,model.norm_options.eps=0.001"
    ]
    both = {"data.options.n_samples": [100], "model.options.hidden": [[4]]}
    config = tiny_config(**{"data.spec": "mouse", "model.name": "mlp"})
    assert [n for n, _ in run_names(SweepConfig(config, both))] == ["n_samples=100,hidden=4"]


def test_a_bad_grid_value_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.norm: unknown value 'batch'"):
        SweepConfig(tiny_config(), {"model.norm": ["bn", "batch"]})
    with pytest.raises(ConfigError, match=r"^sweep\.grid\.seed: expected a non-empty list"):
        SweepConfig(tiny_config(), {"seed": 3})  # type: ignore[dict-item]
    path = tmp_path / "s.toml"
    path.write_text("steps = 3\n[sweep]\ngrid = { seed = [0, 1] }\nextra = 1\n")
    with pytest.raises(ConfigError, match="sweep: expected a table with one key: grid"):
        load_sweep_config(path)


def test_sweep_runs_skips_and_isolates_a_crashing_worker(tmp_path: Path) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(
        "steps = 4\neval_every = 0\nthreads = 1\n[data]\nbatch_size = 32\n"
        f'[sweep.grid]\n"data.spec" = ["digits", "mnist:{tmp_path / "no-such-folder"}"]\n'
        "seed = [0, 1]\n"
    )
    config = load_sweep_config(path)
    out = tmp_path / "out"
    results = sweep(config, out, jobs=2, progress=False)
    assert {name.split(",")[0][5:10] + name[-1]: r.state for name, r in results.items()} == {
        "digit0": "finished",
        "digit1": "finished",
        "mnist0": "failed",
        "mnist1": "failed",
    }
    for name, result in results.items():
        assert result.run_dir == out / name
        if result.state == "failed":
            text = (result.run_dir / "traceback.txt").read_text()
            assert "DataFileError" in text and "no-such-folder is not a folder" in text
    finished = [r.run_dir for r in results.values() if r.state == "finished"]
    stamps = [os.stat(d / "metrics.jsonl").st_mtime_ns for d in finished]

    again = sweep(config, out, jobs=2, progress=False)
    assert {n: r.state for n, r in again.items()} == {n: r.state for n, r in results.items()}
    assert [os.stat(d / "metrics.jsonl").st_mtime_ns for d in finished] == stamps


def test_a_killed_worker_fails_its_run_and_the_rerun_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SweepConfig(tiny_config(**{"steps": 6, "checkpoint.every": 2}), {"seed": [0, 1]})
    monkeypatch.setenv("BNLAB_TEST_KILL_AT", "step:5")  # the workers SIGKILL themselves
    results = sweep(config, tmp_path, jobs=2, progress=False)
    for result in results.values():
        status = read_status(result.run_dir)
        assert result.state == "failed" and status is not None
        assert status["error"] == "worker process ended (killed by signal 9)"
        assert "without a Python traceback" in (result.run_dir / "traceback.txt").read_text()
    monkeypatch.delenv("BNLAB_TEST_KILL_AT")
    results = sweep(config, tmp_path, jobs=2, progress=False)
    for result in results.values():
        assert result.state == "finished"
        assert (result.run_dir / "env.json").read_text().count('"resumed_from": 4') == 1
