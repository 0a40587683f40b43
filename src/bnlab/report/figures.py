"""The report's figures: one function per figure, each drawn only from stored numbers.

Every function takes the numbers it plots (already read from the run store by
:mod:`bnlab.report.evidence`) and an output folder, and returns a :class:`FigureFile`, or None
when the store holds nothing to draw. Figures are plain matplotlib ``Figure`` objects on an Agg
canvas: no pyplot, no global state, nothing shown.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bnlab.nn.variants import of_arm
from bnlab.report.document import FigureFile, write_atomic

Curve = tuple[Sequence[float], Sequence[Sequence[float]]]  # steps, one value list per seed


def save_figure(
    fig: Figure, out_dir: Path, name: str, title: str, caption: str, setting: str = ""
) -> FigureFile:
    """``setting`` (a setting's title) prefixes the figure's title when the study has several."""
    if setting:
        title = f"{setting}: {title}"
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=90)  # the constrained layout already fits the labels
    path = out_dir / "figures" / f"{name}.png"
    write_atomic(path, buffer.getvalue())
    return FigureFile(name=name, title=title, caption=caption, path=path)


def _has_values(series: Mapping[str, Mapping[str, Curve]]) -> bool:
    return any(
        len(run) for curves in series.values() for _, runs in curves.values() for run in runs
    )


def _subplots(
    rows: int = 1, cols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True
) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _label(arm: str) -> str:
    """The arm's kind's label (bnlab.nn.VARIANTS: the same in every figure), else its name."""
    kind = of_arm(arm)
    return kind.label if kind is not None else arm


def _color(arm: str) -> str | None:
    """The arm's kind's colour (bnlab.nn.VARIANTS); None (matplotlib's cycle) for another."""
    kind = of_arm(arm)
    return kind.color if kind is not None else None


def _band(ax: Any, steps: Sequence[float], runs: Sequence[Sequence[float]], arm: str) -> None:
    """Median over seeds as a line, min-max over seeds as a shaded band; a run that stopped
    early (diverged) is padded with NaN, so the others still draw to the end."""
    length = min(len(steps), max((len(r) for r in runs), default=0))
    if length == 0:
        return
    values = np.full((len(runs), length), np.nan)
    for i, run in enumerate(runs):
        row = np.asarray(run[:length], dtype=np.float64)
        values[i, : len(row)] = row
    x = np.asarray(steps[:length], dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after a divergence
        ax.plot(x, np.nanmedian(values, axis=0), color=_color(arm), label=_label(arm))
        if len(runs) > 1:
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            ax.fill_between(x, low, high, color=_color(arm), alpha=0.2, linewidth=0)


def training_curves(
    curves: Mapping[float, Mapping[str, Curve]], out_dir: Path, *, metric: str, dataset: str
) -> FigureFile | None:
    """Training loss (or accuracy) over steps, one panel per learning rate, one line per arm."""
    if not curves:
        return None
    rates = sorted(curves)
    fig, axes = _subplots(1, len(rates), figsize=(3.2 * len(rates), 3.0), squeeze=False)
    for ax, lr in zip(axes[0], rates, strict=True):
        for arm, (steps, runs) in curves[lr].items():
            _band(ax, steps, runs, arm)
        ax.set_title(f"learning rate {lr:g}")
        ax.set_xlabel("training step")
        if metric == "loss":
            ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss (cross-entropy, nats)" if metric == "loss" else metric)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Training curves per learning rate ({dataset})")
    return save_figure(
        fig,
        out_dir,
        "training_curves",
        "Training curves per learning rate",
        "Median over seeds (line) and min-max over seeds (band); a missing tail means the run "
        "diverged (non-finite loss).",
    )


def init_scale_accuracy(
    accuracy: Mapping[str, Mapping[float, Sequence[float]]], out_dir: Path, *, dataset: str
) -> FigureFile | None:
    """Final test accuracy against the initialization scale, one line per arm."""
    if not accuracy:
        return None
    fig, ax = _subplots(figsize=(4.6, 3.2))
    for arm, by_scale in accuracy.items():
        scales = sorted(by_scale)
        values = [np.asarray(by_scale[s], dtype=np.float64) for s in scales]
        med = [float(np.nanmedian(v)) if len(v) else math.nan for v in values]
        low = [float(np.nanmin(v)) if len(v) else math.nan for v in values]
        high = [float(np.nanmax(v)) if len(v) else math.nan for v in values]
        ax.plot(scales, med, "o-", color=_color(arm), label=_label(arm))
        ax.fill_between(scales, low, high, color=_color(arm), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("initialization scale (multiple of Kaiming std)")
    ax.set_ylabel("final test accuracy (fraction)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"Sensitivity to the initialization scale ({dataset})")
    return save_figure(
        fig,
        out_dir,
        "init_scale",
        "Final accuracy over initialization scales",
        "Median over seeds with min-max band; every run trains for the same number of steps.",
    )


def activation_distributions(
    quantiles: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    out_dir: Path,
    *,
    layer: str,
    levels: Sequence[float],
    name: str = "activation_distributions",
    setting: str = "",
) -> FigureFile | None:
    """Quantiles of one layer's activations over training, one panel per arm (the paper's
    Figure 2 view of distributional stability)."""
    if not quantiles:
        return None
    arms = list(quantiles)
    fig, axes = _subplots(1, len(arms), figsize=(3.4 * len(arms), 3.0), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        steps, rows = quantiles[arm]
        values = np.asarray(rows, dtype=np.float64)
        if values.size == 0:
            continue
        for i, q in enumerate(levels):
            ax.plot(
                steps, values[:, i], color=_color(arm), alpha=0.35 + 0.6 * (1 - abs(q - 0.5) * 2)
            )
        ax.set_title(_label(arm), fontsize=9)
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel("activation value")
    fig.suptitle(
        f"Activation distribution of layer {layer} over training (quantiles "
        + ", ".join(f"{q:g}" for q in levels)
        + ")"
    )
    return save_figure(
        fig,
        out_dir,
        name,
        "Activation distributions over training",
        "Quantiles of one channel-pooled norm-slot output, recorded by the training step's own "
        "forward pass on its batch (noisy BN's noise draw included), first seed.",
        setting,
    )


def covariate_shift(
    shift: Mapping[str, Mapping[str, Sequence[float]]],
    out_dir: Path,
    *,
    layers: Sequence[str],
    name: str = "covariate_shift",
    setting: str = "",
) -> FigureFile | None:
    """ICS per layer (Definition 2.1): l2 difference and cosine of G and G', one bar per arm,
    median over the probed steps and seeds with a min-max whisker."""
    if not shift:
        return None
    fig, axes = _subplots(1, 2, figsize=(9.0, 3.2))
    arms = list(shift)
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(layers))
    for k, arm in enumerate(arms):
        for ax, key in zip(axes, ("l2_difference", "cosine"), strict=True):
            per_layer = [
                np.asarray(shift[arm].get(f"{key}:{layer}", []), float) for layer in layers
            ]
            med = [np.nanmedian(v) if v.size else np.nan for v in per_layer]
            low = [m - np.nanmin(v) if v.size else 0 for m, v in zip(med, per_layer, strict=True)]
            high = [np.nanmax(v) - m if v.size else 0 for m, v in zip(med, per_layer, strict=True)]
            ax.bar(
                x + k * width, med, width, yerr=[low, high], color=_color(arm), label=_label(arm)
            )
    for ax, label in zip(axes, ("||G - G'||_2 (gradient units)", "cos(G, G')"), strict=True):
        ax.set_xticks(
            x + 0.4 - width / 2, [str(layer) for layer in layers], rotation=30, fontsize=7
        )
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Internal covariate shift per layer (Definition 2.1)")
    return save_figure(
        fig,
        out_dir,
        name,
        "Internal covariate shift per layer",
        "G: a layer's gradient; G': the same after the earlier layers take their update. Bars: "
        "median over probed steps and seeds; whiskers: min-max. Larger l2 and smaller cosine mean "
        "more shift.",
        setting,
    )


def landscape_smoothness(
    series: Mapping[str, Mapping[str, Curve]],
    out_dir: Path,
    *,
    name: str = "landscape",
    setting: str = "",
) -> FigureFile | None:
    """Loss variation band, gradient predictiveness and effective beta-smoothness over training
    (the paper's Figure 4), one line per arm."""
    if not _has_values(series):
        return None
    panels = (
        ("loss_range", "loss range along the gradient (nats)", "Loss variation"),
        ("gradient_change", "max ||g(w) - g(w - eta g)||_2", "Gradient predictiveness"),
        ("beta", "max ||dg|| / ||eta g||", "Effective beta-smoothness"),
    )
    fig, axes = _subplots(1, 3, figsize=(11.0, 3.2))
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        for arm, curves in series.items():
            if key in curves:
                _band(ax, curves[key][0], curves[key][1], arm)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Smoothness of the loss landscape along the gradient")
    return save_figure(
        fig,
        out_dir,
        name,
        "Loss landscape along the gradient over training",
        "At each probed step: the loss and gradient at w - eta g over a grid of step sizes eta. "
        "Median over seeds with min-max band.",
        setting,
    )


def conditioning_contours(results: Sequence[Mapping[str, Any]], out_dir: Path) -> FigureFile | None:
    """The mouse example: logistic-loss contours over (w_height, w_age), raw features (left)
    and standardized (right), with the gradient-descent path."""
    pair = [r for r in results if r.get("contour")]
    if len(pair) < 2:
        return None
    fig, axes = _subplots(1, 2, figsize=(10.0, 4.2))
    for ax, result in zip(axes, pair[:2], strict=True):
        grid = result["contour"]
        loss = np.asarray(grid["loss"], dtype=np.float64)
        levels = np.quantile(loss, np.linspace(0.0, 0.9, 14) ** 2)
        contour = ax.contour(grid["w1"], grid["w2"], loss, levels=np.unique(levels), cmap="viridis")
        ax.clabel(contour, fontsize=6, fmt="%.2f")
        path = np.asarray(result["path"], dtype=np.float64)
        ax.plot(path[:, 0], path[:, 1], ".-", color="#d62728", markersize=2, linewidth=0.8)
        ax.plot(path[0, 0], path[0, 1], "o", color="black", label="start (0, 0)")
        ax.plot(path[-1, 0], path[-1, 1], "x", color="#d62728", label="last GD iterate")
        if "optimum" in grid:
            ax.plot(*grid["optimum"], "*", color="black", markersize=9, label="optimum")
        steps = result["gd_steps"]
        done = f"converged in {steps} steps" if steps else f"not converged in {result['max_steps']}"
        ax.set_title(
            f"{result['scaling']} features: cond(H) = {result['hessian_condition']:.3g}\n"
            f"gradient descent {done}",
            fontsize=9,
        )
        unit = " (per raw unit)" if result["scaling"] == "raw" else " (per std)"
        ax.set_xlabel(f"weight of {result['features'][0]}{unit}")
        ax.set_ylabel(f"weight of {result['features'][1]}{unit}")
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Mouse example: logistic loss (nats), raw (left) vs normalized (right)")
    return save_figure(
        fig,
        out_dir,
        "mouse_contours",
        "Mouse example: loss contours and gradient-descent path",
        "Contours of the regularized logistic loss over the two feature weights with the bias at "
        "its optimum; red: gradient descent from zero with step 1/beta.",
    )


def conditioning_weights(
    results: Sequence[Mapping[str, Any]], out_dir: Path, *, dataset: str
) -> FigureFile | None:
    """Where gradient descent stopped, feature by feature, raw vs standardized: every weight in
    units of its feature's standard deviation, so both fits (one model in two coordinate
    systems) are comparable, with the common optimum marked."""
    by_scaling = {r["scaling"]: r for r in results if r.get("dataset") == dataset}
    if {"raw", "standardized"} - set(by_scaling):
        return None
    raw, std = by_scaling["raw"], by_scaling["standardized"]
    features = raw["features"]
    scale = np.asarray(raw["feature_std"], dtype=np.float64)
    y = np.arange(len(features))
    fig, ax = _subplots(figsize=(7.5, 2.0 + 0.2 * len(features)))
    for offset, result, weights, color in (
        (-0.2, raw, np.asarray(raw["weights"]) * scale, "#1f77b4"),
        (0.2, std, np.asarray(std["weights"]), "#d62728"),
    ):
        steps = result["gd_steps"]
        done = f"{steps} steps" if steps else f"stopped at {result['max_steps']} steps"
        label = f"GD on {result['scaling']} features ({done})"
        ax.barh(y + offset, weights, height=0.4, color=color, label=label)
    ax.plot(std["optimal_weights"], y, "k|", markersize=9, label="optimum (both)")
    ax.set_yticks(y, features, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("learned weight (log-odds per standard deviation of the feature)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Learned logistic-regression weight of each feature ({dataset})")
    return save_figure(
        fig,
        out_dir,
        f"{dataset}_weights",
        f"Learned weights per feature, {dataset}",
        "Weights where gradient descent stopped, raw-feature weights multiplied by the "
        "feature's std so both fits read in the same units. On raw features only the weights "
        "of the large-variance features have moved.",
    )


def lp_variants(
    accuracy: Mapping[str, Curve],
    loss_range: Mapping[str, Curve],
    out_dir: Path,
    *,
    name: str = "lp_variants",
    setting: str = "",
    quality: str = "test accuracy (fraction)",
) -> FigureFile | None:
    """lp normalizations against BN and the standard network: test accuracy over training
    (left) and the loss range along the gradient (right)."""
    if not accuracy:
        return None
    fig, axes = _subplots(1, 2, figsize=(10.0, 3.4))
    for arm, (steps, runs) in accuracy.items():
        _band(axes[0], steps, runs, arm)
    for arm, (steps, runs) in loss_range.items():
        _band(axes[1], steps, runs, arm)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(quality)
    axes[0].set_title(quality.split(" (")[0].capitalize())
    if "loss" in quality:
        axes[0].set_yscale("log")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("loss range along the gradient (nats)")
    axes[1].set_yscale("log")
    axes[1].set_title("Loss variation along the gradient")
    axes[1].legend(fontsize=7)
    fig.suptitle("lp normalization variants vs BN and the standard network")
    return save_figure(
        fig,
        out_dir,
        name,
        "lp normalization variants",
        "Median over seeds with min-max band, at the reference learning rate.",
        setting,
    )


def loss_surfaces(surfaces: Mapping[str, Mapping[str, Any]], out_dir: Path) -> FigureFile | None:
    """2-D loss surfaces around the final weights along two random filter-normalized
    directions: standard (left) and BN (right), on one colour scale."""
    arms = [a for a in ("standard", "bn") if a in surfaces]
    if len(arms) < 2:
        return None
    grids = {a: np.asarray(surfaces[a]["losses"], dtype=np.float64) for a in arms}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    levels = np.quantile(finite, np.linspace(0.0, 1.0, 16)) if finite.size else 10
    fig, axes = _subplots(1, 2, figsize=(10.0, 4.2))
    for ax, arm in zip(axes, arms, strict=True):
        surface = surfaces[arm]
        grid = np.log10(np.clip(grids[arm], 1e-12, None))
        mesh = ax.contourf(
            surface["betas"],
            surface["alphas"],
            grid,
            levels=np.log10(np.unique(levels)),
            cmap="viridis",
        )
        ax.plot(0, 0, "r*", markersize=9, label="final weights")
        ax.set_title(f"{_label(arm)}: loss {surface['loss']:.3g} at the centre", fontsize=9)
        ax.set_xlabel("direction 2 (filter-normalized units)")
        ax.set_ylabel("direction 1 (filter-normalized units)")
        ax.legend(fontsize=7, loc="upper right")
        fig.colorbar(mesh, ax=ax, label="log10 training loss (nats)")
    fig.suptitle("2-D loss surface around the final weights: standard (left) vs BN (right)")
    return save_figure(
        fig,
        out_dir,
        "loss_surfaces",
        "2-D loss surfaces",
        "Loss on a fixed batch of training samples at w + a d1 + b d2, d1 and d2 random "
        "filter-normalized directions (Li et al., 2018), first seed; shared colour levels.",
    )


def curvature(
    series: Mapping[str, Mapping[str, Curve]],
    out_dir: Path,
    *,
    name: str = "curvature",
    setting: str = "",
) -> FigureFile | None:
    """Activation-space curvature along the activation gradient (Theorem 4.2), the parameter
    Hessian's top eigenvalue and its curvature along the parameter gradient, over training."""
    if not _has_values(series):
        return None
    fig, axes = _subplots(1, 3, figsize=(13.0, 3.4))
    panels = (
        (
            "activation_curvature",
            "g^T H g / ||g||^2 w.r.t. layer outputs",
            "Activation space (Theorem 4.2)",
        ),
        ("top_eigenvalue", "top Hessian eigenvalue (nats per unit^2)", "Parameter space: top"),
        ("curvature", "g^T H g / ||g||^2 (nats per unit^2)", "Parameter space: along g"),
    )
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        for arm, curves in series.items():
            if key in curves:
                _band(ax, curves[key][0], curves[key][1], arm)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[-1].legend(fontsize=7)
    fig.suptitle("Curvature of the training loss over training")
    return save_figure(
        fig,
        out_dir,
        name,
        "Curvature over training",
        "Left: g^T H g / ||g||^2 with g and H taken w.r.t. the highlighted layers' outputs "
        "(median over those layers). Middle and right: the parameter Hessian's Lanczos top "
        "eigenvalue and g^T H g / ||g||^2 along the parameter gradient. Training-mode loss on "
        "the step's batch; median over seeds with min-max band.",
        setting,
    )


def spectral_density(
    densities: Mapping[str, Mapping[str, Any]], out_dir: Path
) -> FigureFile | None:
    """Hessian eigenvalue density (stochastic Lanczos quadrature) at the final weights."""
    if not densities:
        return None
    fig, ax = _subplots(figsize=(6.0, 3.4))
    for arm, density in densities.items():
        nodes = np.asarray([t for run in density["nodes"] for t in run], dtype=np.float64)
        weights = np.asarray([w for run in density["weights"] for w in run], dtype=np.float64)
        weights = weights / len(density["nodes"])
        span = float(nodes.max() - nodes.min()) if nodes.size else 1.0
        sigma = max(0.01 * span, 1e-6)
        grid = np.linspace(nodes.min() - 3 * sigma, nodes.max() + 3 * sigma, 600)
        values = (
            weights[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
        ).sum(axis=1) / (sigma * np.sqrt(2 * np.pi))
        ax.plot(grid, np.maximum(values, 1e-8), color=_color(arm), label=_label(arm))
    ax.set_yscale("log")
    ax.set_xlabel("Hessian eigenvalue (nats per squared parameter unit)")
    ax.set_ylabel("density (Gaussian-smoothed)")
    ax.set_title("Hessian spectral density at the final weights")
    ax.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "spectral_density",
        "Hessian spectral density",
        "Stochastic Lanczos quadrature (40 iterations) on a fixed batch, first seed; smoothed "
        "with a Gaussian of 1% of the spectrum's range.",
    )


def gradient_bound(
    layers: Mapping[str, Mapping[str, Sequence[float]]], out_dir: Path
) -> FigureFile | None:
    """Theorem 4.1 per BN layer: measured ||dL/dx|| against the bound, one point per seed."""
    if not layers:
        return None
    fig, axes = _subplots(1, 2, figsize=(10.0, 3.4))
    names = list(layers)
    x = np.arange(len(names))
    for i, name in enumerate(names):
        measured = np.asarray(layers[name]["measured"], dtype=np.float64)
        bound = np.asarray(layers[name]["bound"], dtype=np.float64)
        axes[0].scatter(np.full(len(bound), i - 0.1), bound, marker="_", s=300, color="black")
        axes[0].scatter(np.full(len(measured), i + 0.1), measured, color="#d62728", s=14)
        axes[1].scatter(np.full(len(measured), i), measured / bound, color="#d62728", s=14)
    axes[0].scatter([], [], marker="_", color="black", label="bound (Theorem 4.1)")
    axes[0].scatter([], [], color="#d62728", label="measured ||dL/dx||")
    axes[0].legend(fontsize=7)
    axes[0].set_ylabel("gradient norm (loss units per activation unit)")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylabel("measured / bound (<= 1 if the theorem holds)")
    for ax in axes:
        ax.set_xticks(x, names, fontsize=8)
        ax.set_xlabel("BN layer")
    fig.suptitle("Theorem 4.1 on the trained BN network (one point per seed)")
    return save_figure(
        fig,
        out_dir,
        "gradient_bound",
        "Theorem 4.1: gradient norms against the bound",
        "Final weights, fixed batch, training mode; norms summed over channels.",
    )
