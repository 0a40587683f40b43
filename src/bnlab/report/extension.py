"""The extension section: edge of stability and effective learning rates, from the stored runs.

Reads the run records ``bnlab.studies.extension`` wrote under ``OUT/extension`` (nothing is
trained here) and draws two figures; :func:`table` states per run whether it showed
progressive sharpening and whether it hovered at 2/lr (the rules are in the study module).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bnlab.report.document import FigureFile, Table
from bnlab.report.figures import save_figure

__all__ = ["edge_of_stability", "effective_learning_rate", "load_runs", "table"]


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
