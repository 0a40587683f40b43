"""Measurements taken after training, from a run's checkpoints, stored next to the run store.

For each run of the ``landscape`` experiment, on one fixed batch of training samples:

- the distribution of one normalization slot's output (the last norm layer of the BN model;
  the same position, an identity, in the standard model) at every checkpoint, in training mode
  as the network saw it: pooled quantiles and per-channel mean and std;
- on the final weights: Theorem 4.1 (``gradient_bound``) for models with plain BN layers, and
  for the first seed of the standard and BN arms a 2-D loss surface and a spectral density;
- the cost of one call of each training-time probe on the final weights, so the report can
  estimate where the time went when the run store does not record probe times.

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
from bnlab.nn import is_norm_layer
from bnlab.train import TrainConfig, load_config
from bnlab.train.checkpoint import list_checkpoints, read_checkpoint
from bnlab.train.probes import make_probe
from bnlab.train.store import write_atomic

QUANTILE_LEVELS: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
SHIFT_LEVELS: tuple[float, ...] = tuple((i + 0.5) / 20 for i in range(20))
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


def watched_layer(config: TrainConfig, dataset: Dataset) -> str:
    """The module name of the last norm slot of this architecture (found on its BN version)."""
    names = [n for n, m in _model(config, dataset, norm="bn").named_modules() if is_norm_layer(m)]
    if not names:
        raise ValueError(f"model {config.model.name!r} has no normalization slot to watch")
    return names[-1]


@torch.no_grad()
def layer_distribution(model: nn.Module, layer: str, inputs: Tensor) -> dict[str, Any]:
    """Quantiles and per-channel mean/std of ``layer``'s output on ``inputs``, training mode
    (batch statistics, noise on), on a copy so running statistics stay untouched."""
    captured: list[Tensor] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model.train()
        model(inputs)
    finally:
        handle.remove()
    out = captured[0].double()
    channels = out.transpose(0, 1).reshape(out.shape[1], -1)
    pooled = channels.reshape(-1)
    return {
        "quantiles": torch.quantile(
            pooled, torch.tensor(QUANTILE_LEVELS, dtype=out.dtype)
        ).tolist(),
        "shift_quantiles": torch.quantile(
            pooled, torch.tensor(SHIFT_LEVELS, dtype=out.dtype)
        ).tolist(),
        "std": float(pooled.std()),
        "channel_means": channels.mean(dim=1).tolist(),
        "channel_stds": channels.std(dim=1).tolist(),
    }


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
    batch = (dataset.x_train[:PROBE_BATCH], dataset.y_train[:PROBE_BATCH])
    layer = watched_layer(config, dataset)
    model = _model(config, dataset)
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {"layer": layer, "quantile_levels": list(QUANTILE_LEVELS)}

    start = time.perf_counter()
    steps, rows = [0], [layer_distribution(_model(config, dataset), layer, batch[0])]
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for step, path in checkpoints:
        model.load_state_dict(read_checkpoint(path)["model"])
        steps.append(step)
        rows.append(layer_distribution(model, layer, batch[0]))
    results["activations"] = {"steps": steps, "rows": rows}
    seconds["activations"] = time.perf_counter() - start
    if not checkpoints:
        results["seconds"] = seconds
        return results  # a run that died before its first checkpoint has nothing more

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
