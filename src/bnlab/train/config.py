"""Training configuration: dataclasses, validated once at the edge, TOML on disk.

``TrainConfig`` nests one dataclass per section (data, model, optim, schedule, probes,
checkpoint). ``load_config(path, overrides)`` reads TOML and applies ``key=value`` overrides
(``optim.lr=0.1``); ``to_toml`` writes it back, so TOML -> dataclass -> TOML is the identity.
Every problem raises :class:`ConfigError`, which names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration value; ``key`` is its dotted name (``"optim.lr"``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class DataConfig:
    """Which data and how it is batched.

    ``spec``: a dataset of ``bnlab.data.load_dataset`` (``digits``, ``cifar10:PATH``, ...);
    ``batch_size``: the global batch (split evenly over processes in distributed runs);
    ``split_seed``: the train/test split of the embedded sets (fixed across training seeds);
    ``options``: the dataset generator's options (``n_samples``, ...).
    """

    spec: str = "digits"
    batch_size: int = 64
    eval_batch_size: int = 1024
    test_fraction: float = 0.2
    split_seed: int = 0
    standardize: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A model of ``bnlab.models.build_model``: ``name``, ``norm`` (a kind of
    ``bnlab.nn.NORM_KINDS``), ``init_scale`` (the bad-initialization knob), ``norm_options``
    for the norm layers and ``options`` for the model (``widths``, ``hidden``, ``depth``...)."""

    name: str = "vgg_digits"
    norm: str = "bn"
    init_scale: float = 1.0
    norm_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Any ``torch.optim`` optimizer by class name; ``momentum`` and ``weight_decay`` go to it
    when its constructor takes them, ``options`` holds any other keyword (``betas``, ...)."""

    name: str = "SGD"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per training step.

    ``name``: constant | step (x ``gamma`` every ``step_size`` steps) | multistep (x ``gamma``
    at each of ``milestones``) | cosine (to ``min_lr`` at the last step) | exponential (x
    ``gamma`` per step). ``warmup_steps`` > 0 prepends a linear warm-up from lr / 10.
    """

    name: str = "constant"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    min_lr: float = 0.0


@dataclass
class ProbeConfig:
    """A probe hook of ``bnlab.train.probes.PROBES`` run every ``every`` steps, before the
    step's update; ``options`` go to the probe function."""

    name: str = ""
    every: int = 100
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """A checkpoint every ``every`` steps (and at the last step); the newest ``keep`` stay."""

    every: int = 100
    keep: int = 2


@dataclass
class TrainConfig:
    """One training run.

    ``steps``: optimizer steps; ``eval_every``: test-set evaluation period (0: only at the
    end); ``log_every``: period of the per-step "train" rows; ``device``: cpu | cuda | cuda:N;
    ``threads``: torch CPU threads (0: torch's default); ``loss``: auto (cross-entropy for
    classification, mean squared error for regression) | cross_entropy | mse.
    """

    seed: int = 0
    steps: int = 500
    eval_every: int = 100
    log_every: int = 1
    device: str = "cpu"
    threads: int = 0
    loss: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    probes: list[ProbeConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


LOSSES: tuple[str, ...] = ("auto", "cross_entropy", "mse")
MAX_THREADS = 1024
SCHEDULES: tuple[str, ...] = ("constant", "step", "multistep", "cosine", "exponential")
_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig,
}


# ---------------------------------------------------------------------------- dict -> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (int, float, bool, str, dict, list[int],
    list[ProbeConfig])."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return [_build(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(key, value, tp)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # pragma: no cover


def _build(prefix: str, data: Any, cls: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a table of {_type_name(cls)} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(dotted, f"unknown key; allowed keys: {', '.join(names)}")
        values[key] = _coerce(dotted, value, hints[key])
    return cls(**values)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a nested dict (as parsed from TOML). Raises ConfigError."""
    config: TrainConfig = _build("", data, TrainConfig)
    validate(config)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The nested dict of ``config`` (TOML-ready: no None values)."""
    return dataclasses.asdict(config)


def to_toml(config: TrainConfig) -> str:
    """``config`` as TOML text; ``config_from_dict(tomllib.loads(to_toml(c))) == c``."""
    return tomli_w.dumps(config_to_dict(config))


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TrainConfig from a TOML file and apply ``key=value`` overrides.

    Raises ConfigError for unknown keys and bad values, and for a file that is not TOML.
    """
    data = read_toml(path)
    data.pop("sweep", None)  # a sweep file is a train config plus its grid
    return config_from_dict(apply_overrides(data, overrides))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file; ConfigError (key: the file) when unreadable."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise ConfigError(str(path), f"cannot read the config file ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), f"not valid TOML ({error})") from error


def parse_value(text: str) -> Any:
    """A command-line value as TOML (``0.1``, ``true``, ``[1, 2]``, ``"x"``), else a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the nested dict ``data`` with the dotted ``key`` set to ``value``."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "expected a dotted key such as optim.lr")
    result = dict(data)
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, Mapping):
            raise ConfigError(".".join(parts[: depth + 1]), f"is {child!r}, not a table")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return result


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``data`` with each ``key=value`` override applied (values parsed by parse_value)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(override, "an override must look like key=value (optim.lr=0.1)")
        data = set_key(data, key.strip(), parse_value(text.strip()))
    return data


