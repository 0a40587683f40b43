"""Read a study folder (``study.json``, the run stores, the measurements) into plain numbers.

Nothing here trains or measures: every value comes from a file written by ``bnlab reproduce``
or ``bnlab measure``. Per-run quantities are reduced over training steps here; the claims in
:mod:`bnlab.report.claims` then compare them across arms, seed by seed.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.train import read_metrics, read_status

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MOVING_AVERAGE = 10  # train rows averaged for "steps to reach the target accuracy"


class StudyFolderError(ValueError):
    """The folder is not a study folder, or a file in it cannot be read."""


@dataclass
class Run:
    """One run directory, with what the report needs from it."""

    experiment: str
    name: str
    path: Path
    arm: str
    norm: str
    lr: float
    init_scale: float
    seed: int
    config: dict[str, Any]
    status: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    probes: dict[str, list[dict[str, Any]]]
    env: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    setting: str = "vgg"

    @property
    def state(self) -> str:
        return str(self.status.get("state", "missing"))

    @property
    def wall_seconds(self) -> float:
        return float(self.status.get("updated", 0.0)) - float(self.status.get("started", 0.0))


@dataclass
class StudyEvidence:
    """Everything in a study folder."""

    root: Path
    manifest: dict[str, Any]
    runs: list[Run]
    conditioning: dict[str, list[dict[str, Any]]]
    timing: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        """The main setting's knobs (VGG, or the MLP of feature-vector data)."""
        settings: dict[str, Any] = self.manifest.get("settings", {})
        return settings

    @property
    def main(self) -> str:
        return str(self.settings.get("name", "vgg"))

    def setting(self, name: str | None = None) -> dict[str, Any]:
        """The knobs of setting ``name`` (default: the main one); {} if the study has none."""
        if name is None or name == self.main:
            return self.settings
        dln: dict[str, Any] | None = self.manifest.get("dln")
        return dln if dln is not None and dln.get("name") == name else {}

    def setting_names(self) -> list[str]:
        """The settings with runs, main first."""
        names = [self.main] + ([self.manifest["dln"]["name"]] if self.manifest.get("dln") else [])
        return [n for n in names if any(r.setting == n for r in self.runs)]

    def title(self, name: str | None = None) -> str:
        return str(self.setting(name).get("title", name or self.main))

    def select(
        self,
        *,
        arms: Iterable[str] | None = None,
        experiments: Iterable[str] | None = None,
        lr: float | None = None,
        init_scale: float | None = None,
        setting: str | None = None,
    ) -> list[Run]:
        arm_set = None if arms is None else set(arms)
        experiment_set = None if experiments is None else set(experiments)
        wanted = setting or self.main
        return [
            r
            for r in self.runs
            if r.setting == wanted
            and (arm_set is None or r.arm in arm_set)
            and (experiment_set is None or r.experiment in experiment_set)
            and (lr is None or math.isclose(r.lr, lr))
            and (init_scale is None or math.isclose(r.init_scale, init_scale))
        ]

    def arm(
        self,
        arm: str,
        *,
        lr: float | None = None,
        init_scale: float = 1.0,
        setting: str | None = None,
    ) -> list[Run]:
        """The runs of one arm of a setting (default the main one) at its reference point (or
        another rate), sorted by seed."""
        rate = self.setting(setting).get("reference_lr") if lr is None else lr
        runs = self.select(arms=[arm], lr=rate, init_scale=init_scale, setting=setting)
        return sorted(runs, key=lambda r: r.seed)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StudyFolderError(f"cannot read {path}: {error}") from error


