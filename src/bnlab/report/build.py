"""``build_report(folder)``: claims, figures and the report files from a study folder alone."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab.report import extension_section, figures
from bnlab.report.claims import judge
from bnlab.report.document import FigureFile, ReportContent, Table, write_report
from bnlab.report.evidence import (
    Run,
    StudyEvidence,
    final_test_accuracy,
    load_study,
    median,
    probe_series,
)
from bnlab.train.probes import QUANTILE_LEVELS

Curve = tuple[list[float], list[list[float]]]
SMOOTHING = 10  # training-loss curves are drawn as a moving average over this many steps


def _moving_average(values: Sequence[float], width: int) -> list[float]:
    out, total, window = [], 0.0, []
    for v in values:
        window.append(v)
        total += v
        if len(window) > width:
            total -= window.pop(0)
        out.append(total / len(window))
    return out


def _longest_steps(runs: Sequence[Run], rows: str) -> list[float]:
    longest: list[dict[str, Any]] = max(
        (r.train if rows == "train" else r.evals for r in runs), key=len, default=[]
    )
    return [float(row["step"]) for row in longest]


def _train_curve(runs: Sequence[Run]) -> Curve:
    losses = [[float(row["loss"]) for row in r.train] for r in runs]
    return _longest_steps(runs, "train"), [_moving_average(v, SMOOTHING) for v in losses]


def _eval_curve(runs: Sequence[Run]) -> Curve:
    values = [[float(row.get("accuracy", math.nan)) for row in r.evals] for r in runs]
    return _longest_steps(runs, "eval"), values


def _probe_curve(runs: Sequence[Run], probe: str, value: str) -> Curve:
    series = [probe_series(r, probe, value) for r in runs]
    steps = max((s for s, _ in series), key=len, default=[])
    return list(steps), [list(v) for _, v in series]


def _present(evidence: StudyEvidence, arms: Sequence[str]) -> list[str]:
    return [a for a in arms if evidence.arm(a)]


def draw_figures(evidence: StudyEvidence, out: Path) -> dict[str, FigureFile]:
    """Every figure the evidence supports (a figure without data is skipped)."""
    data = str(evidence.manifest.get("data", "?"))
    settings = evidence.settings
    drawn: list[FigureFile | None] = []

    curves = {
        float(lr): {a: _train_curve(evidence.arm(a, lr=lr)) for a in ("standard", "bn")}
        for lr in settings.get("learning_rates", [])
        if evidence.arm("bn", lr=lr) or evidence.arm("standard", lr=lr)
    }
    drawn.append(figures.training_curves(curves, out, metric="loss", dataset=data))

    ref = settings.get("reference_lr")
    by_scale: dict[str, dict[float, list[float]]] = {}
    for arm in ("standard", "bn"):
        for scale in settings.get("init_scales", []):
            runs = evidence.select(arms=[arm], lr=ref, init_scale=scale)
            if runs:
                accs = [final_test_accuracy(r) for r in runs]
                by_scale.setdefault(arm, {})[float(scale)] = [
                    a if math.isfinite(a) else 0.0 for a in accs
                ]
    if len(settings.get("init_scales", [])) > 1:
        drawn.append(figures.init_scale_accuracy(by_scale, out, dataset=data))

    for setting in evidence.setting_names():
        drawn += _setting_figures(evidence, setting, out)

    if "mouse" in evidence.conditioning:
        drawn.append(figures.conditioning_contours(evidence.conditioning["mouse"], out))
    if "cancer" in evidence.conditioning:
        drawn.append(
            figures.conditioning_weights(evidence.conditioning["cancer"], out, dataset="cancer")
        )

    surfaces, densities = {}, {}
    for arm in _present(evidence, ("standard", "bn")):
        measured = evidence.arm(arm)[0].measurements
        if "loss_surface" in measured:
            surfaces[arm] = measured["loss_surface"]
        if "spectral_density" in measured:
            densities[arm] = measured["spectral_density"]
    drawn.append(figures.loss_surfaces(surfaces, out))
    drawn.append(figures.spectral_density(densities, out))

    bound: dict[str, dict[str, list[float]]] = {}
    for setting in evidence.setting_names():
        prefix = "" if setting == evidence.main else f"{setting}: "
        for run in evidence.arm("bn", setting=setting):
            for entry in run.measurements.get("gradient_bound", {}).get("layers", []):
                per = bound.setdefault(prefix + entry["layer"], {"measured": [], "bound": []})
                per["measured"].append(float(entry["input_gradient_norm"]))
                per["bound"].append(float(entry["bound"]))
    drawn.append(figures.gradient_bound(bound, out))
    return {f.name: f for f in drawn if f is not None}


def _layer_median(run: Run, probe: str, value: str, layers: Sequence[str]) -> Curve:
    """(steps, [per-step median over ``layers``]) of ``value:<layer>``."""
    series = [probe_series(run, probe, f"{value}:{layer}") for layer in layers]
    steps = max((st for st, _ in series), key=len, default=[])
    rows = [[v[i] for _, v in series if i < len(v)] for i in range(len(steps))]
    return list(steps), [[median(r) for r in rows]]


def _setting_figures(evidence: StudyEvidence, setting: str, out: Path) -> list[FigureFile | None]:
    """The figures drawn once per setting: activations, ICS, landscape, lp variants, curvature
    (named with a ``_<setting>`` suffix for every setting but the main one)."""
    suffix = "" if setting == evidence.main else f"_{setting}"
    title = evidence.title(setting) if len(evidence.setting_names()) > 1 else ""
    knobs = evidence.setting(setting)

    def arm(a: str) -> list[Run]:
        return evidence.arm(a, setting=setting)

    present = [a for a in ("standard", "bn", "noisy_bn", "l1", "l2", "linf") if arm(a)]
    drawn: list[FigureFile | None] = []

    slot = (knobs.get("highlight_slots") or [""])[-1]
    quantiles: dict[str, tuple[list[float], list[list[float]]]] = {}
    for a in [a for a in ("standard", "bn", "noisy_bn") if a in present]:
        steps, rows = [], []
        for row in arm(a)[0].probes.get("activation_distribution", []):
            for entry in row.get("layers", []):
                if entry["layer"] == slot:
                    steps.append(float(row["step"]))
                    rows.append(entry["quantiles"])
        if rows:
            quantiles[a] = (steps, rows)
    drawn.append(
        figures.activation_distributions(
            quantiles,
            out,
            layer=slot,
            levels=list(QUANTILE_LEVELS),
            name=f"activation_distributions{suffix}",
            setting=title,
        )
    )

    shift: dict[str, dict[str, list[float]]] = {}
    all_layers: list[str] = []
    for a in [a for a in ("standard", "bn") if a in present]:
        for run in arm(a):
            for row in run.probes.get("internal_covariate_shift", []):
                for entry in row.get("layers", []):
                    if entry["layer"] not in all_layers:
                        all_layers.append(entry["layer"])
                    for key in ("l2_difference", "cosine"):
                        shift.setdefault(a, {}).setdefault(f"{key}:{entry['layer']}", []).append(
                            float(entry[key])
                        )
    drawn.append(
        figures.covariate_shift(
            shift, out, layers=all_layers, name=f"covariate_shift{suffix}", setting=title
        )
    )

    smooth = {
        a: {
            value: _probe_curve(arm(a), "gradient_path", value)
            for value in ("loss_range", "gradient_change", "beta")
        }
        for a in present
        if a in ("standard", "bn")
    }
    drawn.append(
        figures.landscape_smoothness(smooth, out, name=f"landscape{suffix}", setting=title)
    )

    lp_arms = [a for a in present if a in ("standard", "bn", "l1", "l2", "linf")]
    if any(a in lp_arms for a in ("l1", "l2", "linf")):
        regression = setting == "dln"
        quality = {
            a: (_train_curve(arm(a)) if regression else _eval_curve(arm(a))) for a in lp_arms
        }
        drawn.append(
            figures.lp_variants(
                quality,
                {a: _probe_curve(arm(a), "gradient_path", "loss_range") for a in lp_arms},
                out,
                name=f"lp_variants{suffix}",
                setting=title,
                quality="training loss (mean squared error)"
                if regression
                else "test accuracy (fraction)",
            )
        )

    layers = knobs.get("highlight_layers", [])
    curvature = {
        a: {
            "activation_curvature": _layer_median_curves(
                arm(a), "activation_curvature", "activation_curvature", layers
            ),
            "top_eigenvalue": _probe_curve(arm(a), "top_eigenvalues", "top_eigenvalue"),
            "curvature": _probe_curve(arm(a), "curvature_along_gradient", "curvature"),
        }
        for a in present
        if a in ("standard", "bn")
    }
    drawn.append(figures.curvature(curvature, out, name=f"curvature{suffix}", setting=title))
    return drawn


def _layer_median_curves(
    runs: Sequence[Run], probe: str, value: str, layers: Sequence[str]
) -> Curve:
    curves = [_layer_median(r, probe, value, layers) for r in runs]
    steps = max((st for st, _ in curves), key=len, default=[])
    return list(steps), [v[0] for _, v in curves]


def protocol_table(evidence: StudyEvidence) -> Table | None:
    """The study's paper-vs-ours table (``study.json``), every deviation with its reason."""
    rows = evidence.manifest.get("protocol_table") or []
    if not rows:
        return None
    return Table(
        "Protocol: the paper's settings and ours",
        ["parameter", "paper (appendix A)", "this study", "deviation and reason"],
        [[*row[:3], row[3] or "none"] for row in rows],
        f"Protocol {evidence.manifest.get('protocol', 'default')!r}. A claim's section names "
        "the setting(s) it was judged in.",
    )


