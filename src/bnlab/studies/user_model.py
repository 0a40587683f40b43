"""Bring your own model: the study's probes and comparison on a user's ``FILE.py:FACTORY``.

The factory (no arguments, returns an ``nn.Module`` with normalization layers) is registered as
a model of ``bnlab.models`` for the duration of the measurement; each norm kind of ``--norms``
is made by ``bnlab.nn.convert_norm`` on a fresh model. The runs train in this process (a sweep's
worker processes would not know the user's file) and produce the same folder, and so the same
report, as ``bnlab reproduce`` restricted to the claims the chosen norms can answer.

``--data`` may be the user's own ``FILE.py:FACTORY`` too: a function returning ``(train, test)``
``torch.utils.data.Dataset``s or DataLoaders of ``(input, target)`` pairs, read once into
tensors (integer targets: classification; float targets: regression) and registered as a
dataset of ``bnlab.data`` while the study runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data import Dataset, load_dataset
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
from bnlab.train import ProbeConfig, SweepConfig

USER_MODEL = "user_model"

Factory = Callable[[], nn.Module]


def load_factory(spec: str, option: str = "--model") -> Callable[[], Any]:
    """The callable ``FACTORY`` of ``FILE.py:FACTORY``. Raises ValueError naming ``option`` and
    what is wrong (no colon, missing file, import error, no such attribute, not callable)."""
    path_text, sep, attribute = spec.rpartition(":")
    if not sep or not path_text or not attribute:
        raise ValueError(f"{option} expects FILE.py:FACTORY, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{option}: no such file {str(path)!r}")
    module_spec = importlib.util.spec_from_file_location(f"bnlab_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{option}: cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(
            f"{option}: importing {path} failed: {type(error).__name__}: {error}"
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{option}: {path} has no callable {attribute!r}")
    return factory


def is_user_data(spec: str) -> bool:
    """Whether a ``--data`` spec names the user's ``FILE.py:FACTORY``."""
    return spec.rpartition(":")[0].endswith(".py")


def _as_tensors(data: Any, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(input, target)`` pairs of a Dataset or DataLoader, concatenated."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, TorchDataset):
        data = DataLoader(data, batch_size=512, shuffle=False)
    elif not isinstance(data, DataLoader):
        raise ValueError(
            f"--data: the {which} part is a {type(data).__name__}, not a torch.utils.data "
            "Dataset or DataLoader"
        )
    xs, ys = [], []
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"--data: {which} items must be (input, target) pairs")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise ValueError(f"--data: the {which} set is empty")
    try:
        return torch.cat(xs), torch.cat(ys)
    except RuntimeError as error:
        raise ValueError(f"--data: the {which} batches do not stack: {error}") from error


def user_dataset(spec: str) -> Dataset:
    """The user's ``FILE.py:FACTORY`` data as a bnlab Dataset. Raises ValueError naming what
    is wrong (the factory, its return value, shapes or target types)."""
    factory = load_factory(spec, "--data")
    try:
        made = factory()
    except Exception as error:
        raise ValueError(f"--data: {spec} raised {type(error).__name__}: {error}") from error
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ValueError(
            f"--data: {spec} must return (train, test) Datasets or DataLoaders, got "
            f"{type(made).__name__}"
        )
    x_train, y_train = _as_tensors(made[0], "train")
    x_test, y_test = _as_tensors(made[1], "test")
    if x_train.shape[1:] != x_test.shape[1:] or y_train.shape[1:] != y_test.shape[1:]:
        raise ValueError(
            f"--data: train and test shapes differ: inputs {tuple(x_train.shape[1:])} vs "
            f"{tuple(x_test.shape[1:])}, targets {tuple(y_train.shape[1:])} vs "
            f"{tuple(y_test.shape[1:])}"
        )
    if y_train.is_floating_point():
        y_train, y_test = (y.reshape(len(y), -1).float() for y in (y_train, y_test))
        task, outputs = "regression", int(y_train.shape[1])
    elif y_train.dim() == 1 and not y_train.is_complex() and y_train.dtype != torch.bool:
        if int(min(y_train.min(), y_test.min())) < 0:
            raise ValueError("--data: class labels must be >= 0")
        task, outputs = "classification", int(max(y_train.max(), y_test.max())) + 1
        y_train, y_test = y_train.long(), y_test.long()
    else:
        raise ValueError(
            "--data: targets must be integer class labels of shape (N,) or float regression "
            f"targets, got {y_train.dtype} of shape {tuple(y_train.shape)}"
        )
    return Dataset(
        name=spec,
        x_train=x_train.float(),
        y_train=y_train,
        x_test=x_test.float(),
        y_test=y_test,
        task=task,  # type: ignore[arg-type]
        num_outputs=outputs,
    )


@contextmanager
def registered_data(spec: str) -> Iterator[None]:
    """The user's ``FILE.py:FACTORY`` as a dataset ``load_dataset(spec)`` knows, in the block
    (a file loader of ``bnlab.data`` keyed by the file, the factory in the place of a path)."""
    from bnlab.data import FROM_FILES

    path = spec.rpartition(":")[0]
    if ":" in path:
        raise ValueError(f"--data: the file path may not contain ':', got {path!r}")
    FROM_FILES[path] = lambda attribute: user_dataset(f"{path}:{attribute}")
    try:
        yield
    finally:
        FROM_FILES.pop(path, None)


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
    with ExitStack() as stack:
        if is_user_data(data):
            stack.enter_context(registered_data(data))
        return _measure_study(model_spec, data, norms, steps, seeds, lr, device)


def _measure_study(
    model_spec: str,
    data: str,
    norms: Sequence[str],
    steps: int,
    seeds: int,
    lr: float,
    device: str,
) -> Study:
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
            probes=[
                *landscape_probes(settings),
                ProbeConfig("sharpness", settings.curvature_every, {"max_iterations": 30}),
                ProbeConfig("effective_learning_rates", settings.probe_every, {"lr": lr}),
            ],
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
    """Register the study's user model and data (if any) while its runs train and are
    measured."""
    with ExitStack() as stack:
        if study.model_spec:
            stack.enter_context(registered_model(load_factory(study.model_spec)))
        if is_user_data(study.data):
            stack.enter_context(registered_data(study.data))
        yield
