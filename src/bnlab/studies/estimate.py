"""A study's wall-clock estimate, said before a long run starts (``--protocol paper``)."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from bnlab.studies.santurkar import Study
from bnlab.train import TrainConfig, run_names

PROBE_OVERHEAD = 0.5  # measured probes add about this share to a landscape run's steps


def step_seconds(config: TrainConfig, repeats: int = 3) -> float:
    """Seconds of one SGD step of ``config``'s model (its BN version) on its device and batch
    size, the median of ``repeats`` steps after one warm-up step."""
    from bnlab.data import load_dataset
    from bnlab.models import build_model

    data = config.data
    dataset = load_dataset(data.spec, standardize=data.standardize, **data.options)
    device = torch.device(config.device)
    model = build_model(
        config.model.name,
        dataset.input_shape,
        dataset.num_outputs,
        norm="bn",
        seed=0,
        **config.model.options,
    ).to(device)
    x = dataset.x_train[: data.batch_size].to(device)
    y = dataset.y_train[: data.batch_size].to(device)
    loss_fn = (
        torch.nn.functional.cross_entropy
        if dataset.task == "classification"
        else torch.nn.functional.mse_loss
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def estimate_seconds(study: Study, jobs: int) -> tuple[float, int, int]:
    """(estimated wall seconds, runs, steps in all): every run's steps times its model's
    measured step time (plus PROBE_OVERHEAD where it has probes), spread over ``jobs``."""
    total, runs, steps = 0.0, 0, 0
    for experiment in study.experiments:
        configs = [config for _, config in run_names(experiment.sweep)]
        base = replace(experiment.sweep.base, probes=[])
        per_step = step_seconds(base)
        factor = 1.0 + (PROBE_OVERHEAD if experiment.sweep.base.probes else 0.0)
        runs += len(configs)
        steps += sum(c.steps for c in configs)
        total += sum(c.steps for c in configs) * per_step * factor
    return total / max(jobs, 1), runs, steps
