"""RunStore and checkpoints: append-only metrics, torn lines, atomic checksummed files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bnlab.train import CheckpointWarning, RunStore, load_latest, read_metrics, read_status
from bnlab.train.checkpoint import (
    CorruptCheckpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from bnlab.train.store import RunStoreWarning


def test_rows_are_appended_flushed_and_read_back(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append(1, "train", loss=0.5, values=torch.tensor([1.0, 2.0]))
    # flushed: a reader sees the row while the writer still holds the file open
    assert read_metrics(tmp_path) == [{"step": 1, "kind": "train", "loss": 0.5, "values": [1, 2]}]
    store.append(1, "eval", loss=float("nan"))
    store.close()
    rows = read_metrics(tmp_path, kind="eval")
    assert len(rows) == 1 and math.isnan(rows[0]["loss"])


def test_a_torn_last_line_is_ignored_and_truncation_drops_it(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for step in range(1, 6):
        store.append(step, "train", loss=float(step))
    store.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "kind": "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    store = RunStore(tmp_path)
    with pytest.warns(RunStoreWarning, match="dropped 1 damaged line"):
        store.truncate_metrics(3)
    store.append(4, "train", loss=40.0)
    store.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["loss"] == 40.0


def test_status_records_state_step_and_times(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert read_status(tmp_path) is None
    store.set_status("running", 3)
    started = read_status(tmp_path)["started"]  # type: ignore[index]
    RunStore(tmp_path).set_status("diverged", 7, reason="loss is nan")
    status = read_status(tmp_path)
    assert status is not None
    assert status["state"] == "diverged" and status["step"] == 7
    assert status["started"] == started and status["updated"] >= started
    with pytest.raises(ValueError, match="known states: running, finished"):
        store.set_status("done", 1)


def test_a_non_writer_store_writes_nothing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run", writer=False)
    store.append(1, "train", loss=1.0)
    store.set_status("running", 1)
    assert not (tmp_path / "run").exists()


def _state(value: float) -> dict[str, object]:
    return {"step": int(value), "model": {"w": torch.full((3,), value)}}


def test_checkpoints_round_trip_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    assert not list(tmp_path.glob(".*.tmp"))
    latest = load_latest(tmp_path)
    assert latest is not None and latest[0] == 15
    assert torch.equal(latest[1]["model"]["w"], torch.full((3,), 15.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(
    tmp_path: Path, damage: str
) -> None:
    save_checkpoint(tmp_path, 4, _state(4), keep=3)
    path = save_checkpoint(tmp_path, 8, _state(8), keep=3)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 50]
    elif damage == "flip":
        raw[-20] ^= 0xFF
    else:
        raw[:4] = b"JUNK"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=r"step-00000008\.ckpt"):
        read_checkpoint(path)
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint .*step-00000008"):
        latest = load_latest(tmp_path)
    assert latest is not None and latest[0] == 4


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "nothing") is None