def thresholds_table() -> Table:
    """The verdict thresholds, module constants of bnlab.report.claims fixed before results."""
    from bnlab.report import claims, conditioning_claim

    rows = [
        ["SPEED_MARGIN", claims.SPEED_MARGIN, "claim 1: BN needs this share fewer steps"],
        [
            "SENSITIVITY_MARGIN",
            claims.SENSITIVITY_MARGIN,
            "claim 2: accuracy range this much smaller",
        ],
        ["ACCURACY_TOLERANCE", claims.ACCURACY_TOLERANCE, "claims 3, 8: 'about as accurate'"],
        [
            "LOSS_FACTOR",
            claims.LOSS_FACTOR,
            "claim 8 (DLN): final training loss within this factor",
        ],
        ["ICS_MARGIN", claims.ICS_MARGIN, "claim 4: BN's ICS at least 1 - this of standard's"],
        ["SMOOTHNESS_MARGIN", claims.SMOOTHNESS_MARGIN, "claims 5-8, 11: this much smaller"],
        ["SHIFT_MARGIN", claims.SHIFT_MARGIN, "claims 3, 8: shift larger than standard's by"],
        ["TRAINS_ACCURACY", claims.TRAINS_ACCURACY, "claim 1: final train accuracy that 'trains'"],
        ["BOUND_TOLERANCE", claims.BOUND_TOLERANCE, "claim 10: measured / bound <= 1 + this"],
        [
            "CONDITION_RATIO",
            conditioning_claim.CONDITION_RATIO,
            "claim 9: cond(H) raw / standardized",
        ],
    ]
    return Table(
        "Verdict thresholds",
        ["constant", "value", "used by"],
        rows,
        "Fixed in bnlab/report/claims.py before any result was seen; every comparison also "
        "needs separated seed ranges where its rule says so.",
    )


