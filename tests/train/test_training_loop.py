"""train(): rows, determinism, divergence, probes, failure records, corrupt-checkpoint resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bnlab.train import (
    CheckpointWarning,
    ConfigError,
    ProbeContext,
    ProbeHook,
    read_metrics,
    read_status,
    train,
)
from bnlab.train.loop import BatchOrder
from train.train_cases import assert_same_weights, final_weights, tiny_config


def test_a_run_writes_its_directory(tmp_path: Path) -> None:
    result = train(tiny_config(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.state == "finished" and result.step == 12
    assert {p.name for p in run.iterdir()} >= {"config.toml", "env.json", "metrics.jsonl"}
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    train_rows = read_metrics(run, "train")
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in train_rows)
    assert [r["step"] for r in read_metrics(run, "eval")] == [0, 4, 8, 12]
    assert read_status(run)["state"] == "finished"  # type: ignore[index]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step-00000008.ckpt",
        "step-00000012.ckpt",
    ]


def test_same_config_same_numbers(tmp_path: Path) -> None:
    config = tiny_config(**{"model.norm": "noisy_bn"})
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    eval_rows = read_metrics(tmp_path / "a", "eval")
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"]


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    train(tiny_config(), tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    assert train(tiny_config(), tmp_path, progress=False).state == "finished"
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_another_config_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    train(tiny_config(**{"steps": 4}), tmp_path, progress=False)
    (tmp_path / "status.json").unlink()
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        train(tiny_config(**{"steps": 5}), tmp_path, progress=False)


def test_divergence_is_a_result_not_a_crash(tmp_path: Path) -> None:
    config = tiny_config(**{"model.norm": "none", "optim.lr": 1e6, "model.init_scale": 3.0})
    result = train(config, tmp_path, progress=False)
    status = read_status(tmp_path)
    assert status is not None
    assert result.state == "diverged" == status["state"]
    assert status["step"] == result.step < 12
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == list(range(1, result.step + 1))
    assert not math.isfinite(rows[-1]["loss"])
    assert all(math.isfinite(r["loss"]) for r in rows[:-1])
    # a rerun keeps the verdict
    assert train(config, tmp_path, progress=False).state == "diverged"


def test_a_failing_run_is_marked_failed_with_its_traceback(tmp_path: Path) -> None:
    def explode(context: ProbeContext) -> dict[str, Any]:
        if context.step == 6:
            raise RuntimeError("probe exploded")
        return {}

    with pytest.raises(RuntimeError, match="probe exploded"):
        train(tiny_config(), tmp_path, hooks=[ProbeHook("bomb", 3, explode)], progress=False)
    status = read_status(tmp_path)
    assert status is not None and status["state"] == "failed" and status["step"] == 4
    assert "RuntimeError: probe exploded" in (tmp_path / "traceback.txt").read_text()


def test_probes_see_the_batch_before_the_update_and_cannot_change_the_run(tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []

    def meddle(context: ProbeContext) -> dict[str, Any]:
        # a clumsy probe: a forward pass in training mode (moves BN running stats), global
        # RNG draws, eval mode left on
        model = context.model
        loss = context.loss_fn(model(context.batch[0]), context.batch[1])
        torch.rand(5)
        model.eval()
        seen.append((context.step, len(context.batch[0]), float(loss.detach())))
        return {"loss_before_update": float(loss.detach()), "tensor": torch.tensor([1.5])}

    config = tiny_config(**{"model.norm": "noisy_bn"})
    train(config, tmp_path / "plain", progress=False)
    train(config, tmp_path / "probed", hooks=[ProbeHook("meddle", 5, meddle)], progress=False)
    assert [s[:2] for s in seen] == [(5, 32), (10, 32)]
    probe_rows = read_metrics(tmp_path / "probed", "probe")
    assert [(r["step"], r["probe"], r["tensor"]) for r in probe_rows] == [
        (5, "meddle", [1.5]),
        (10, "meddle", [1.5]),
    ]
    plain = [r for r in read_metrics(tmp_path / "plain")]
    probed = [r for r in read_metrics(tmp_path / "probed") if r["kind"] != "probe"]
    assert plain == probed
    assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "probed"))


def test_landscape_probes_from_the_config(tmp_path: Path) -> None:
    config = tiny_config(
        **{
            "steps": 4,
            "probes": [
                {"name": "internal_covariate_shift", "every": 2},
                {"name": "gradient_path", "every": 4, "options": {"etas": [0.1]}},
            ],
        }
    )
    train(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path, "probe")
    assert [(r["step"], r["probe"]) for r in rows] == [
        (2, "internal_covariate_shift"),
        (4, "internal_covariate_shift"),
        (4, "gradient_path"),
    ]
    layers = rows[0]["layers"]
    assert [layer["layer"] for layer in layers] == ["features.0", "features.4", "classifier.1"]
    # the first layer has no earlier layer to move: its gradient does not shift
    assert layers[0]["l2_difference"] == 0.0 and layers[1]["l2_difference"] > 0
    assert rows[2]["etas"] == [0.1] and math.isfinite(rows[2]["effective_beta_smoothness"])


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    config = tiny_config(**{"model.norm": "noisy_bn", "checkpoint.keep": 3})
    train(config, tmp_path / "whole", progress=False)
    run = tmp_path / "damaged"
    train(config, run, progress=False)
    (run / "status.json").unlink()  # as if killed right after the last checkpoint
    last = run / "checkpoints" / "step-00000012.ckpt"
    last.write_bytes(last.read_bytes()[:-1000])
    with pytest.warns(CheckpointWarning, match="step-00000012.ckpt"):
        result = train(config, run, progress=False)
    assert result.state == "finished"
    assert json.loads((run / "env.json").read_text())["resumed_from"] == 8
    assert read_metrics(run) == read_metrics(tmp_path / "whole")
    assert_same_weights(final_weights(run), final_weights(tmp_path / "whole"))


def test_batch_order_splits_each_global_batch_over_ranks() -> None:
    single = BatchOrder(100, 20, seed=3)
    ranks = [BatchOrder(100, 20, seed=3, rank=r, world=2) for r in range(2)]
    for step in (1, 5, 6, 11):  # 5 batches per epoch: crosses epochs
        whole = set(single.indices(step).tolist())
        parts = [set(order.indices(step).tolist()) for order in ranks]
        assert len(whole) == 20 and parts[0] | parts[1] == whole and not parts[0] & parts[1]
    epoch0 = torch.cat([single.indices(s) for s in range(1, 6)])
    epoch1 = torch.cat([single.indices(s) for s in range(6, 11)])
    assert sorted(epoch0.tolist()) == list(range(100)) and not torch.equal(epoch0, epoch1)
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        BatchOrder(100, 21, seed=0, rank=0, world=2)
    with pytest.raises(ConfigError, match="larger than the training set"):
        BatchOrder(10, 20, seed=0)
