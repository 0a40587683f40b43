"""`bnlab measure --data FILE.py:FACTORY`: the user's own Datasets or DataLoaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.data import FROM_FILES
from bnlab.studies.user_model import user_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FACTORIES = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def regression():
    x = torch.arange(24.0).reshape(12, 2)
    return TensorDataset(x, x.sum(1)), DataLoader(TensorDataset(x[:4], x[:4].sum(1)), batch_size=3)

def classes():
    x = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 4] * 3 + [2])
    return TensorDataset(x, labels), TensorDataset(x, torch.zeros(10).long())

def one():
    return TensorDataset(torch.zeros(3, 2), torch.zeros(3).long())

def lists():
    return [1, 2], [3, 4]

def shapes():
    y = torch.zeros(3).long()
    return TensorDataset(torch.zeros(3, 2), y), TensorDataset(torch.zeros(3, 5), y)

def broken():
    raise RuntimeError("no data today")
"""


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "user_data.py"
    path.write_text(FACTORIES)
    return path


def test_datasets_and_loaders_become_a_bnlab_dataset(factories: Path) -> None:
    reg = user_dataset(f"{factories}:regression")
    assert reg.task == "regression" and reg.num_outputs == 1
    assert reg.x_train.shape == (12, 2) and reg.y_test.shape == (4, 1)
    torch.testing.assert_close(reg.y_train[:, 0], reg.x_train.sum(1))
    cls = user_dataset(f"{factories}:classes")
    assert cls.task == "classification" and cls.num_outputs == 5
    assert cls.y_train.dtype == torch.int64 and cls.x_train.dtype == torch.float32


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("one", "must return (train, test)"),
        ("lists", "the train part is a list, not a torch.utils.data Dataset"),
        ("shapes", "train and test shapes differ"),
        ("broken", "raised RuntimeError: no data today"),
        ("absent", "has no callable 'absent'"),
    ],
)
def test_bad_data_factories_get_one_line_errors(factories: Path, factory: str, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        user_dataset(f"{factories}:{factory}")


def test_the_cli_refuses_bad_data_with_one_error_line(factories: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["measure", "--model", f"{EXAMPLES / 'my_model.py'}:small_cnn", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--data", f"{factories}:shapes"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --data: train and test shapes differ: inputs (2,) vs (5,), targets () vs ()"
    ]
    assert not out.exists()
    assert str(factories) not in FROM_FILES  # registered only while measured


@pytest.mark.slow
def test_measure_runs_on_the_users_data_with_the_new_probes(tmp_path: Path) -> None:
    out = tmp_path / "measure"
    args = [
        "measure",
        "--model",
        f"{EXAMPLES / 'my_model.py'}:small_cnn",
        "--data",
        f"{EXAMPLES / 'my_data.py'}:digits_split",
        "--steps",
        "6",
        "--seeds",
        "1",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists()
    metrics = (out / "runs" / "landscape" / "norm=bn,seed=0" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    probes = {row["probe"]: row for row in rows if row.get("kind") == "probe"}
    assert probes["sharpness"]["sharpness"] > 0
    assert [s["layer"] for s in probes["effective_learning_rates"]["layers"]] == ["0", "4"]
