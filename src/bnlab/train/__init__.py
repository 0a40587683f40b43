"""Training: config dataclasses, the loop, the run store, sweeps and distributed launch.

Public API (stable): ``TrainConfig`` and its sections, ``load_config``, ``to_toml``,
``ConfigError``; ``train(config, run_dir)``; ``sweep(config, out_dir, jobs=...)`` with
``SweepConfig`` / ``load_sweep_config``; ``RunStore``, ``read_metrics``, ``read_status``;
``ProbeHook`` and ``ProbeContext``; ``RunLock``, ``RunLockedError`` and ``lock_holder`` (one
writer per run directory).
"""

from bnlab.train.checkpoint import CheckpointWarning, load_latest
from bnlab.train.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    to_toml,
    with_values,
)
from bnlab.train.lock import RunLock, RunLockedError, lock_holder
from bnlab.train.loop import RunResult, evaluate, train
from bnlab.train.probes import PROBES, ProbeContext, ProbeHook, make_probe
from bnlab.train.store import RunStore, read_metrics, read_status
from bnlab.train.sweep import SweepConfig, load_sweep_config, run_names, sweep

__all__ = [
    "PROBES",
    "CheckpointConfig",
    "CheckpointWarning",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbeConfig",
    "ProbeContext",
    "ProbeHook",
    "RunLock",
    "RunLockedError",
    "RunResult",
    "RunStore",
    "ScheduleConfig",
    "SweepConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "load_config",
    "load_latest",
    "load_sweep_config",
    "lock_holder",
    "make_probe",
    "read_metrics",
    "read_status",
    "run_names",
    "sweep",
    "to_toml",
    "train",
    "with_values",
]
