"""Hostile configurations: generated TOML (wrong types, unknown keys, negative and huge numbers,
NaN, empty grids, unknown norm kinds and models) given to `bnlab train`, `bnlab sweep` and
`bnlab reproduce` ends in a run or in one `error:` line with exit code 2, nothing written and
no traceback.

The commands run in-process (CliRunner). A run that passes validation is started for real and
taken through its first step, its evaluation and every probe (`_Session.run` is replaced by
that one step, so a config of 10**30 steps is cheap); a sweep's every grid point is validated
and named; reproduce stops after its checks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab.train
from bnlab.cli import main
from bnlab.train import RunResult, config_to_dict, run_names
from bnlab.train.loop import _Session
from bnlab.train.probes import ProbeContext
from train.train_cases import tiny_config

KEYS = [
    *(k for k in ("seed", "steps", "eval_every", "log_every", "device", "threads", "loss")),
    *(f"data.{k}" for k in ("spec", "batch_size", "eval_batch_size", "test_fraction")),
    *(f"data.{k}" for k in ("split_seed", "standardize", "options")),
    *(f"model.{k}" for k in ("name", "norm", "init_scale", "norm_options", "options")),
    *(f"optim.{k}" for k in ("name", "lr", "momentum", "weight_decay", "options")),
    *(f"schedule.{k}" for k in ("name", "warmup_steps", "step_size", "gamma", "milestones")),
    "schedule.min_lr",
    "checkpoint.every",
    "checkpoint.keep",
    "probes",
    "unknown",
    "model.widths",
    "data.options.n_samples",
    "model.options.hidden",
]

NAMES = ["bn", "none", "batch", "noisy_bn", "mlp", "vgg16", "logistic", "dln", "vgg99", "SGD"]
NAMES += ["Adam", "digits", "cancer", "mouse", "gaussian", "cifar10:/nowhere", "cosine", ""]

SCALARS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, 0.5]),
    st.booleans(),
    st.sampled_from(NAMES),
    st.text(max_size=6),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["eps", "hidden", "depth", "n_samples", "x"]), SCALARS),
    st.just([{"name": "internal_covariate_shift", "every": 1}]),
    st.just([{"name": "nope"}]),
)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


@st.composite
def hostile_configs(draw: st.DrawFn) -> dict[str, Any]:
    """tiny_config() (a valid 12-step run) with one to three keys set to hostile values."""
    data = config_to_dict(tiny_config())
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True)):
        _set(data, key, draw(VALUES))
    return data


def _one_step(self: _Session, progress: Any, latest: Any) -> RunResult:
    """The run's start, its first step, an evaluation and each probe once."""
    self.resume(latest)
    self.step(1)
    self.evaluate(1)
    batch = (self.x_train[:8], self.y_train[:8])
    for hook in self.hooks:
        hook(ProbeContext(self.model, self.loss_fn, batch, self.optimizer, 1))
    return RunResult(self.store.root, "finished", 1)


def _assert_ran_or_refused(result: Result, out: Path, ran: str) -> None:
    if result.exit_code == 0:
        assert result.output.endswith(ran), result.output
        return
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing written


def _write(path: Path, data: dict[str, Any]) -> bool:
    try:
        path.write_text(tomli_w.dumps(data))
    except (TypeError, ValueError):  # a value TOML cannot hold (a 10**30 integer in a list)
        return False
    return True


@settings(max_examples=60)
@given(data=hostile_configs())
def test_train_runs_or_refuses_a_hostile_config(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]
) -> None:
    folder = tmp_path_factory.mktemp("train")
    if not _write(folder / "c.toml", data):
        return
    out = folder / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Session, "run", _one_step)
        result = CliRunner().invoke(
            main, ["train", str(folder / "c.toml"), "--run-dir", str(out), "--no-progress"]
        )
    _assert_ran_or_refused(result, out, f"{out}: finished at step 1\n")


@settings(max_examples=40)
@given(
    data=hostile_configs(),
    grid=st.dictionaries(st.sampled_from(KEYS), st.one_of(VALUES, st.just([])), max_size=2),
)
def test_sweep_runs_or_refuses_a_hostile_grid(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any], grid: dict[str, Any]
) -> None:
    folder = tmp_path_factory.mktemp("sweep")
    if not _write(folder / "s.toml", {**data, "sweep": {"grid": grid}}):
        return
    out = folder / "out"

    def validate_only(config: Any, out_dir: Path, **_: Any) -> dict[str, RunResult]:
        return {
            name: RunResult(Path(out_dir) / name, "finished", 1) for name, _ in run_names(config)
        }

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnlab.train, "sweep", validate_only)
        result = CliRunner().invoke(
            main, ["sweep", str(folder / "s.toml"), "--out", str(out), "--no-progress"]
        )
    _assert_ran_or_refused(result, out, "\n")


@settings(max_examples=15)
@given(
    data_spec=st.one_of(st.sampled_from(NAMES), st.text(max_size=12)),
    # (a million seeds is a valid, enormous study: building its run list alone takes minutes)
    seeds=st.integers(min_value=-(10**6), max_value=20).map(str),
)
def test_reproduce_runs_or_refuses_hostile_options(
    tmp_path_factory: pytest.TempPathFactory, data_spec: str, seeds: str
) -> None:
    folder = tmp_path_factory.mktemp("reproduce")
    out = folder / "study"

    class Checked(Exception):
        """The study passed its checks: stop before training."""

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Checked

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bnlab.studies.run_study", stop)
        result = CliRunner().invoke(
            main, ["reproduce", "--data", data_spec, "--seeds", seeds, "--out", str(out)]
        )
    if isinstance(result.exception, Checked):
        return
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.startswith("error: ") or result.output.startswith("Usage:")
    assert "Traceback" not in result.output
    assert not out.exists()
