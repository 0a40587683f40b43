"""The extension section: edge of stability, effective learning rates and the normalizations
past the paper's, from the stored runs.

Reads the run records ``bnlab.studies.extension`` wrote under ``OUT/extension`` (nothing is
trained here) and draws two figures; :func:`table` states per run whether it showed
progressive sharpening and whether it hovered at 2/lr (the rules are in the study module).
:func:`smoothing_table` sets the extension arms (LayerNorm, GroupNorm: the study's
``extension_arms``) beside standard and BN on the quantities of claims 5-8, reduced by the
claims' own functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bnlab.report.claims import (
    ACCURACY_TOLERANCE,
    SMOOTHNESS_MARGIN,
    SMOOTHNESS_MEASURES,
    per_seed,
    smoothness,
)
from bnlab.report.document import FigureFile, Table
from bnlab.report.evidence import StudyEvidence, final_test_accuracy
from bnlab.report.figures import save_figure
from bnlab.report.verdicts import Spread, Verdict, at_least, smaller

__all__ = [
    "edge_of_stability",
    "effective_learning_rate",
    "load_runs",
    "smoothing_table",
    "table",
]


def load_runs(out: Path) -> list[dict[str, Any]]:
    """The extension's run records in ``out/extension`` (empty if it has none)."""
    folder = out / "extension"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("norm=*.json"))]


def edge_of_stability(runs: Sequence[Mapping[str, Any]], out_dir: Path) -> FigureFile | None:
    """Sharpness over training in units of the stability limit 2/lr (1 = the edge), one panel
    per norm kind, one colour per learning rate."""
    plain = [r for r in runs if r["weight_decay"] == 0 and r["steps"]]
    norms = sorted({r["norm"] for r in plain})
    if not norms:
        return None
    fig = Figure(figsize=(5 * len(norms), 3.6), layout="constrained")
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, norm in zip(axes, norms, strict=True):
        for i, run in enumerate(
            sorted((r for r in plain if r["norm"] == norm), key=lambda r: r["lr"])
        ):
            color = colors[i % len(colors)]
            relative = [s * run["lr"] / 2 for s in run["sharpness"]]
            ax.plot(run["steps"], relative, color=color, label=f"lr {run['lr']:.3g}")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step (full-batch GD)")
        ax.set_ylabel("sharpness / (2 / lr)")
        ax.set_title("standard" if norm == "none" else norm.upper())
        ax.legend(fontsize=8)
    return save_figure(
        fig,
        out_dir,
        "extension_edge_of_stability",
        "Edge of stability: sharpness against 2/lr",
        "Full-batch gradient descent on a fixed digits subset; the sharpness (Lanczos, "
        "warm-started) over the stability limit 2/lr; dashed: the edge (1). Learning rates are "
        "fractions of each arm's limit at initialization.",
    )


