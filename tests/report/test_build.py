"""build_report on hand-made study folders: verdicts follow the stored numbers, the page is
written last, and Chromium renders it without a missing image or a console error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from bnlab.report import build_report
from bnlab.report.browser import check_in_chromium, find_chromium
from bnlab.train import RunStore

SETTINGS = {
    "steps": 20,
    "seeds": [0, 1],
    "learning_rates": [0.1],
    "init_scales": [1.0],
    "reference_lr": 0.1,
    "probe_every": 10,
    "curvature_every": 10,
    "batch_size": 8,
    "target_accuracy": 0.9,
}


def _run(
    root: Path,
    norm: str,
    seed: int,
    loss_ranges: list[float],
    bound_ratio: float,
    experiment: str = "landscape",
) -> str:
    name = f"norm={norm},seed={seed}"
    store = RunStore(root / "runs" / experiment / name)
    config = {"seed": seed, "steps": 20, "model": {"norm": norm}, "optim": {"lr": 0.1}}
    store.write_config(tomli_w.dumps(config))
    for step in range(1, 21):
        store.append(step, "train", loss=1.0 / step, accuracy=min(1.0, step / 10))
    for step, spread in zip((10, 20), loss_ranges, strict=True):
        store.append(
            step,
            "probe",
            probe="gradient_path",
            loss=1.0,
            losses=[1.0 - spread, 1.0 - spread / 2],
            gradient_differences=[spread],
            effective_beta_smoothness=spread,
        )
    store.append(20, "eval", split="test", loss=0.1, accuracy=0.95)
    store.set_status("finished", 20)
    store.close()
    if norm == "bn":
        layer = {
            "layer": "features.1",
            "input_gradient_norm": bound_ratio,
            "bound": 1.0,
            "ratio": bound_ratio,
            "channel_ratio_max": bound_ratio,
            "lipschitz_ratio": 0.9,
        }
        measured = root / "measurements" / "landscape" / f"{name}.json"
        measured.parent.mkdir(parents=True, exist_ok=True)
        measured.write_text(json.dumps({"gradient_bound": {"layers": [layer]}}))
    return name


def make_study(root: Path, bn_range: float, standard_range: float, bound_ratio: float) -> Path:
    names = [
        _run(root, norm, seed, [spread * (1 + seed / 10)] * 2, bound_ratio)
        for norm, spread in (("none", standard_range), ("bn", bn_range))
        for seed in (0, 1)
    ]
    manifest = {
        "title": "hand-made study",
        "data": "digits",
        "quick": True,
        "claims": [5, 10],
        "conditioning": [],
        "arms": {"standard": "none", "bn": "bn"},
        "settings": SETTINGS,
        "experiments": [{"name": "landscape", "grid": {}, "runs": names}],
    }
    (root / "study.json").write_text(json.dumps(manifest))
    return root


def add_extension_arm(root: Path, arm: str, norm: str, loss_range: float) -> None:
    """Runs of an extension arm in the folder's landscape_variants, as the study trains them."""
    names = [_run(root, norm, seed, [loss_range] * 2, 1.0, "landscape_variants") for seed in (0, 1)]
    manifest = json.loads((root / "study.json").read_text())
    manifest["extension_arms"] = {arm: norm}
    manifest["experiments"].append({"name": "landscape_variants", "grid": {}, "runs": names})
    (root / "study.json").write_text(json.dumps(manifest))


def _verdicts(root: Path) -> dict[int, str]:
    claims = json.loads((root / "claims.json").read_text())["claims"]
    return {c["id"]: c["verdict"] for c in claims}


def test_verdicts_follow_the_stored_numbers(tmp_path: Path) -> None:
    smooth = make_study(tmp_path / "a", bn_range=0.01, standard_range=0.1, bound_ratio=0.999)
    build_report(smooth)
    assert _verdicts(smooth) == {5: "reproduced", 10: "reproduced"}
    rough = make_study(tmp_path / "b", bn_range=0.1, standard_range=0.01, bound_ratio=1.5)
    build_report(rough)
    assert _verdicts(rough) == {5: "not reproduced", 10: "not reproduced"}
    summary = (rough / "summary.md").read_text()
    assert "| 5 |" in summary and "not reproduced" in summary


def test_numbers_in_claims_json_are_the_seed_values(tmp_path: Path) -> None:
    root = make_study(tmp_path, bn_range=0.01, standard_range=0.1, bound_ratio=0.999)
    build_report(root)
    claim = json.loads((root / "claims.json").read_text())["claims"][0]
    bn = claim["numbers"]["BN, loss range along the gradient path"]
    assert bn["values"] == pytest.approx([0.01, 0.011]) and bn["n"] == 2


def test_extension_arms_get_their_table_and_leave_the_claims_as_they_were(tmp_path: Path) -> None:
    root = make_study(tmp_path, bn_range=0.01, standard_range=0.1, bound_ratio=0.999)
    build_report(root)
    before = json.loads((root / "claims.json").read_text())
    assert "is the smoothing unique to BN?" not in (root / "report.html").read_text()
    # an arm named apart from its kind: found through the study's extension_arms
    add_extension_arm(root, "ln", "layer", loss_range=5.0)
    page = build_report(root).read_text()
    assert json.loads((root / "claims.json").read_text()) == before
    table = page[page.index("is the smoothing unique to BN?") :]
    assert "<td>ln</td><td>5 [5, 5] (n=2)</td>" in table
    assert "below standard&#x27;s: bn; not below: ln." in table


def test_a_failed_build_leaves_no_report_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_study(tmp_path, bn_range=0.01, standard_range=0.1, bound_ratio=0.999)
    build_report(root)
    assert (root / "report.html").exists()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("figure failed")

    monkeypatch.setattr("bnlab.report.build.judge", broken)
    with pytest.raises(RuntimeError):
        build_report(root)
    assert not (root / "report.html").exists()
    assert not list(root.glob(".*.tmp"))


@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_page_renders_in_chromium_and_a_broken_image_is_caught(tmp_path: Path) -> None:
    root = make_study(tmp_path, bn_range=0.01, standard_range=0.1, bound_ratio=0.999)
    page = build_report(root)
    check = check_in_chromium(page)
    assert check.ok and check.images >= 1, check
    broken = tmp_path / "broken.html"
    broken.write_text(
        page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    )
    assert check_in_chromium(broken).broken_images
