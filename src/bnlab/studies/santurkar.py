"""The Santurkar et al. (2018) reproduction, declared as data: which runs, which probes, which
claims, and how our protocol differs from the paper's. :mod:`bnlab.studies.run` executes it;
:mod:`bnlab.report` judges it.

The paper has two settings (appendix A.1), and so does the study:

- **VGG** (``settings``): a VGG trained with plain SGD, batch 128, fixed learning rate 0.1,
  Glorot initialization, no augmentation. On the embedded digits the network is
  ``vgg10_digits`` (ten 3x3 convolutions), on ``cifar10:PATH --protocol paper`` the paper's
  VGG-16 for 15,000 steps. Experiments ``landscape`` (standard and BN at lr 0.1, with every
  probe), ``landscape_variants`` (the other arms, with the probes their claims read; past the
  paper, the extension arms LayerNorm and GroupNorm train here too, judged by no claim),
  ``learning_rate`` (standard vs BN over the other rates, ICS probed) and ``init_scale``.
  Feature-vector data (cancer, mouse) get an MLP in this slot.
- **DLN** (``dln``): the 25-layer deep linear network on synthetic Gaussian data, full-batch
  gradient descent on 1,000 samples. Experiments ``dln`` (every arm at the paper's rate 1e-6)
  and ``dln_learning_rate`` (standard vs BN at 1e-7).

Every experiment is a :class:`bnlab.train.SweepConfig` run into ``OUT/runs/<experiment>/``; the
list is plain data, so a further experiment (or setting) is one more entry.

The DLN's loss. The paper minimizes ||W_1...W_k x - A x||^2 over the data set with full-batch
GD at lr 1e-6. We read the squared norm as summed over the 1,000 samples (the Frobenius norm
of the residual matrix): at Glorot initialization that loss has a top Hessian eigenvalue of
about 4e5, so 1e-6 is a stable GD rate (the stability limit 2 / lambda is about 5e-6, and the
probes' largest step, 30 x lr, lies beyond it, as appendix A.2.2 describes); averaged over
samples, 1e-6 would move the weights by about 1e-4 of that and the network would not train.
The trainer's regression loss is torch's mean squared error, the mean over N x d = 10^4
entries, so the study trains with lr = 1e-6 x 10^4 = 1e-2 on it: the same iterates (the
gradient scales by 1 / (N d)), and every probe step is the same multiple of the rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bnlab.nn.variants import arms
from bnlab.studies.extension import ExtensionSettings
from bnlab.train import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    SweepConfig,
    TrainConfig,
)

# arm name in the report -> norm kind: the paper's arms, as bnlab.nn.VARIANTS declares them
ARMS: Mapping[str, str] = arms("paper")
# the kinds compared past the paper (LayerNorm, GroupNorm, any registered later): trained beside
# the other paper arms in the main setting's landscape_variants, reported in the extension section
EXTENSION_ARMS: Mapping[str, str] = arms("extension")
# the arms whose ICS and Hessian probes a claim (4, 11) or a figure reads; the other arms get the
# probes their claims read (gradient path: claim 8; activation distributions: claims 3 and 8)
FULLY_PROBED_ARMS = ("standard", "bn")
VARIANT_PROBES = ("gradient_path", "activation_distribution")
IMAGE_DATA = ("digits", "mnist", "cifar10")
STUDY_DATA = ("digits", "cancer", "mouse", "cifar10", "mnist")
PROTOCOLS = ("default", "paper")
CLAIMS: tuple[int, ...] = tuple(range(1, 12))

VGG_ETAS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)  # [1/2, 4] x lr (A.2.2)
DLN_ETAS: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 20.0, 30.0)  # [1/100, 30] x lr
DLN_SAMPLES = 1000  # the paper's data set (= its batch)
DLN_OUTPUTS = 10
DLN_LOSS_SCALE = float(DLN_SAMPLES * DLN_OUTPUTS)  # summed loss = N d x mean squared error
PAPER_DLN_LR = 1e-6  # on the summed loss


@dataclass(frozen=True)
class StudySettings:
    """One setting of the study: model, data, optimizer and probe schedule.

    ``reference_lr`` and ``learning_rates`` are the rates the trainer uses (on the DLN: on the
    mean squared error, ``loss_scale`` times the paper's rate, see the module docstring).
    ``etas``: the gradient-path step sizes, multiples of the rate. ``highlight``: 1-based
    positions of the conv/linear layers the paper plots (its layers 5 and 10 of VGG, 9 and 17
    of the DLN); ICS is probed at those (``ics_every_layer``: at every layer), activation
    distributions at the norm slots after them, activation-space curvature at their outputs.
    """

    steps: int
    seeds: tuple[int, ...]
    learning_rates: tuple[float, ...]
    init_scales: tuple[float, ...]
    probe_every: int  # gradient path and ICS
    curvature_every: int  # top eigenvalue, curvature along the gradient, activation curvature
    reference_lr: float = 0.1
    batch_size: int = 128
    target_accuracy: float = 0.9  # "steps to reach" uses a 10-step moving average of train acc
    name: str = "vgg"
    title: str = "VGG on digits"
    model: str = "vgg10_digits"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    init: str = "glorot"
    etas: tuple[float, ...] = VGG_ETAS
    highlight: tuple[int, ...] = (5, 10)
    ics_every_layer: bool = False
    activation_every: int = 10
    data: str = ""  # "" = the study's --data
    data_options: Mapping[str, Any] = field(default_factory=dict)
    standardize: bool = True
    loss_scale: float = 1.0  # the paper's loss = loss_scale x the trainer's
    ics_rates: tuple[float, ...] = ()  # further rates, standard vs BN, with ICS probed
    log_every: int = 1  # training-loss rows (claim 1 needs every step of the VGG)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("model_options", "data_options"):
            values[key] = dict(values[key])
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return values


VGG_FULL = StudySettings(
    steps=200,
    seeds=(0, 1, 2),
    learning_rates=(0.01, 0.1, 0.5, 1.0),
    init_scales=(0.1, 1.0, 10.0),
    probe_every=25,
    # a Lanczos top eigenvalue (30 HVPs) costs about 50 training steps of this VGG: probed at
    # the middle and the end of training only
    curvature_every=100,
    ics_rates=(0.01,),
)
VGG_QUICK = replace(
    VGG_FULL,
    steps=60,
    seeds=(0, 1),
    learning_rates=(0.1, 1.0),
    init_scales=(1.0, 10.0),
    probe_every=15,
    curvature_every=60,  # one Lanczos run, at the end: the quick study's budget is 90 s
    ics_rates=(),
)
VGG_PAPER = replace(
    VGG_FULL,
    title="VGG-16 on CIFAR-10",
    model="vgg16",
    steps=15_000,
    learning_rates=(0.01, 0.1, 0.5),
    init_scales=(1.0,),
    probe_every=100,
    curvature_every=1000,
    activation_every=100,
    ics_rates=(0.01,),
)
MLP_OPTIONS = {"hidden": [64, 64]}

DLN_FULL = StudySettings(
    name="dln",
    title="25-layer deep linear network, synthetic Gaussian data",
    model="dln",
    model_options={"depth": 25, "width": 10},
    data="gaussian",
    data_options={"n_samples": 1250},  # 1,000 training samples after the 20% test split
    standardize=False,
    steps=1500,
    seeds=(0, 1, 2),
    learning_rates=(PAPER_DLN_LR * DLN_LOSS_SCALE,),
    init_scales=(1.0,),
    reference_lr=PAPER_DLN_LR * DLN_LOSS_SCALE,
    batch_size=DLN_SAMPLES,
    etas=DLN_ETAS,
    highlight=(9, 17),
    ics_every_layer=True,
    probe_every=150,
    curvature_every=750,
    activation_every=50,
    log_every=10,
    loss_scale=DLN_LOSS_SCALE,
    ics_rates=(1e-7 * DLN_LOSS_SCALE,),
)
DLN_QUICK = replace(
    DLN_FULL,
    steps=300,
    seeds=(0, 1),
    probe_every=60,
    curvature_every=300,
    activation_every=30,
    ics_rates=(),
)
DLN_PAPER = replace(
    DLN_FULL, steps=10_000, probe_every=500, curvature_every=2000, activation_every=250
)


@dataclass(frozen=True)
class Experiment:
    """One sweep of the study, the setting it belongs to and what it is for."""

    name: str
    purpose: str
    sweep: SweepConfig
    setting: str = "vgg"


EXTENSION_QUICK = ExtensionSettings(
    samples=300, lr_fractions=(0.5,), steps=60, sharpness_every=10, weight_decays=(5e-4,)
)
"""The extension in ``--quick``: one learning rate per arm, short (the full one has three)."""


@dataclass(frozen=True)
class Study:
    """A study: its experiments, the claims it checks and the conditioning datasets (claim 9).

    ``settings`` is the main (VGG or MLP) setting, ``dln`` the deep linear network's (None in
    ``bnlab measure``); ``protocol`` names the protocol ("default", "paper") and
    ``protocol_rows`` is the paper-vs-ours table the report prints."""

    name: str
    title: str
    data: str
    quick: bool
    settings: StudySettings
    experiments: tuple[Experiment, ...]
    claims: tuple[int, ...] = CLAIMS
    conditioning: tuple[str, ...] = ("mouse", "cancer")
    arms: dict[str, str] = field(default_factory=lambda: dict(ARMS))
    extension_arms: dict[str, str] = field(default_factory=dict)
    """Arm -> kind of the arms trained past the paper (no claim reads them); {}: none."""
    model_spec: str = ""  # FILE.py:FACTORY of a user's model (bnlab measure); runs in-process
    dln: StudySettings | None = None
    protocol: str = "default"
    protocol_rows: tuple[tuple[str, str, str, str], ...] = ()
    extension: ExtensionSettings | None = None
    """The edge-of-stability and effective-learning-rate runs (past the paper); None: none."""

    def experiment(self, name: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise KeyError(name)

    def all_settings(self) -> list[StudySettings]:
        return [self.settings] + ([self.dln] if self.dln is not None else [])

    def to_dict(self) -> dict[str, Any]:
        """The study as JSON-ready data (``study.json``, read by the report)."""
        from bnlab.train import run_names

        return {
            "name": self.name,
            "title": self.title,
            "data": self.data,
            "quick": self.quick,
            "protocol": self.protocol,
            "claims": list(self.claims),
            "conditioning": list(self.conditioning),
            "arms": dict(self.arms),
            "extension_arms": dict(self.extension_arms),
            "model_spec": self.model_spec,
            "settings": _described(self.settings),
            "dln": None if self.dln is None else _described(self.dln),
            "protocol_table": [list(row) for row in self.protocol_rows],
            "extension": None if self.extension is None else asdict(self.extension),
            "experiments": [
                {
                    "name": e.name,
                    "setting": e.setting,
                    "purpose": e.purpose,
                    "grid": e.sweep.grid,
                    "runs": [name for name, _ in run_names(e.sweep)],
                }
                for e in self.experiments
            ],
        }


def _described(settings: StudySettings) -> dict[str, Any]:
    """The setting's knobs plus the module names of its highlighted layers and norm slots."""
    pairs = highlighted(settings)
    return {
        **settings.to_dict(),
        "highlight_layers": [layer for layer, _ in pairs],
        "highlight_slots": [slot for _, slot in pairs],
    }


