"""The protocol table: the paper's value (appendix A) and ours for every knob of the study, with
each deviation named and its reason. Computed from the settings the study actually runs and
from the norm layers' own defaults, so it cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect

from bnlab.studies.santurkar import (
    DLN_LOSS_SCALE,
    DLN_SAMPLES,
    StudySettings,
    highlighted,
    layer_slots,
)

Row = tuple[str, str, str, str]  # parameter, paper, ours, deviation and reason ("" = none)

PAPER_NOISE = {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}
TIME = "CPU time: the default study must finish in minutes on two cores"
PROBED_ARMS = (
    "ICS and the Hessian probes on the standard and BN arms only, the other arms get the "
    "gradient path and activations (no claim or figure reads the rest for them)"
)


def _rates(values: tuple[float, ...] | list[float], scale: float = 1.0) -> str:
    return ", ".join(f"{v / scale:g}" for v in values)


def _positions(settings: StudySettings) -> str:
    return ", ".join(str(i) for i in settings.highlight[: len(highlighted(settings))])


def vgg_rows(data: str, s: StudySettings, protocol: str) -> list[Row]:
    name = data.partition(":")[0]
    paper_run = protocol == "paper"
    convs = len(layer_slots(s))
    model = (
        f"{s.model}: {convs} convolutions 3x3, a norm slot after each"
        if s.model != "mlp"
        else "MLP, two hidden layers of 64"
    )
    rates = tuple(sorted(set(s.learning_rates) - {s.reference_lr}))
    return [
        (
            "VGG: model",
            "VGG-like network (13 convolutions, VGG-16 layout)",
            model,
            ""
            if paper_run
            else f"{name} inputs are small; ten convolutions keep the paper's layers 5 and 10 "
            f"and fit the time budget ({TIME})"
            if s.model != "mlp"
            else f"{name} is a feature-vector data set: no convolutions apply",
        ),
        (
            "VGG: data",
            "CIFAR-10, no augmentation",
            f"{data.partition(':')[0]}, no augmentation, inputs standardized",
            "" if name == "cifar10" else "embedded data set (nothing is downloaded)",
        ),
        ("VGG: optimizer", "SGD, no momentum, no weight decay", "the same", ""),
        (
            "VGG: learning rates",
            "0.1 (fixed); 0.5 in Figure 1; 0.1 and 0.01 for ICS",
            f"{s.reference_lr:g} for every arm; standard vs BN also at {_rates(rates)} "
            "(ICS probed at each)",
            "",
        ),
        (
            "VGG: steps",
            "15,000",
            f"{s.steps:,}",
            "" if s.steps >= 15_000 else TIME,
        ),
        ("VGG: batch", "128", str(s.batch_size), "" if s.batch_size == 128 else "MLP data sets"),
        (
            "VGG: initialization",
            "Glorot",
            s.init,
            "" if s.init == "glorot" else "the MLP keeps its ReLU initialization",
        ),
        (
            "VGG: step sizes along the gradient",
            "[1/2, 4] x lr",
            f"{_rates(s.etas)} x lr",
            "",
        ),
        (
            "VGG: layers shown for ICS and activations",
            "5 and 10 (ICS); 3, 11 / 2, 9, 13 (distributions)",
            f"{_positions(s)} (both)",
            "one pair of layers serves every figure",
        ),
        (
            "VGG: probe schedule",
            "the landscape at every training step",
            f"gradient path and ICS every {s.probe_every} steps, activations every "
            f"{s.activation_every}, Hessian probes every {s.curvature_every}; {PROBED_ARMS}",
            TIME,
        ),
        (
            "VGG: seeds",
            "not stated",
            str(len(s.seeds)),
            "",
        ),
    ]


def dln_rows(s: StudySettings) -> list[Row]:
    extra = [r for r in s.ics_rates if r != s.reference_lr]
    return [
        (
            "DLN: model",
            "25 square 10 x 10 linear layers, no bias",
            f"{s.model_options.get('depth')} bias-free {s.model_options.get('width')} x "
            f"{s.model_options.get('width')} layers; the norm after each of the first "
            f"{int(s.model_options.get('depth', 25)) - 1}",
            "",
        ),
        (
            "DLN: data",
            "x Gaussian; A 10 x 10, i.i.d. Gaussian entries; 1,000 samples",
            f"x ~ N(0, I); A_ij ~ N(0, 1/10); {DLN_SAMPLES:,} training samples",
            "the paper gives no variance for A; 1/10 keeps ||A x|| near ||x||",
        ),
        (
            "DLN: loss",
            "||W_1 ... W_k x - A x||^2",
            f"summed over samples: trained as mean squared error with the rate x "
            f"{DLN_LOSS_SCALE:g} (= N d), the same iterates",
            "",
        ),
        ("DLN: optimizer", "full-batch gradient descent", "the same (batch = data set)", ""),
        (
            "DLN: learning rates",
            "1e-6; 1e-7 where shown",
            f"{s.reference_lr / s.loss_scale:g} for every arm"
            + (f"; standard vs BN also at {_rates(extra, s.loss_scale)}" if extra else ""),
            "" if extra else "1e-7 runs only in the full study (time)",
        ),
        ("DLN: steps", "10,000", f"{s.steps:,}", "" if s.steps >= 10_000 else TIME),
        ("DLN: initialization", "Glorot", s.init, ""),
        (
            "DLN: step sizes along the gradient",
            "[1/100, 30] x lr",
            f"{_rates(s.etas)} x lr",
            "",
        ),
        (
            "DLN: layers",
            "ICS at every layer, layers 9 and 17 shown",
            f"ICS at every layer; {_positions(s)} highlighted",
            "",
        ),
        (
            "DLN: probe schedule",
            "the landscape at every training step",
            f"gradient path and ICS every {s.probe_every} steps, activations every "
            f"{s.activation_every}, Hessian probes every {s.curvature_every}; {PROBED_ARMS}",
            TIME,
        ),
    ]


def norm_rows() -> list[Row]:
    """Noisy BN's constants and the lp form, read from the layers themselves."""
    from bnlab import functional as F
    from bnlab.nn import LpBatchNorm

    spec = F.NoiseSpec()
    ours = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    noise_matches = ours == PAPER_NOISE
    centered = inspect.signature(LpBatchNorm.__init__).parameters.get("centered")
    paper_form = centered is not None and centered.default is False
    return [
        (
            "noisy BN: noise",
            "Algorithm 1: n_mu 0.5, n_sigma 1.25, r_mu = r_sigma = 0.1",
            ", ".join(f"{k} {v:g}" for k, v in ours.items()),
            "" if noise_matches else "bnlab's NoiseSpec is not the paper's Algorithm 1",
        ),
        (
            "lp BN: scale",
            "mean of the lp norm of the un-centered activations (p = 1, 2, inf)",
            "un-centered (LpBatchNorm's default)" if paper_form else "centered: x - mean",
            "" if paper_form else "bnlab's LpBatchNorm divides by centered norms (l2 = BN)",
        ),
    ]


def protocol_rows(
    data: str, main: StudySettings, dln: StudySettings | None, protocol: str
) -> tuple[Row, ...]:
    """The whole table for a study's settings."""
    rows = vgg_rows(data, main, protocol) + (dln_rows(dln) if dln is not None else [])
    return tuple(rows + norm_rows())