def load_run(
    experiment: str, path: Path, arms: dict[str, str], measurements: Path, setting: str = "vgg"
) -> Run:
    """One run store as a :class:`Run`."""
    try:
        config = tomllib.loads((path / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise StudyFolderError(f"cannot read {path / 'config.toml'}: {error}") from error
    norm = str(config.get("model", {}).get("norm", "none"))
    arm_of = {kind: arm for arm, kind in arms.items()}
    rows = read_metrics(path)
    probes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "probe":
            probes.setdefault(str(row.get("probe")), []).append(row)
    env_path = path / "env.json"
    measured = measurements / f"{path.name}.json"
    return Run(
        experiment=experiment,
        name=path.name,
        path=path,
        arm=arm_of.get(norm, norm),
        norm=norm,
        lr=float(config.get("optim", {}).get("lr", math.nan)),
        init_scale=float(config.get("model", {}).get("init_scale", 1.0)),
        seed=int(config.get("seed", 0)),
        config=config,
        status=read_status(path) or {"state": "missing"},
        train=[r for r in rows if r.get("kind") == "train"],
        evals=[r for r in rows if r.get("kind") == "eval"],
        probes=probes,
        env=_read_json(env_path) if env_path.exists() else {},
        measurements=_read_json(measured) if measured.exists() else {},
        setting=setting,
    )


def load_study(root: str | Path) -> StudyEvidence:
    """Read the study folder ``root``. Raises StudyFolderError when it is not one."""
    root = Path(root)
    manifest_path = root / "study.json"
    if not manifest_path.exists():
        raise StudyFolderError(
            f"{root} is not a study folder (no study.json); run `bnlab reproduce --out {root}` "
            "or `bnlab measure ... --out` first"
        )
    manifest = _read_json(manifest_path)
    # the extension arms are named like the paper's, so the report finds them by arm too
    arms = {**manifest.get("extension_arms", {}), **manifest.get("arms", {})}
    main = str(manifest.get("settings", {}).get("name", "vgg"))
    runs = []
    for experiment in manifest.get("experiments", []):
        folder = root / "runs" / experiment["name"]
        for name in experiment.get("runs", []):
            if (folder / name / "config.toml").exists():
                runs.append(
                    load_run(
                        experiment["name"],
                        folder / name,
                        arms,
                        root / "measurements" / experiment["name"],
                        str(experiment.get("setting", main)),
                    )
                )
    conditioning = {}
    for name in manifest.get("conditioning", []):
        path = root / "conditioning" / f"{name}.json"
        if path.exists():
            conditioning[name] = _read_json(path)
    timing_path = root / "timing.json"
    timing = _read_json(timing_path) if timing_path.exists() else {}
    return StudyEvidence(root, manifest, runs, conditioning, timing)


# ------------------------------------------------------------------- per-run quantities


def steps_to_accuracy(run: Run, target: float) -> float:
    """First step at which the moving average of training accuracy reaches ``target``; inf if
    it never does (diverged, or too slow for the budget)."""
    acc = [float(r.get("accuracy", math.nan)) for r in run.train]
    for end in range(MOVING_AVERAGE, len(acc) + 1):
        window = acc[end - MOVING_AVERAGE : end]
        if all(math.isfinite(a) for a in window) and sum(window) / MOVING_AVERAGE >= target:
            return float(run.train[end - 1]["step"])
    return math.inf


def final_test_accuracy(run: Run) -> float:
    """Test accuracy at the last evaluation of a finished run; NaN for a diverged run."""
    if run.state != "finished" or not run.evals:
        return math.nan
    return float(run.evals[-1].get("accuracy", math.nan))


def probe_series(run: Run, probe: str, value: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one reduced quantity of a probe's rows over training.

    ``value``: "loss_range" (max - min of the loss over the gradient path, the centre point
    included), "gradient_change" (largest ||g(w) - g(w - eta g)||), "beta" (effective
    beta-smoothness), "top_eigenvalue", "top_eigenvalue_converged" (1 or 0), "curvature"
    (parameter space, along the gradient), "activation_curvature:<layer>" (w.r.t. the layer's
    output, along its gradient), "ics_l2:<layer>", "ics_cos:<layer>".
    """
    steps, values = [], []
    for row in run.probes.get(probe, []):
        v = _reduce(row, value)
        if v is not None:
            steps.append(float(row["step"]))
            values.append(v)
    return steps, values


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _reduce(row: dict[str, Any], value: str) -> float | None:
    if value == "loss_range":
        losses = [_number(x) for x in [row.get("loss"), *row.get("losses", [])]]
        return max(losses) - min(losses) if losses else None
    if value == "gradient_change":
        return max((_number(x) for x in row.get("gradient_differences", [])), default=None)
    if value == "beta":
        return _number(row.get("effective_beta_smoothness"))
    if value == "top_eigenvalue":
        eigenvalues = row.get("eigenvalues") or []
        return _number(eigenvalues[0]) if eigenvalues else None
    if value == "top_eigenvalue_converged":
        return 1.0 if row.get("converged") is True else 0.0
    if value == "curvature":
        return _number(row.get("curvature"))
    if value.startswith("activation_curvature:"):
        layer = value.partition(":")[2]
        for entry in row.get("layers", []):
            if entry.get("layer") == layer:
                return _number(entry.get("curvature"))
        return None
    kind, _, layer = value.partition(":")
    key = {"ics_l2": "l2_difference", "ics_cos": "cosine"}.get(kind)
    if key is not None:
        for entry in row.get("layers", []):
            if entry.get("layer") == layer:
                return _number(entry.get(key))
    return None


def ics_layers(runs: Sequence[Run], highlight: Sequence[str] = ()) -> list[str]:
    """The layers claim 4 judges: the setting's highlighted layers where the ICS probe measured
    them; otherwise every probed layer in forward order, the model's first layer dropped when
    it was probed (nothing precedes it, so its G and G' coincide by definition)."""
    for run in runs:
        rows = run.probes.get("internal_covariate_shift", [])
        if rows:
            probed = [entry["layer"] for entry in rows[0].get("layers", [])]
            chosen = [layer for layer in highlight if layer in probed]
            if chosen:
                return chosen
            options: dict[str, Any] = next(
                (
                    p.get("options", {})
                    for p in run.config.get("probes", [])
                    if p.get("name") == "internal_covariate_shift"
                ),
                {},
            )
            return probed if options.get("layers") else probed[1:]
    return []


def median(values: Sequence[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def distribution_shift(run: Run) -> float:
    """Mean movement of the watched layers' output distributions between consecutive records of
    the ``activation_distribution`` probe (the step's own forward pass, so noisy BN's draw is
    the one training used): per layer, the mean absolute change of 20 quantiles (a 1-D
    Wasserstein-1 estimate) divided by the pooled std at the later record so that scales
    compare, averaged over record pairs and then layers; NaN if the probe is absent."""
    per_layer: dict[str, list[dict[str, Any]]] = {}
    for row in run.probes.get("activation_distribution", []):
        for entry in row.get("layers", []):
            per_layer.setdefault(entry["layer"], []).append(entry)
    shifts = []
    for records in per_layer.values():
        moves = []
        for before, after in itertools.pairwise(records):
            q0, q1 = before["shift_quantiles"], after["shift_quantiles"]
            scale = float(after["std"]) or math.nan
            moves.append(sum(abs(a - b) for a, b in zip(q0, q1, strict=True)) / len(q0) / scale)
        if moves:
            shifts.append(sum(moves) / len(moves))
    return sum(shifts) / len(shifts) if shifts else math.nan


def final_train_loss(run: Run, last: int = MOVING_AVERAGE) -> float:
    """Mean training loss of the ``last`` rows of a finished run; NaN for a diverged one."""
    losses = [float(r.get("loss", math.nan)) for r in run.train[-last:]]
    if run.state != "finished" or not losses:
        return math.nan
    return sum(losses) / len(losses)
