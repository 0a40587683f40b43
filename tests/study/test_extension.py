"""The extension: the edge-of-stability rules on made-up series, a tiny run that resumes, and
the figures and verdicts drawn from the stored records."""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.report import extension_section as report
from bnlab.studies.extension import (
    ExtensionSettings,
    hovers_at_edge,
    progressive_sharpening,
    run_extension,
)


def test_progressive_sharpening_needs_a_rise_from_below_the_limit():
    lr = 0.1  # 2/lr = 20
    rising = [2, 2.2, 3, 5, 8, 12, 16, 19, 20, 21, 19, 20]
    assert progressive_sharpening(rising, lr)
    assert not progressive_sharpening([18, 17, 15, 12, 10, 9, 8, 8], lr)  # falling
    # a high first value (before a fast early drop) is no rise
    assert not progressive_sharpening([19, 9, 8.5, 8, 7, 6, 5, 5, 5, 4, 4, 4, 4, 4], lr)
    assert not progressive_sharpening([19, 25, 30, 32, 35, 36], lr)  # started at the limit
    assert not progressive_sharpening([2, 3, 4], lr)  # too short


def test_hovering_means_most_of_the_second_half_within_the_band_of_two_over_lr():
    lr = 0.1
    assert hovers_at_edge([2, 5, 10, 15, 19, 21, 20, 18.5, 22, 20], lr)
    assert not hovers_at_edge([2, 3, 4, 5, 6, 7, 8, 9, 10, 11], lr)
    assert not hovers_at_edge([2, 5, 10, 15, 19, 30, 35, 40, 45, 50], lr)


def test_a_tiny_extension_runs_resumes_and_reports(tmp_path: Path):
    settings = ExtensionSettings(
        samples=64, lr_fractions=(0.5, 0.8), steps=6, sharpness_every=3, hidden=(8,),
        weight_decays=(0.0, 1e-3),
    )  # fmt: skip
    runs = run_extension(tmp_path, settings)
    assert len(runs) == 2 * 2 + 1  # norms x lrs + BN with weight decay
    files = sorted(p.name for p in (tmp_path / "extension").glob("norm=*.json"))
    assert "norm=bn,f=0.8,wd=0.001.json" in files
    bn = next(r for r in runs if r["norm"] == "bn" and r["weight_decay"] == 0)
    assert bn["steps"] == [0, 3] and len(bn["sharpness"]) == 2
    assert bn["layers"] and all(abs(c) < 1e-3 for e in bn["layers"].values() for c in e["cosine"])
    assert bn["lr"] == 0.5 * 2 / bn["initial_sharpness"]
    none = next(r for r in runs if r["norm"] == "none")
    assert none["layers"] == {}
    # a second call reads the stored runs instead of training again
    path = tmp_path / "extension" / "norm=none,f=0.5,wd=0.json"
    marked = {**json.loads(path.read_text()), "marker": True}
    path.write_text(json.dumps(marked))
    again = run_extension(tmp_path, settings)
    assert any(r.get("marker") for r in again)
    stored = report.load_runs(tmp_path)
    assert len(stored) == 5
    eos = report.edge_of_stability(stored, tmp_path)
    elr = report.effective_learning_rate(stored, tmp_path)
    assert eos is not None and eos.path.exists() and elr is not None and elr.path.exists()
    table = report.table(stored)
    assert table is not None and len(table.rows) == 5
    column = table.columns.index("progressive sharpening")
    by_arm = {(row[0], row[2]): row for row in table.rows}
    found = next(r for r in stored if r["norm"] == "bn" and r["weight_decay"] == 1e-3)
    assert by_arm[("BN", "0.001")][column] == ("yes" if found["progressive_sharpening"] else "no")
