"""`bnlab measure` on the example model: the norm layers are swapped and the same report made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.models import MODELS
from bnlab.train.checkpoint import list_checkpoints, read_checkpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_model.py"


@pytest.mark.slow
def test_measure_swaps_norm_layers_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "measure"
    args = ["measure", "--model", f"{EXAMPLE}:small_cnn", "--norms", "none,bn"]
    result = CliRunner().invoke(main, [*args, "--steps", "12", "--seeds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    claims = json.loads((out / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == [4, 5, 6, 7, 10, 11]
    assert (out / "report.html").exists()
    runs = out / "runs" / "landscape"
    for norm, has_bn in (("none", False), ("bn", True)):
        _, last = list_checkpoints(runs / f"norm={norm},seed=0" / "checkpoints")[-1]
        keys = read_checkpoint(last)["model"].keys()
        assert any(k.endswith("running_mean") for k in keys) is has_bn, norm
    assert "user_model" not in MODELS  # the user's model is registered only while measured