def effective_learning_rate(runs: Sequence[Mapping[str, Any]], out_dir: Path) -> FigureFile | None:
    """lr / ||w||^2 of each layer before a normalization over training, with and without
    weight decay (the BN runs at the middle learning rate)."""
    with_layers = [r for r in runs if r["layers"]]
    if not with_layers:
        return None
    fractions = sorted({r["fraction"] for r in with_layers if r["weight_decay"] > 0})
    if not fractions:
        fractions = sorted({r["fraction"] for r in with_layers})
    middle = fractions[len(fractions) // 2]
    chosen = [r for r in with_layers if r["fraction"] == middle]
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for run in sorted(chosen, key=lambda r: r["weight_decay"]):
        style = "-" if run["weight_decay"] == 0 else "--"
        for layer, entry in run["layers"].items():
            ax.plot(
                run["steps"],
                entry["effective_lr"],
                linestyle=style,
                label=f"layer {layer}, wd {run['weight_decay']:g}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective lr = lr / ||w||^2")
    ax.legend(fontsize=8)
    return save_figure(
        fig,
        out_dir,
        "extension_effective_lr",
        "Effective learning rate of scale-invariant weights",
        f"BN runs at lr = {middle:g} of the initial limit: each layer before a BN layer "
        "(weight and bias), without "
        "(solid) and with (dashed) weight decay.",
    )


def table(runs: Sequence[Mapping[str, Any]]) -> Table | None:
    """One row per run: the sharpness's path against 2/lr and what the two rules found."""
    rows: list[list[Any]] = []
    for r in sorted(runs, key=lambda r: (r["norm"], r["fraction"], r["weight_decay"])):
        shown = r["sharpness"]
        if "progressive_sharpening" not in r or not shown:
            continue
        rows.append(
            [
                "standard" if r["norm"] == "none" else r["norm"].upper(),
                f"{r['lr']:.3g} ({r['fraction']:g} of the initial limit)",
                f"{r['weight_decay']:g}",
                f"{shown[0]:.3g} -> max {max(shown):.3g} -> {shown[-1]:.3g}",
                f"{2 / r['lr']:.3g}",
                "yes" if r["progressive_sharpening"] else "no",
                "yes" if r["hovers_at_edge"] else "no",
                "yes" if r["diverged"] else "no",
            ]
        )
    if not rows:
        return None
    return Table(
        title="Extension (past the paper): edge of stability, full-batch gradient descent",
        columns=[
            "arm",
            "lr",
            "weight decay",
            "sharpness (first -> max -> last)",
            "2/lr",
            "progressive sharpening",
            "hovers at 2/lr",
            "diverged",
        ],
        rows=rows,
        note=(
            "Rules fixed before the runs (bnlab.studies.extension): progressive sharpening = "
            "the peak after the first tenth of the measurements is >= 1.5 x the start (the "
            "first tenth's median), which lay below 0.8 x 2/lr; hovers at 2/lr = at least 60% "
            "of the second half's measurements within 20% of 2/lr. Not one of the paper's "
            "claims (Cohen et al., ICLR 2021)."
        ),
    )


ACCURACY = "final test accuracy"


def smoothing_numbers(evidence: StudyEvidence) -> dict[str, dict[str, Spread]]:
    """Arm -> quantity -> per-seed Spread for standard, BN and each extension arm with runs at
    the main setting's reference rate: the three gradient-path quantities of claims 5-7
    (:func:`bnlab.report.claims.smoothness`) and the final test accuracy (claims 3 and 8).
    Empty when no extension arm has runs."""
    extension_arms = [a for a in evidence.manifest.get("extension_arms", {}) if evidence.arm(a)]
    if not extension_arms:
        return {}
    numbers = {}
    for arm in ("standard", "bn", *extension_arms):
        runs = evidence.arm(arm)
        numbers[arm] = {value: smoothness(runs, value) for value in SMOOTHNESS_MEASURES}
        numbers[arm][ACCURACY] = per_seed(runs, final_test_accuracy)
    return numbers


def _grouped(verdicts: Mapping[str, Verdict], words: Mapping[Verdict, str]) -> str:
    """The arms grouped by verdict ("word arm, arm; word arm"), in ``words``' order, naming
    only the verdicts that occur."""
    groups = []
    for verdict, word in words.items():
        named = [arm for arm, v in verdicts.items() if v is verdict]
        if named:
            groups.append(f"{word} {', '.join(named)}")
    return "; ".join(groups)


def smoothing_summary(numbers: Mapping[str, Mapping[str, Spread]]) -> str:
    """What the table shows, in sentences computed from its numbers: per quantity, which arms
    lie below the standard network's (the comparison of claims 5-7), and which arms' accuracy
    is about BN's (claim 8's tolerance)."""
    others = [arm for arm in numbers if arm != "standard"]
    sentences = []
    for value, label in SMOOTHNESS_MEASURES.items():
        standard = numbers["standard"][value]
        verdicts = {a: smaller(numbers[a][value], standard, SMOOTHNESS_MARGIN) for a in others}
        grouped = _grouped(
            verdicts,
            {
                Verdict.REPRODUCED: "below standard's:",
                Verdict.NOT_REPRODUCED: "not below:",
                Verdict.INCONCLUSIVE: "undecided:",
            },
        )
        sentences.append(f"{label[0].upper()}{label[1:]}: {grouped}.")
    if "bn" in numbers:
        bn = numbers["bn"][ACCURACY]
        rest = [a for a in others if a != "bn"]
        verdicts = {a: at_least(numbers[a][ACCURACY], bn, ACCURACY_TOLERANCE) for a in rest}
        grouped = _grouped(
            verdicts,
            {
                Verdict.REPRODUCED: f"within {ACCURACY_TOLERANCE:.0%} of BN's or above:",
                Verdict.NOT_REPRODUCED: "below it:",
                Verdict.INCONCLUSIVE: "undecided:",
            },
        )
        sentences.append(f"Final test accuracy: {grouped}.")
    return " ".join(sentences)


def smoothing_table(evidence: StudyEvidence) -> Table | None:
    """The table "Is the smoothing unique to BN?": per arm (standard, BN, each extension arm)
    the loss variation, gradient change and effective beta-smoothness along the gradient and
    the final test accuracy, median [min, max] over seeds, with a summary computed from them.
    None when the study trained no extension arm."""
    numbers = smoothing_numbers(evidence)
    if not numbers:
        return None
    knobs = evidence.settings
    return Table(
        title="Extension (past the paper): is the smoothing unique to BN?",
        columns=["arm", *SMOOTHNESS_MEASURES.values(), ACCURACY],
        rows=[[arm, *measured.values()] for arm, measured in numbers.items()],
        note=(
            f"{evidence.title()}, lr {knobs.get('reference_lr')}, {knobs.get('steps')} steps: "
            "the extension arms train with the paper's other arms (landscape_variants: same "
            "rate, steps, seeds and gradient-path probe as standard and BN). Per seed, the "
            "median over probed steps, reduced as claims 5-7 reduce them; median [min, max] "
            "(n = seeds). Below standard's = seed median at least "
            f"{SMOOTHNESS_MARGIN:.0%} lower with separated seed ranges (the rule of claims "
            f"5-7); within {ACCURACY_TOLERANCE:.0%} of BN's accuracy: claim 8's tolerance; "
            "undecided: neither way (a gap under the margin, overlapping seed ranges, or fewer "
            "than two finite seeds). Not one of the paper's claims. " + smoothing_summary(numbers)
        ),
    )
