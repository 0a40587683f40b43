"""End to end: `bnlab reproduce --quick` into a temporary folder, as CI's smoke test.

One module-scoped run (one seed, to keep the suite short) feeds every test here: the files
exist, the 11 claims carry computed verdicts with their rules, `bnlab report` rebuilds the same
verdicts from the folder alone, a second `reproduce` trains nothing, and Chromium renders the
page.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.report.browser import check_in_chromium, find_chromium

FIGURES = (
    "training_curves",
    "init_scale",
    "activation_distributions",
    "covariate_shift",
    "landscape",
    "lp_variants",
    "curvature",
    "activation_distributions_dln",
    "covariate_shift_dln",
    "landscape_dln",
    "lp_variants_dln",
    "curvature_dln",
    "mouse_contours",
    "cancer_weights",
    "loss_surfaces",
    "spectral_density",
    "gradient_bound",
    "extension_edge_of_stability",
    "extension_effective_lr",
)
VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


def _bnlab(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bnlab", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    done = _bnlab("reproduce", "--quick", "--seeds", "1", "--out", str(out), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_reproduce_writes_report_claims_and_figures(study: Path) -> None:
    for name in ("report.html", "claims.json", "summary.md", "study.json"):
        assert (study / name).stat().st_size > 0, name
    for figure in FIGURES:
        assert (study / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    claims = json.loads((study / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == list(range(1, 12))
    for claim in claims:
        assert claim["verdict"] in VERDICTS
        assert "def " in claim["rule_source"] and claim["rule"]
        assert claim["numbers"], claim["id"]
        assert claim["settings"], claim["id"]
    by_id = {c["id"]: c for c in claims}
    # verdicts the quick settings determine: Theorem 4.1 is an identity of BN's backward (it
    # holds on any trained weights, in both settings), and claim 9 is closed-form arithmetic
    assert by_id[10]["verdict"] == "reproduced", by_id[10]["notes"]
    assert len(by_id[10]["parts"]) == 2  # judged in the VGG and in the DLN
    assert by_id[9]["verdict"] == "reproduced"
    # claims the paper makes in both settings are judged in both
    for claim_id in (4, 5, 6, 7, 8, 11):
        assert len(by_id[claim_id]["settings"]) == 2, claim_id
    html = (study / "report.html").read_text()
    assert html.index("Claims") < html.index('id="claim-1"') < html.index("Run configurations")
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert "Where the time went" in html and "Environment" in html
    assert "Protocol: the paper" in html and "Verdict thresholds" in html
    assert "Extension (past the paper): edge of stability" in html
    # LayerNorm and GroupNorm beside the paper's arms, in their table, not among the claims
    variants = study / "runs" / "landscape_variants"
    assert {"norm=layer,seed=0", "norm=group,seed=0"} <= {p.name for p in variants.iterdir()}
    table = html[html.index("Extension (past the paper): is the smoothing unique to BN?") :]
    assert "<td>layer</td>" in table and "<td>group</td>" in table


@pytest.mark.slow
def test_report_rebuilds_the_same_verdicts_from_the_folder_alone(study: Path) -> None:
    before = json.loads((study / "claims.json").read_text())
    (study / "report.html").unlink()
    for png in (study / "figures").iterdir():
        png.unlink()
    done = _bnlab("report", str(study))
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((study / "claims.json").read_text())
    assert [c["verdict"] for c in after["claims"]] == [c["verdict"] for c in before["claims"]]
    assert [c["numbers"] for c in after["claims"]] == [c["numbers"] for c in before["claims"]]
    assert (study / "report.html").exists()


@pytest.mark.slow
def test_second_reproduce_skips_finished_runs(study: Path) -> None:
    metrics = sorted((study / "runs").glob("*/*/metrics.jsonl"))
    stamps = [m.stat().st_mtime_ns for m in metrics]
    done = _bnlab("reproduce", "--quick", "--seeds", "1", "--out", str(study), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m.stat().st_mtime_ns for m in metrics] == stamps


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(study: Path, tmp_path: Path) -> None:
    check = check_in_chromium(study / "report.html", screenshot=tmp_path / "report.png")
    assert check.broken_images == [] and check.errors == []
    assert check.images == len(FIGURES)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