def main_settings(data: str, quick: bool, protocol: str) -> StudySettings:
    """The VGG setting for image data (the paper's VGG-16 with ``protocol="paper"``), an MLP in
    its place for feature vectors."""
    name = data.partition(":")[0]
    if protocol == "paper":
        return VGG_PAPER
    base = VGG_QUICK if quick else VGG_FULL
    if name in IMAGE_DATA:
        return replace(base, title=f"VGG (ten convolutions) on {name}")
    return replace(
        base,
        name="mlp",
        title=f"two-layer MLP on {name}",
        model="mlp",
        model_options=MLP_OPTIONS,
        highlight=(1, 2),
        batch_size=64,
        init="kaiming",
    )


def layer_slots(settings: StudySettings) -> list[tuple[str, str]]:
    """(conv/linear module name, the norm slot after it) for every layer of the setting's model
    that has a norm slot, in forward order (found on its BN version; a norm slot of the standard
    network is an identity with the same name)."""
    from torch import nn

    from bnlab.models import build_model
    from bnlab.nn import is_norm_layer

    shape: tuple[int, ...] = (3, 32, 32) if settings.model.startswith("vgg") else (10,)
    model = build_model(settings.model, shape, 10, norm="bn", **model_options(settings))
    slots, layer = [], ""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            layer = name
        elif is_norm_layer(module) and layer:
            slots.append((layer, name))
            layer = ""
    return slots


