"""Damaged run stores are repaired or refused with one line, never a traceback, never a silent
mix of two configurations: torn or garbled metrics rows, an empty or garbled status.json, a
checkpoint that fails its checksum, a config.toml edited after the run started."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bnlab.cli import main
from bnlab.train import read_metrics, read_status, train
from train.train_cases import (
    assert_same_weights,
    final_weights,
    snapshot,
    tiny_config,
    write_config,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of tiny_config() (12 steps, checkpoints at 8 and 12)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train(tiny_config(), run, progress=False).state == "finished"
    return run


def _interrupted(reference: Path, run: Path) -> Path:
    """A copy of ``reference`` as if killed after its checkpoint of step 8 (its rows go on to
    step 12): resuming it repeats steps 9 to 12."""
    shutil.copytree(reference, run)
    (run / "checkpoints" / "step-00000012.ckpt").unlink()
    (run / "status.json").unlink()
    (run / "lock").unlink(missing_ok=True)
    return run


def _train(config: Path, run: Path) -> Result:
    return CliRunner().invoke(main, ["train", str(config), "--run-dir", str(run), "--no-progress"])


def _assert_repaired(result: Result, run: Path, reference: Path, warning: str) -> None:
    assert result.exit_code == 0, result.output
    assert result.output == f"warning: {warning}\n{run}: finished at step 12\n"
    assert read_metrics(run) == read_metrics(reference)
    assert_same_weights(final_weights(run), final_weights(reference))


def test_torn_and_garbled_metrics_rows_are_dropped_with_one_line(
    tmp_path: Path, reference: Path
) -> None:
    run = _interrupted(reference, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    rows.insert(3, b"\xff\xfe\x00 not a row\n")  # bytes that are not even UTF-8
    (run / "metrics.jsonl").write_bytes(b"".join(rows) + b'{"step": 13, "kind": "tr')
    result = _train(write_config(tmp_path / "c.toml", tiny_config()), run)
    _assert_repaired(
        result,
        run,
        reference,
        f"{run / 'metrics.jsonl'}: dropped 2 damaged line(s) (a row torn by a crash or a full "
        "disk); the rows up to the checkpoint are kept",
    )


@pytest.mark.parametrize(
    ("content", "damage"),
    [
        (b"", "empty"),
        (b"\x00" * 64, "not JSON"),  # a file the crash left allocated but unwritten
        (b"\xff\xfe{", "not JSON"),
        (b"[1, 2]", "not a JSON object: list"),
        (b'{"state": "finished"}', "bad step None"),
        (b'{"state": "done", "step": 3}', "unknown state 'done'"),
    ],
)
def test_a_damaged_status_is_rebuilt_from_the_newest_checkpoint(
    tmp_path: Path, reference: Path, content: bytes, damage: str
) -> None:
    run = _interrupted(reference, tmp_path / "run")
    (run / "status.json").write_bytes(content)
    assert read_status(run) is None
    result = _train(write_config(tmp_path / "c.toml", tiny_config()), run)
    warning = f"{run / 'status.json'} is damaged ({damage}); rebuilt from the newest checkpoint"
    _assert_repaired(result, run, reference, warning)


def test_a_checkpoint_failing_its_checksum_is_skipped_with_one_line(
    tmp_path: Path, reference: Path
) -> None:
    run = _interrupted(reference, tmp_path / "run")
    shutil.copy(reference / "checkpoints" / "step-00000012.ckpt", run / "checkpoints")
    newest = run / "checkpoints" / "step-00000012.ckpt"
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF  # one byte flipped deep in the payload
    newest.write_bytes(bytes(data))
    result = _train(write_config(tmp_path / "c.toml", tiny_config()), run)
    warning = (
        f"skipping damaged checkpoint {newest} (checksum mismatch: truncated or corrupted); "
        "trying the previous one"
    )
    _assert_repaired(result, run, reference, warning)


def test_no_readable_checkpoint_starts_the_run_again_with_one_line(
    tmp_path: Path, reference: Path
) -> None:
    run = _interrupted(reference, tmp_path / "run")
    only = run / "checkpoints" / "step-00000008.ckpt"
    only.write_bytes(only.read_bytes()[:-10])
    result = _train(write_config(tmp_path / "c.toml", tiny_config()), run)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"warning: skipping damaged checkpoint {only} (checksum mismatch: truncated or "
        "corrupted); trying the previous one",
        f"warning: no readable checkpoint in {run / 'checkpoints'}; the run starts again from "
        "step 0",
        f"{run}: finished at step 12",
    ]
    assert read_metrics(run) == read_metrics(reference)


def test_a_config_edited_after_the_run_started_is_refused_not_mixed(
    tmp_path: Path, reference: Path
) -> None:
    run = _interrupted(reference, tmp_path / "run")
    write_config(run / "config.toml", tiny_config(**{"optim.lr": 0.5}))
    before = snapshot(run)
    result = _train(run / "config.toml", run)
    before.pop("lock", None)
    assert result.exit_code == 2
    assert result.output == (
        f"error: run_dir: {run} holds a run of a different config: its checkpoint of step 8 "
        "was trained with optim.lr 0.1 -> 0.5; resume it with that config (restore its "
        "config.toml, or --set the old values) or train this one in another run directory\n"
    )
    after = snapshot(run)
    after.pop("lock")  # held while the configs were compared
    assert after == before  # nothing written

    # the config the run started with resumes it and restores its config.toml
    result = _train(write_config(tmp_path / "c.toml", tiny_config()), run)
    warning = (
        f"{run / 'config.toml'} was edited after the run started; restored to the config its "
        "checkpoints were trained with"
    )
    _assert_repaired(result, run, reference, warning)
    assert (run / "config.toml").read_text() == (reference / "config.toml").read_text()