def with_values(config: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """A validated copy of ``config`` with dotted ``values`` set (``{"optim.lr": 0.1}``)."""
    data = config_to_dict(config)
    for key, value in values.items():
        data = set_key(data, key, value)
    return config_from_dict(data)


# ---------------------------------------------------------------------------------- validation


def _choice(key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; allowed values: {', '.join(allowed)}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(key, f"must be {bound}, got {value}")


def optimizer_names() -> tuple[str, ...]:
    """Class names of the torch.optim optimizers."""
    import torch

    return tuple(
        sorted(
            name
            for name, obj in vars(torch.optim).items()
            if isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        )
    )


def optimizer_arguments(name: str) -> tuple[str, ...]:
    """Keyword arguments of ``torch.optim.<name>`` that ``optim.options`` may set."""
    import inspect

    import torch

    own = {"params", "lr", "momentum", "weight_decay"}
    parameters = inspect.signature(getattr(torch.optim, name)).parameters
    return tuple(p for p in parameters if p not in own)


def validate(config: TrainConfig) -> None:
    """Check values beyond their types; raises ConfigError naming the key."""
    from bnlab.data import dataset_options
    from bnlab.models import MODELS, model_options
    from bnlab.nn import NORM_KINDS
    from bnlab.train.probes import PROBES, probe_options

    for key in ("steps", "log_every"):
        _positive(key, getattr(config, key))
    for key in ("eval_every", "threads"):
        _positive(key, getattr(config, key), zero_ok=True)
    if config.threads > MAX_THREADS:
        raise ConfigError("threads", f"must be <= {MAX_THREADS}, got {config.threads}")
    for key, seed in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
        if not 0 <= seed < 2**32:  # NumPy's seed range
            raise ConfigError(key, f"must be in [0, 2**32), got {seed}")
    if not (config.device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", config.device)):
        raise ConfigError(
            "device", f"unknown device {config.device!r}; allowed values: cpu, cuda, cuda:N"
        )
    _choice("loss", config.loss, LOSSES)

    data = config.data
    try:
        accepted = dataset_options(data.spec)
    except ValueError as error:
        raise ConfigError("data.spec", str(error)) from error
    for key in data.options:
        if key not in accepted:
            raise ConfigError(
                f"data.options.{key}",
                f"unknown option of dataset {data.spec!r}; "
                f"allowed: {', '.join(accepted) or 'none'}",
            )
    _positive("data.batch_size", data.batch_size)
    _positive("data.eval_batch_size", data.eval_batch_size)
    if not 0.0 < data.test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be in (0, 1), got {data.test_fraction}")

    model = config.model
    _choice("model.name", model.name, MODELS)
    _choice("model.norm", model.norm, NORM_KINDS)
    _positive("model.init_scale", model.init_scale)
    own = {"norm", "norm_options", "init_scale", "seed"}
    allowed = [o for o in model_options(model.name) if o not in own]
    for key in model.options:
        if key not in allowed:
            raise ConfigError(
                f"model.options.{key}",
                f"unknown option of model {model.name!r}; allowed: {', '.join(allowed) or 'none'}",
            )

    optim = config.optim
    _choice("optim.name", optim.name, optimizer_names())
    accepted = optimizer_arguments(optim.name)
    for key in optim.options:
        if key not in accepted:
            raise ConfigError(
                f"optim.options.{key}",
                f"not an argument of torch.optim.{optim.name} besides lr, momentum and "
                f"weight_decay; allowed: {', '.join(accepted) or 'none'}",
            )
    _positive("optim.lr", optim.lr)
    _positive("optim.momentum", optim.momentum, zero_ok=True)
    _positive("optim.weight_decay", optim.weight_decay, zero_ok=True)

    schedule = config.schedule
    _choice("schedule.name", schedule.name, SCHEDULES)
    _positive("schedule.warmup_steps", schedule.warmup_steps, zero_ok=True)
    _positive("schedule.step_size", schedule.step_size)
    _positive("schedule.gamma", schedule.gamma)
    _positive("schedule.min_lr", schedule.min_lr, zero_ok=True)
    if schedule.warmup_steps >= config.steps:
        raise ConfigError(
            "schedule.warmup_steps",
            f"must be < steps ({config.steps}), got {schedule.warmup_steps}",
        )

    for i, probe in enumerate(config.probes):
        _choice(f"probes[{i}].name", probe.name, PROBES)
        _positive(f"probes[{i}].every", probe.every)
        accepted = probe_options(probe.name)
        for key in probe.options:
            if key not in accepted:
                raise ConfigError(
                    f"probes[{i}].options.{key}",
                    f"unknown option of probe {probe.name!r}; allowed: {', '.join(accepted)}",
                )

    _positive("checkpoint.every", config.checkpoint.every)
    _positive("checkpoint.keep", config.checkpoint.keep)


__all__ = [
    "LOSSES",
    "SCHEDULES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbeConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "optimizer_names",
    "parse_value",
    "read_toml",
    "set_key",
    "to_toml",
    "validate",
    "with_values",
]
