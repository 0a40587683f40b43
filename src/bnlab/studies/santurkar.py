"""The Santurkar et al. (2018) reproduction, declared as data: which runs, which probes, which
claims. :mod:`bnlab.studies.run` executes it; :mod:`bnlab.report` judges it.

Three experiments, each a :class:`bnlab.train.SweepConfig` run into ``OUT/runs/<experiment>/``:

- ``landscape``: every norm arm (standard, BN, noisy BN, l1, l2, l-infinity) at the reference
  learning rate, with the landscape probes every few steps and a checkpoint at each probe
  period (activation distributions and the final-weight measurements are taken from them);
- ``learning_rate``: standard vs BN over the other learning rates of the grid;
- ``init_scale``: standard vs BN over the other initialization scales.

The reference point (reference learning rate, init scale 1) is the ``landscape`` experiment's,
so it is trained once and reused by the other two.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from bnlab.train import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    SweepConfig,
    TrainConfig,
)

# arm name in the report -> norm kind of bnlab.nn
ARMS: dict[str, str] = {
    "standard": "none",
    "bn": "bn",
    "noisy_bn": "noisy_bn",
    "l1": "l1",
    "l2": "l2",
    "linf": "linf",
}
IMAGE_DATA = ("digits", "mnist", "cifar10")
STUDY_DATA = ("digits", "cancer", "mouse", "cifar10", "mnist")
CLAIMS: tuple[int, ...] = tuple(range(1, 12))


@dataclass(frozen=True)
class StudySettings:
    """The knobs that differ between the full study and ``--quick``."""

    steps: int
    seeds: tuple[int, ...]
    learning_rates: tuple[float, ...]
    init_scales: tuple[float, ...]
    probe_every: int  # gradient path and ICS
    curvature_every: int  # top eigenvalue and curvature along the gradient
    reference_lr: float = 0.2
    batch_size: int = 64
    target_accuracy: float = 0.9  # "steps to reach" uses a 10-step moving average of train acc


FULL = StudySettings(
    steps=300,
    seeds=(0, 1, 2),
    learning_rates=(0.05, 0.2, 0.5, 1.0, 2.0),
    init_scales=(0.1, 1.0, 3.0, 10.0),
    probe_every=20,
    curvature_every=60,
)
QUICK = StudySettings(
    steps=150,
    seeds=(0, 1),
    learning_rates=(0.2, 1.0),
    init_scales=(1.0, 10.0),
    probe_every=25,
    curvature_every=75,
)


@dataclass(frozen=True)
class Experiment:
    """One sweep of the study and what it is for."""

    name: str
    purpose: str
    sweep: SweepConfig


@dataclass(frozen=True)
class Study:
    """A study: its experiments, the claims it checks and the conditioning datasets (claim 9)."""

    name: str
    title: str
    data: str
    quick: bool
    settings: StudySettings
    experiments: tuple[Experiment, ...]
    claims: tuple[int, ...] = CLAIMS
    conditioning: tuple[str, ...] = ("mouse", "cancer")
    arms: dict[str, str] = field(default_factory=lambda: dict(ARMS))
    model_spec: str = ""  # FILE.py:FACTORY of a user's model (bnlab measure); runs in-process

    def experiment(self, name: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The study as JSON-ready data (``study.json``, read by the report)."""
        from bnlab.train import run_names

        s = self.settings
        return {
            "name": self.name,
            "title": self.title,
            "data": self.data,
            "quick": self.quick,
            "claims": list(self.claims),
            "conditioning": list(self.conditioning),
            "arms": dict(self.arms),
            "model_spec": self.model_spec,
            "settings": {
                "steps": s.steps,
                "seeds": list(s.seeds),
                "learning_rates": list(s.learning_rates),
                "init_scales": list(s.init_scales),
                "probe_every": s.probe_every,
                "curvature_every": s.curvature_every,
                "reference_lr": s.reference_lr,
                "batch_size": s.batch_size,
                "target_accuracy": s.target_accuracy,
            },
            "experiments": [
                {
                    "name": e.name,
                    "purpose": e.purpose,
                    "grid": e.sweep.grid,
                    "runs": [name for name, _ in run_names(e.sweep)],
                }
                for e in self.experiments
            ],
        }