def run_table(evidence: StudyEvidence) -> Table:
    rows = [
        [
            r.experiment,
            r.name,
            r.arm,
            r.lr,
            r.init_scale,
            r.seed,
            r.status.get("step"),
            r.state,
            final_test_accuracy(r),
            r.wall_seconds,
        ]
        for r in evidence.runs
    ]
    described = []
    for name in evidence.setting_names() or [evidence.main]:
        knobs = evidence.setting(name)
        described.append(
            f"{evidence.title(name)}: {knobs.get('steps')} steps of plain SGD (no momentum, no "
            f"weight decay), batch {knobs.get('batch_size')}, reference learning rate "
            f"{knobs.get('reference_lr')}, probes every {knobs.get('probe_every')} steps "
            f"(Hessian probes every {knobs.get('curvature_every')})"
        )
    note = (
        f"Data {evidence.manifest.get('data')}. {'. '.join(described)}. Full configurations: "
        "runs/<experiment>/<run>/config.toml."
    )
    return Table(
        "Run configurations",
        [
            "experiment",
            "run",
            "arm",
            "lr",
            "init scale",
            "seed",
            "steps",
            "state",
            "final test acc.",
            "wall s",
        ],
        rows,
        note,
    )


def time_table(evidence: StudyEvidence) -> Table:
    """Training vs each probe vs the post-training measurements, in seconds."""
    probe_time: dict[str, float] = {}
    estimated = False
    # one timed call per probe exists for the first standard and BN seed of each setting; other
    # runs borrow their arm's, else BN's, of the same setting
    timed: dict[tuple[str, str], dict[str, float]] = {}
    for run in evidence.runs:
        if run.measurements.get("probe_seconds_per_call"):
            timed[(run.setting, run.arm)] = run.measurements["probe_seconds_per_call"]
    for run in evidence.runs:
        per_call = timed.get((run.setting, run.arm)) or timed.get((run.setting, "bn"), {})
        for probe, calls in run.probes.items():
            recorded = [float(c["seconds"]) for c in calls if "seconds" in c]
            if recorded:
                probe_time[probe] = probe_time.get(probe, 0.0) + sum(recorded)
            elif probe in per_call:
                estimated = True
                probe_time[probe] = probe_time.get(probe, 0.0) + len(calls) * per_call[probe]
    run_total = sum(r.wall_seconds for r in evidence.runs)
    measured: dict[str, float] = {}
    for run in evidence.runs:
        for key, seconds in run.measurements.get("seconds", {}).items():
            measured[key] = measured.get(key, 0.0) + float(seconds)
    how = (
        "estimated: calls x one timed call on the final weights (first standard or BN seed)"
        if estimated
        else "recorded"
    )
    rows: list[list[Any]] = [
        [
            "training (steps, evaluation, checkpoints)",
            run_total - sum(probe_time.values()),
            "run wall time minus probe time",
        ]
    ]
    rows += [[f"probe: {p}", s, how] for p, s in sorted(probe_time.items())]
    rows += [[f"after training: {k}", s, "timed"] for k, s in sorted(measured.items())]
    if "conditioning" in evidence.timing:
        rows.append(["conditioning (claim 9)", evidence.timing["conditioning"], "timed"])
    total = sum(float(r[1]) for r in rows) or 1.0
    for row in rows:
        row.insert(2, f"{100 * float(row[1]) / total:.1f}%")
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in evidence.timing.items() if isinstance(v, float))
    return Table(
        "Where the time went",
        ["part", "seconds (summed over runs)", "share", "how"],
        rows,
        "Seconds summed over runs, which ran in parallel worker processes"
        + (f" (jobs = {evidence.timing.get('jobs')}); " if evidence.timing else "; ")
        + (f"wall clock of the last invocation's phases: {phases}." if phases else ""),
    )


