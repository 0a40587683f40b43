"""Measurements taken after training, from a run's final checkpoint, stored next to the run
store.

For each run of a landscape experiment, on the run's own training batch size or 256 training
samples, whichever is larger (the DLN's whole data set):

- Theorem 4.1 (``gradient_bound``) for models with plain BN layers, and for the first seed of
  the standard and BN arms a 2-D loss surface and a spectral density;
- for those two runs, the cost of one call of each training-time probe on the final weights,
  so the report can estimate where the time went (the run store does not record probe times).

Activation distributions are not measured here: the ``activation_distribution`` probe records
them during training, from the step's own forward pass.

Results go to ``OUT/measurements/<experiment>/<run>.json``; a run already measured is skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import landscape
from bnlab.data import Dataset, load_dataset
from bnlab.models import build_model
from bnlab.train import TrainConfig, load_config
from bnlab.train.checkpoint import list_checkpoints, read_checkpoint
from bnlab.train.probes import make_probe
from bnlab.train.store import write_atomic

PROBE_BATCH = 256
SURFACE_GRID = tuple(-1.0 + i / 6 for i in range(13))  # 13 x 13 points in [-1, 1]^2


def loss_function(dataset: Dataset) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy for class labels, mean squared error for regression (as the trainer)."""
    if dataset.task == "classification":
        return nn.functional.cross_entropy
    return nn.functional.mse_loss


def _dataset(config: TrainConfig) -> Dataset:
    data = config.data
    return load_dataset(
        data.spec,
        seed=data.split_seed,
        test_fraction=data.test_fraction,
        standardize=data.standardize,
        **data.options,
    )


def _model(config: TrainConfig, dataset: Dataset, norm: str | None = None) -> nn.Module:
    spec = config.model
    return build_model(
        spec.name,
        dataset.input_shape,
        dataset.num_outputs,
        norm=norm or spec.norm,
        norm_options=spec.norm_options,
        init_scale=spec.init_scale,
        seed=config.seed,
        **spec.options,
    )


def _timed(
    results: dict[str, Any], seconds: dict[str, float], key: str, work: Callable[[], Any]
) -> None:
    start = time.perf_counter()
    results[key] = work()
    seconds[key] = time.perf_counter() - start


def measure_run(run_dir: Path, *, detailed: bool) -> dict[str, Any]:
    """All post-training measurements of one run (see the module docstring). ``detailed`` adds
    the loss surface and spectral density."""
    config = load_config(run_dir / "config.toml")
    dataset = _dataset(config)
    loss_fn = loss_function(dataset)
    size = max(PROBE_BATCH, config.data.batch_size)
    batch = (dataset.x_train[:size], dataset.y_train[:size])
    model = _model(config, dataset)
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        results["seconds"] = seconds
        return results  # a run that died before its first checkpoint has nothing to measure

    model.load_state_dict(read_checkpoint(checkpoints[-1][1])["model"])
    results["final_step"] = checkpoints[-1][0]
    try:
        _timed(
            results,
            seconds,
            "gradient_bound",
            lambda: landscape.gradient_bound(model, loss_fn, batch).to_dict(),
        )
    except ValueError:
        pass  # no plain BatchNorm layer: Theorem 4.1 does not apply
    if detailed:
        _timed(
            results,
            seconds,
            "loss_surface",
            lambda: landscape.loss_surface(
                model, loss_fn, batch, SURFACE_GRID, SURFACE_GRID, seed=0
            ).to_dict(),
        )
        _timed(
            results,
            seconds,
            "spectral_density",
            lambda: landscape.spectral_density(
                model, loss_fn, batch, iterations=40, seed=0
            ).to_dict(),
        )
        # one timed call of each probe: on the detailed runs only (it costs a probe schedule)
        results["probe_seconds_per_call"] = _probe_costs(config, model, loss_fn, batch)
    results["seconds"] = seconds
    return results


def _probe_costs(
    config: TrainConfig, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], batch: Any
) -> dict[str, float]:
    """Seconds of one call of each configured probe on the final weights and a training-size
    batch (the trainer's store does not time probes)."""
    from bnlab.train import ProbeContext

    small = (batch[0][: config.data.batch_size], batch[1][: config.data.batch_size])
    optimizer = getattr(torch.optim, config.optim.name)(model.parameters(), lr=config.optim.lr)
    context = ProbeContext(model, loss_fn, small, optimizer, config.steps)
    costs = {}
    for probe in config.probes:
        hook = make_probe(probe.name, probe.every, probe.options)
        start = time.perf_counter()
        hook(context)
        costs[probe.name] = time.perf_counter() - start
    return costs


def measure_experiment(
    runs_dir: Path, out_dir: Path, *, detailed_runs: set[str], progress: bool = True
) -> None:
    """Measure every finished or diverged run under ``runs_dir`` into ``out_dir``; a run with
    a result file already is skipped."""
    from tqdm.auto import tqdm

    from bnlab.train import read_status

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        status = read_status(run_dir)
        target = out_dir / f"{run_dir.name}.json"
        if status and status["state"] in ("finished", "diverged") and not target.exists():
            todo.append((run_dir, target))
    for run_dir, target in tqdm(todo, desc="measurements", disable=not progress, leave=False):
        result = measure_run(run_dir, detailed=run_dir.name in detailed_runs)
        write_atomic(target, json.dumps(result).encode())