def model_for(data: str) -> ModelConfig:
    """A small VGG for images, a two-layer MLP for feature vectors."""
    name = data.partition(":")[0]
    if name in IMAGE_DATA:
        return ModelConfig(name="vgg_digits")
    return ModelConfig(name="mlp", options={"hidden": [64, 64]})


def base_config(data: str, settings: StudySettings, device: str) -> TrainConfig:
    """Plain SGD (no momentum, no weight decay) at the reference rate: the setting of the
    paper's analysis, where the step is exactly -lr * g."""
    return TrainConfig(
        seed=settings.seeds[0],
        steps=settings.steps,
        eval_every=max(settings.steps // 10, 1),
        log_every=1,
        device=device,
        threads=0,
        data=DataConfig(spec=data, batch_size=settings.batch_size, standardize=True),
        model=model_for(data),
        optim=OptimConfig(name="SGD", lr=settings.reference_lr, momentum=0.0, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=settings.steps, keep=1),
    )


def landscape_probes(settings: StudySettings) -> list[ProbeConfig]:
    """The probes of the landscape runs. Step sizes along the gradient are multiples of the
    training rate (``lr``), as in the paper's Figure 4."""
    lr = settings.reference_lr
    return [
        ProbeConfig("gradient_path", settings.probe_every, {"lr": lr}),
        ProbeConfig("internal_covariate_shift", settings.probe_every, {}),
        ProbeConfig(
            "top_eigenvalues", settings.curvature_every, {"k": 1, "tol": 1e-3, "max_iterations": 30}
        ),
        ProbeConfig("curvature_along_gradient", settings.curvature_every, {}),
    ]


def santurkar_study(
    data: str = "digits",
    *,
    quick: bool = False,
    seeds: int | None = None,
    device: str = "cpu",
) -> Study:
    """The reproduction on ``data`` (a spec of ``bnlab.data.load_dataset``). ``seeds`` overrides
    the number of seeds (3 by default, 2 with ``quick``). Raises ValueError for an unknown or
    regression dataset and for seeds < 1."""
    from bnlab.data import dataset_name

    if dataset_name(data) not in STUDY_DATA:  # dataset_name raises for an unknown dataset
        raise ValueError(
            f"--data {data!r}: the study needs class labels; use one of "
            f"{', '.join(STUDY_DATA)} (cifar10 and mnist as NAME:PATH)"
        )
    settings = QUICK if quick else FULL
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        settings = replace(settings, seeds=tuple(range(seeds)))
    base = base_config(data, settings, device)
    seed_list = list(settings.seeds)
    landscape = replace(
        base,
        probes=landscape_probes(settings),
        checkpoint=CheckpointConfig(
            every=settings.probe_every, keep=settings.steps // settings.probe_every + 1
        ),
    )
    other_rates = [lr for lr in settings.learning_rates if lr != settings.reference_lr]
    other_scales = [s for s in settings.init_scales if s != 1.0]
    experiments = [
        Experiment(
            "landscape",
            "every norm arm at the reference rate, with the landscape probes",
            SweepConfig(landscape, {"model.norm": list(ARMS.values()), "seed": seed_list}),
        ),
        Experiment(
            "learning_rate",
            "standard vs BN over the learning-rate grid",
            SweepConfig(
                base,
                {"model.norm": ["none", "bn"], "optim.lr": other_rates, "seed": seed_list},
            ),
        ),
        Experiment(
            "init_scale",
            "standard vs BN over initialization scales",
            SweepConfig(
                base,
                {"model.norm": ["none", "bn"], "model.init_scale": other_scales, "seed": seed_list},
            ),
        ),
    ]
    return Study(
        name="santurkar2018",
        title="How does batch normalization help optimization? (Santurkar et al., 2018)",
        data=data,
        quick=quick,
        settings=settings,
        experiments=tuple(experiments),
    )