def build_report(folder: str | Path) -> Path:
    """Rebuild ``folder``'s figures, claims.json, summary.md and report.html (written last)
    from its files alone; returns the report's path. Raises StudyFolderError (a ValueError)
    when ``folder`` is not a study folder."""
    out = Path(folder)
    evidence = load_study(out)
    (out / "report.html").unlink(missing_ok=True)
    drawn = draw_figures(evidence, out)
    extension_runs = extension_section.load_runs(out)
    for figure in (
        extension_section.edge_of_stability(extension_runs, out),
        extension_section.effective_learning_rate(extension_runs, out),
    ):
        if figure is not None:
            drawn[figure.name] = figure
    claims = judge(evidence)
    seeds = evidence.settings.get("seeds", [])
    env = next((r.env for r in evidence.runs if r.env), {})
    content = ReportContent(
        title=str(evidence.manifest.get("title", "bnlab report")),
        subtitle=(
            f"Data: {evidence.manifest.get('data')}; "
            f"{'quick' if evidence.manifest.get('quick') else 'full'} study, {len(seeds)} seed(s), "
            f"{len(evidence.runs)} runs; built "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the run store alone."
        ),
        claims=claims,
        figures=drawn,
        tables=[
            t
            for t in (
                protocol_table(evidence),
                thresholds_table(),
                run_table(evidence),
                time_table(evidence),
                extension_section.table(extension_runs),
                extension_section.smoothing_table(evidence),
            )
            if t is not None
        ],
        environment={k: v for k, v in env.items() if k not in ("seed", "resumed_from")},
    )
    return write_report(content, out)
