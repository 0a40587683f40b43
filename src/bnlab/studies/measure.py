"""Bring your own model: the study's probes and comparison on a user's ``FILE.py:FACTORY``.

The factory (no arguments, returns an ``nn.Module`` with normalization layers) is registered as
a model of ``bnlab.models`` for the duration of the measurement; each norm kind of ``--norms``
is made by ``bnlab.nn.convert_norm`` on a fresh model. The runs train in this process (a sweep's
worker processes would not know the user's file) and produce the same folder, and so the same
report, as ``bnlab reproduce`` restricted to the claims the chosen norms can answer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data import load_dataset
from bnlab.nn import NORM_KINDS, convert_norm, is_norm_layer
from bnlab.studies.santurkar import (
    ARMS,
    VGG_QUICK,
    Experiment,
    Study,
    base_config,
    landscape_probes,
    layer_slots,
)
from bnlab.train import SweepConfig

USER_MODEL = "user_model"

Factory = Callable[[], nn.Module]


def load_factory(spec: str) -> Factory:
    """The callable ``FACTORY`` of ``FILE.py:FACTORY``. Raises ValueError naming what is wrong
    (no colon, missing file, import error, no such attribute, not callable)."""
    path_text, sep, attribute = spec.rpartition(":")
    if not sep or not path_text or not attribute:
        raise ValueError(f"--model expects FILE.py:FACTORY, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"--model: no such file {str(path)!r}")
    module_spec = importlib.util.spec_from_file_location(f"bnlab_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--model: cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(
            f"--model: importing {path} failed: {type(error).__name__}: {error}"
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"--model: {path} has no callable {attribute!r}")
    return factory


def _builder(factory: Factory) -> Callable[..., nn.Module]:
    def build(
        input_shape: Sequence[int],
        num_outputs: int,
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
    ) -> nn.Module:
        # the factory draws from the global RNG: seed it here and leave the caller's as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        return convert_norm(model, norm, **(norm_options or {}))

    return build


@contextmanager
def registered_model(factory: Factory) -> Iterator[str]:
    """``factory`` as the model ``USER_MODEL`` of ``bnlab.models`` inside the block."""
    from bnlab.models import MODELS

    MODELS[USER_MODEL] = _builder(factory)
    try:
        yield USER_MODEL
    finally:
        MODELS.pop(USER_MODEL, None)


def check_model(factory: Factory, data: str) -> None:
    """The model must build, hold a normalization layer and accept the data's inputs."""
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    if not any(is_norm_layer(m) for m in model.modules()):
        raise ValueError(
            "--model: the model has no normalization layer for convert_norm to swap; add a "
            "BatchNorm layer where a norm layer belongs"
        )
    dataset = load_dataset(data)
    try:
        with torch.no_grad():
            out = model.train()(dataset.x_train[:4])
    except Exception as error:
        raise ValueError(
            f"--model: the model does not accept {data} inputs of shape "
            f"{tuple(dataset.x_train[:4].shape)}: {error}"
        ) from error
    if out.shape[-1] != dataset.num_outputs:
        raise ValueError(
            f"--model: the model gives {out.shape[-1]} outputs, {data} has {dataset.num_outputs}"
        )


def claims_for(norms: Sequence[str]) -> tuple[int, ...]:
    """The claims these norm kinds can answer (1, 2 and 9 need the full study's grids)."""
    have = set(norms)
    claims = []
    if {"none", "bn", "noisy_bn"} <= have:
        claims.append(3)
    if {"none", "bn"} <= have:
        claims += [4, 5, 6, 7]
    if {"none", "bn"} <= have and have & {"l1", "l2", "linf"}:
        claims.append(8)
    if "bn" in have:
        claims.append(10)
    if {"none", "bn"} <= have:
        claims.append(11)
    return tuple(sorted(claims))


def parse_norms(text: str) -> list[str]:
    """``"none,bn,l1"`` -> ["none", "bn", "l1"]; ValueError names an unknown kind."""
    norms = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in norms if n not in NORM_KINDS]
    if unknown or not norms:
        raise ValueError(
            f"--norms: unknown norm kind {unknown[0] if unknown else text!r}; known kinds: "
            f"{', '.join(NORM_KINDS)}"
        )
    return list(dict.fromkeys(norms))


def measure_study(
    model_spec: str,
    data: str,
    norms: Sequence[str],
    *,
    steps: int = VGG_QUICK.steps,
    seeds: int = len(VGG_QUICK.seeds),
    lr: float = 0.2,
    device: str = "cpu",
) -> Study:
    """The study of ``model_spec`` (FILE.py:FACTORY) on ``data`` for each of ``norms``: the
    landscape experiment only, trained in this process. Raises ValueError on bad input."""
    if steps < 1 or seeds < 1 or not lr > 0:
        raise ValueError(
            f"--steps and --seeds must be >= 1 and --lr > 0; got {steps}, {seeds}, {lr}"
        )
    factory = load_factory(model_spec)
    check_model(factory, data)
    arm_of = {kind: arm for arm, kind in ARMS.items()}
    arms = {arm_of.get(n, n): n for n in norms}
    with registered_model(factory) as name:
        settings = replace(
            VGG_QUICK,
            name="model",
            title=f"{Path(model_spec.rpartition(':')[0]).name} on {data}",
            model=name,
            model_options={},
            steps=steps,
            seeds=tuple(range(seeds)),
            learning_rates=(lr,),
            init_scales=(1.0,),
            reference_lr=lr,
            probe_every=max(steps // 6, 1),
            activation_every=max(steps // 12, 1),
            curvature_every=max(steps // 2, 1),
            batch_size=64,
            ics_every_layer=True,
        )
        # every layer with a norm slot is watched: a user's model has no "paper's layers"
        settings = replace(settings, highlight=tuple(range(1, len(layer_slots(settings)) + 1)))
        base = base_config(data, settings, device)
        base = replace(
            base,
            threads=1,  # in-process runs of a small model: more threads only contend
            probes=landscape_probes(settings),
        )
        sweep = SweepConfig(base, {"model.norm": list(norms), "seed": list(settings.seeds)})
    return Study(
        name="measure",
        title=f"bnlab measure: {Path(model_spec.rpartition(':')[0]).name}:"
        f"{model_spec.rpartition(':')[2]} on {data}",
        data=data,
        quick=True,
        settings=settings,
        experiments=(
            Experiment(
                "landscape", f"{model_spec} with norms {', '.join(norms)}", sweep, settings.name
            ),
        ),
        claims=claims_for(norms),
        conditioning=(),
        arms=arms,
        model_spec=model_spec,
    )


@contextmanager
def user_model_of(study: Study) -> Iterator[None]:
    """Register the study's user model (if any) while its runs train and are measured."""
    if not study.model_spec:
        yield
        return
    with registered_model(load_factory(study.model_spec)):
        yield