def highlighted(settings: StudySettings) -> list[tuple[str, str]]:
    """The (layer, norm slot) pairs at the setting's highlighted positions that exist."""
    slots = layer_slots(settings)
    return [slots[i - 1] for i in settings.highlight if 0 < i <= len(slots)]


def model_options(settings: StudySettings) -> dict[str, Any]:
    """The setting's model options, with its init scheme for the models that take one."""
    options = dict(settings.model_options)
    if settings.model == "dln" or settings.model.startswith("vgg"):
        options["init"] = settings.init
    return options


def base_config(data: str, settings: StudySettings, device: str) -> TrainConfig:
    """Plain SGD (no momentum, no weight decay) at the reference rate: the paper's optimizer,
    where the step is exactly -lr * g."""
    options = model_options(settings)
    return TrainConfig(
        seed=settings.seeds[0],
        steps=settings.steps,
        eval_every=max(settings.steps // 10, 1),
        log_every=settings.log_every,
        device=device,
        # one thread per run: the study trains two runs at a time on two cores, and the small
        # layers' parallel regions cost more than they save (DLN BN step: 5.7 ms CPU with one
        # thread against 23 ms with two, measured under load)
        threads=1,
        data=DataConfig(
            spec=settings.data or data,
            batch_size=settings.batch_size,
            standardize=settings.standardize,
            options=dict(settings.data_options),
        ),
        model=ModelConfig(name=settings.model, options=options),
        optim=OptimConfig(name="SGD", lr=settings.reference_lr, momentum=0.0, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=max(settings.steps // 4, 1), keep=1),
    )


def ics_probe(settings: StudySettings) -> ProbeConfig:
    options: dict[str, Any] = {}
    if not settings.ics_every_layer:
        options["layers"] = [layer for layer, _ in highlighted(settings)]
    return ProbeConfig("internal_covariate_shift", settings.probe_every, options)


def landscape_probes(settings: StudySettings) -> list[ProbeConfig]:
    """The probes of the landscape runs. Step sizes along the gradient are multiples of the
    training rate (``lr``), over the paper's range for the setting (appendix A.2.2)."""
    pairs = highlighted(settings)
    return [
        ProbeConfig(
            "gradient_path",
            settings.probe_every,
            {"lr": settings.reference_lr, "etas": list(settings.etas)},
        ),
        ics_probe(settings),
        ProbeConfig(
            "activation_distribution",
            settings.activation_every,
            {"layers": [slot for _, slot in pairs]},
        ),
        ProbeConfig(
            "top_eigenvalues", settings.curvature_every, {"k": 1, "tol": 1e-3, "max_iterations": 30}
        ),
        ProbeConfig("curvature_along_gradient", settings.curvature_every, {}),
        ProbeConfig(
            "activation_curvature",
            settings.curvature_every,
            {"layers": [layer for layer, _ in pairs]},
        ),
    ]


def variant_probes(settings: StudySettings) -> list[ProbeConfig]:
    """The probes of the arms other than standard and BN: the ones their claims read."""
    return [p for p in landscape_probes(settings) if p.name in VARIANT_PROBES]


def setting_experiments(
    data: str,
    settings: StudySettings,
    device: str,
    *,
    main: bool,
    extension: Sequence[str] = (),
) -> list[Experiment]:
    """The experiments of one setting: every arm at the reference rate with the landscape
    probes; standard vs BN over the other rates (with ICS) and init scales. ``extension``: the
    kinds of the extension arms, trained with the other paper arms (same runs, same probes)."""
    base = base_config(data, settings, device)
    seeds = list(settings.seeds)
    prefix = "" if main else f"{settings.name}_"
    landscape_name = "landscape" if main else settings.name
    experiments = [
        Experiment(
            landscape_name,
            f"{settings.title}: standard and BN at lr {settings.reference_lr:g}, every probe",
            SweepConfig(
                replace(base, probes=landscape_probes(settings)),
                {"model.norm": [ARMS[a] for a in FULLY_PROBED_ARMS], "seed": seeds},
            ),
            settings.name,
        )
    ]
    variants = [kind for arm, kind in ARMS.items() if arm not in FULLY_PROBED_ARMS]
    variants += [kind for kind in extension if kind not in variants]
    if variants:
        past = f" (past the paper: {', '.join(extension)})" if extension else ""
        experiments.append(
            Experiment(
                f"{landscape_name}_variants",
                f"{settings.title}: the other norm arms{past} at lr {settings.reference_lr:g}, "
                "with the gradient path and activation distributions",
                SweepConfig(
                    replace(base, probes=variant_probes(settings)),
                    {"model.norm": variants, "seed": seeds},
                ),
                settings.name,
            )
        )
    rates = (*settings.learning_rates, *settings.ics_rates)
    other_rates = sorted({lr for lr in rates if lr != settings.reference_lr})
    if other_rates:
        experiments.append(
            Experiment(
                f"{prefix}learning_rate",
                f"{settings.title}: standard vs BN over the other learning rates, ICS probed",
                SweepConfig(
                    replace(base, probes=[ics_probe(settings)]),
                    {"model.norm": ["none", "bn"], "optim.lr": other_rates, "seed": seeds},
                ),
                settings.name,
            )
        )
    other_scales = [s for s in settings.init_scales if s != 1.0]
    if other_scales:
        experiments.append(
            Experiment(
                f"{prefix}init_scale",
                f"{settings.title}: standard vs BN over initialization scales",
                SweepConfig(
                    base,
                    {"model.norm": ["none", "bn"], "model.init_scale": other_scales, "seed": seeds},
                ),
                settings.name,
            )
        )
    return experiments


def santurkar_study(
    data: str = "digits",
    *,
    quick: bool = False,
    seeds: int | None = None,
    device: str = "cpu",
    protocol: str = "default",
    dln: bool = True,
) -> Study:
    """The reproduction on ``data`` (a spec of ``bnlab.data.load_dataset``) plus, with ``dln``,
    the paper's deep linear network. ``seeds`` overrides the number of seeds (3 by default, 2
    with ``quick``); ``protocol="paper"`` (cifar10 only) runs the paper's own VGG-16 and DLN
    protocol. Raises ValueError for an unknown or regression dataset, seeds < 1, an unknown
    protocol, or ``paper`` with other data or with ``quick``."""
    from bnlab.data import dataset_name
    from bnlab.studies.protocol import protocol_rows

    if dataset_name(data) not in STUDY_DATA:  # dataset_name raises for an unknown dataset
        raise ValueError(
            f"--data {data!r}: the study needs class labels; use one of "
            f"{', '.join(STUDY_DATA)} (cifar10 and mnist as NAME:PATH)"
        )
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if protocol == "paper" and (dataset_name(data) != "cifar10" or quick):
        raise ValueError(
            "--protocol paper is the paper's CIFAR-10 protocol: it needs --data cifar10:PATH "
            "and no --quick"
        )
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    main = main_settings(data, quick, protocol)
    dln_settings = None
    if dln:
        dln_settings = DLN_PAPER if protocol == "paper" else DLN_QUICK if quick else DLN_FULL
    if seeds is not None:
        main = replace(main, seeds=tuple(range(seeds)))
        if dln_settings is not None:
            dln_settings = replace(dln_settings, seeds=tuple(range(seeds)))
    # past the paper: not under the paper's protocol (as the edge-of-stability extension)
    extension_arms = {} if protocol == "paper" else dict(EXTENSION_ARMS)
    experiments = setting_experiments(
        data, main, device, main=True, extension=list(extension_arms.values())
    )
    if dln_settings is not None:
        experiments += setting_experiments(data, dln_settings, device, main=False)
    return Study(
        name="santurkar2018",
        title="How does batch normalization help optimization? (Santurkar et al., 2018)",
        data=data,
        quick=quick,
        settings=main,
        experiments=tuple(experiments),
        dln=dln_settings,
        extension_arms=extension_arms,
        protocol=protocol,
        protocol_rows=protocol_rows(data, main, dln_settings, protocol),
        extension=(
            None if protocol == "paper" else EXTENSION_QUICK if quick else ExtensionSettings()
        ),
    )
