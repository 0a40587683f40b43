"""`bnlab bench layers` as a command: a tiny run prints the table and writes its JSON (the
timings themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bnlab.bench.layers import command


def test_a_tiny_layer_benchmark_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--shapes", "64x16x4x4", "--layers", "bn,noisy_bn", "--formats", "nchw",
        "--modes", "train_fwd_bwd,eval_fwd", "--repeats", "1", "--no-compile-time",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {(t["layer"], t["mode"]) for t in data["timings"]}
    assert rows == {
        (layer, mode) for layer in ("bn", "noisy_bn") for mode in ("train_fwd_bwd", "eval_fwd")
    }
    assert {tuple(t["shape"]) for t in data["timings"]} == {(64, 16, 4, 4)}
    assert all(t["ours_s"] > 0 and t["torch_s"] > 0 for t in data["timings"])
    assert "| bn | 64x16x4x4 | nchw |" in result.output


def test_an_unknown_shape_is_named_in_the_error():
    result = CliRunner().invoke(command, ["--shapes", "64x16x4x4,3x3"])
    assert result.exit_code != 0
    assert "unknown shape ['3x3']" in result.output
