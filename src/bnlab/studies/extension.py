"""Past the paper: the edge of stability and the effective learning rate, standard vs BN.

Edge of stability (Cohen et al., ICLR 2021): full-batch gradient descent with step size lr is
stable on the local quadratic only while the sharpness lambda_max < 2 / lr. In practice the
sharpness first rises ("progressive sharpening") until it reaches 2 / lr, then hovers there
while the loss keeps falling, non-monotonically. Here: full-batch GD on a fixed subset of the
digits (``samples`` images) with an MLP, with and without BN, at three learning rates per arm,
set as fractions of the arm's own stability limit at initialization (lr = f * 2 / lambda_0, so
2/lr = lambda_0 / f: the sharpness must rise by 1/f to reach the edge; a fixed lr would be
unstable from the first step for one arm and far from the edge for the other), the sharpness
tracked every ``sharpness_every`` steps (Lanczos warm-started from the previous
eigenvector), and two rules in code (:func:`progressive_sharpening`, :func:`hovers_at_edge`).

Effective learning rate (van Laarhoven 2017; Arora, Li, Lyu 2019): the weights before a BN
layer are scale invariant, so a step of lr moves their direction like lr / ||w||^2; ||w||
grows under plain GD and is held by weight decay. Recorded in the BN runs (with and without
weight decay) by :func:`bnlab.landscape.effective_learning_rates`.

Every run is one JSON file under ``OUT/extension/``, written atomically when the run ends, so an
interrupted study resumes by skipping the runs already on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab import landscape
from bnlab.data import load_dataset
from bnlab.models import build_model
from bnlab.train.store import write_atomic

__all__ = [
    "ExtensionSettings",
    "hovers_at_edge",
    "progressive_sharpening",
    "run_extension",
    "train_full_batch",
]


@dataclass(frozen=True)
class ExtensionSettings:
    samples: int = 1000
    lr_fractions: tuple[float, ...] = (0.25, 0.5, 0.8)
    """lr = fraction * 2 / (the sharpness at initialization)."""
    norms: tuple[str, ...] = ("none", "bn")
    steps: int = 600
    sharpness_every: int = 10
    hidden: tuple[int, ...] = (64, 64)
    weight_decays: tuple[float, ...] = (0.0, 5e-4)
    """For the effective-learning-rate runs (BN, the middle fraction)."""
    loss: str = "mse"
    """"mse" on one-hot targets (Cohen et al.'s main setting) or "cross_entropy"."""
    seed: int = 0


def _loss_fn(kind: str, classes: int) -> Any:
    if kind == "cross_entropy":
        return nn.functional.cross_entropy
    if kind != "mse":
        raise ValueError(f'loss must be "mse" or "cross_entropy", got {kind!r}')

    def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, nn.functional.one_hot(targets, classes).to(outputs))

    return mse


def _run_name(norm: str, fraction: float, weight_decay: float) -> str:
    return f"norm={norm},f={fraction:g},wd={weight_decay:g}"


def train_full_batch(
    settings: ExtensionSettings, norm: str, fraction: float, weight_decay: float = 0.0
) -> dict[str, Any]:
    """Full-batch GD with lr = ``fraction`` * 2 / lambda_0 on the first ``settings.samples``
    standardized digits; every
    ``sharpness_every`` steps the loss, the sharpness (train mode, warm-started) and the
    effective learning rates of the layers before a normalization. Stops at a non-finite loss."""
    data = load_dataset("digits", seed=settings.seed, standardize=True)
    x, y = data.x_train[: settings.samples], data.y_train[: settings.samples]
    model = build_model(
        "mlp", data.input_shape, data.num_outputs, norm=norm, hidden=settings.hidden,
        seed=settings.seed,
    )  # fmt: skip
    loss_fn = _loss_fn(settings.loss, data.num_outputs)
    initial = landscape.sharpness(model, loss_fn, (x, y), tol=1e-3, max_iterations=60)
    lr = fraction * 2 / initial.sharpness
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    record: dict[str, Any] = {
        "norm": norm, "lr": lr, "weight_decay": weight_decay, "samples": len(x),
        "loss_kind": settings.loss, "fraction": fraction,
        "initial_sharpness": initial.sharpness,
        "steps": [], "loss": [], "sharpness": [], "sharpness_hvps": [], "layers": {},
        "diverged": False,
    }  # fmt: skip
    previous: landscape.Sharpness | None = initial
    model.train()
    for step in range(settings.steps + 1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if not math.isfinite(float(loss.detach())):
            record["diverged"] = True
            break
        if step == settings.steps:
            break
        loss.backward()
        optimizer.step()
        if step % settings.sharpness_every:
            continue
        previous = landscape.sharpness(
            model, loss_fn, (x, y), previous=previous, tol=1e-3, max_iterations=60
        )
        scales = landscape.effective_learning_rates(model, loss_fn, (x, y), lr=lr, previous=before)
        record["steps"].append(step)
        record["loss"].append(float(loss.detach()))
        record["sharpness"].append(previous.sharpness)
        record["sharpness_hvps"].append(previous.hvp_count)
        for layer in scales.layers:
            entry = record["layers"].setdefault(
                layer.layer, {"norm": [], "effective_lr": [], "angular_update": [], "cosine": []}
            )
            entry["norm"].append(layer.norm)
            entry["effective_lr"].append(layer.effective_lr)
            entry["angular_update"].append(layer.angular_update)
            entry["cosine"].append(layer.cosine)
    return record


def progressive_sharpening(sharpness: Sequence[float], lr: float) -> bool:
    """The sharpness rises before it meets the stability limit: its peak after the first tenth
    of the measurements is at least 1.5 times its start (the first tenth's median), and it
    started below 0.8 * 2/lr."""
    if len(sharpness) < 5:
        return False
    cut = max(len(sharpness) // 10, 1)
    head = sorted(sharpness[:cut])
    start = head[len(head) // 2]
    return start < 0.8 * 2 / lr and max(sharpness[cut:]) >= 1.5 * start


def hovers_at_edge(sharpness: Sequence[float], lr: float, *, band: float = 0.2) -> bool:
    """At the edge of stability: in the second half of training, at least 60% of the
    measurements lie within ``band`` (relative) of 2/lr."""
    tail = sharpness[len(sharpness) // 2 :]
    if len(tail) < 3:
        return False
    near = [s for s in tail if abs(s * lr / 2 - 1) <= band]
    return len(near) >= 0.6 * len(tail)


def run_extension(out: Path, settings: ExtensionSettings | None = None) -> list[dict[str, Any]]:
    """Every run of the extension (skipping those already in ``out/extension``), with the
    rules' verdicts; returns the run records."""
    settings = settings or ExtensionSettings()
    folder = out / "extension"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "settings.json", json.dumps(asdict(settings), indent=2).encode())
    middle = settings.lr_fractions[len(settings.lr_fractions) // 2]
    plan = [(norm, f, 0.0) for norm in settings.norms for f in settings.lr_fractions]
    plan += [("bn", middle, wd) for wd in settings.weight_decays if wd > 0]
    records = []
    for norm, fraction, wd in plan:
        path = folder / f"{_run_name(norm, fraction, wd)}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        record = train_full_batch(settings, norm, fraction, wd)
        lr = record["lr"]
        record["progressive_sharpening"] = progressive_sharpening(record["sharpness"], lr)
        record["hovers_at_edge"] = hovers_at_edge(record["sharpness"], lr)
        write_atomic(path, (json.dumps(record) + "\n").encode())
        records.append(record)
    return records
