"""Run a declared study into an output folder; running it again skips what is done.

```
OUT/
  study.json                      the study as data (experiments, grids, settings, claims)
  conditioning/<dataset>.json     claim 9's closed-form measurements
  runs/<experiment>/<run>/        one run store per run (bnlab.train.sweep)
  measurements/<experiment>/<run>.json   post-training measurements (landscape experiments)
  timing.json                     wall-clock seconds of each phase of the last invocation
```

The report (:func:`bnlab.report.build_report`) reads this folder and nothing else.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bnlab.data import load_dataset
from bnlab.studies.extension import run_extension
from bnlab.studies.logistic_conditioning import raw_and_standardized
from bnlab.studies.measurements import measure_experiment
from bnlab.studies.santurkar import Experiment, Study
from bnlab.studies.user_model import user_model_of
from bnlab.train import run_names, sweep, train
from bnlab.train.store import write_atomic

if TYPE_CHECKING:
    from bnlab.train.ray_backend import RayBackend

CONDITIONING_FEATURES = {"mouse": ["height (m)", "age (days)"]}


class StudyFolderError(ValueError):
    """The output folder holds a different study."""


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, flush=True)


def check_data(study: Study) -> None:
    """Load the study's dataset once, so a missing or damaged file fails before any work.
    Raises ValueError (or DataFileError, a ValueError) naming the problem."""
    load_dataset(study.data)


def write_manifest(study: Study, out: Path) -> None:
    """``study.json``; refuses a folder that already holds a different study."""
    manifest = json.loads(json.dumps(study.to_dict()))  # as read back: tuples become lists
    path = out / "study.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise StudyFolderError(
                f"{out} holds a different study (data {old.get('data')!r}, quick "
                f"{old.get('quick')}, seeds {old.get('settings', {}).get('seeds')}); "
                "choose another --out or remove it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())


def run_conditioning(study: Study, out: Path) -> None:
    """Claim 9: raw vs standardized logistic regression on each conditioning dataset."""
    folder = out / "conditioning"
    folder.mkdir(parents=True, exist_ok=True)
    for name in study.conditioning:
        target = folder / f"{name}.json"
        if target.exists():
            continue
        dataset = load_dataset(name)
        X = dataset.x_train.double().numpy()
        y = dataset.y_train.numpy().astype(np.float64)
        features = CONDITIONING_FEATURES.get(name) or _feature_names(name, X.shape[1])
        results = [r.to_dict() for r in raw_and_standardized(X, y, features, name)]
        write_atomic(target, json.dumps(results).encode())


def _feature_names(name: str, count: int) -> list[str]:
    if name == "cancer":
        from sklearn.datasets import load_breast_cancer

        return [str(f) for f in load_breast_cancer().feature_names]
    return [f"x{i}" for i in range(count)]


def run_study(
    study: Study,
    out: str | Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    backend: RayBackend | None = None,
) -> Path:
    """Run every part of ``study`` into ``out`` (layout in the module docstring) and return it.

    Raises ValueError for bad input (unknown dataset, missing file, a folder of another study,
    jobs < 1) before anything is trained. ``backend``: train the runs as tasks on a Ray cluster
    (bnlab.train.ray_backend) instead of ``jobs`` local processes.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    with user_model_of(study):
        return _run(study, Path(out), jobs, progress, backend)


def _keep_torch_threads_pinned() -> None:
    """Work around an interaction in the sweep workers: numba's default OpenMP threading layer,
    started by ``bnlab.train.loop.set_threads``, resets torch's OpenMP thread count to the core
    count, so two workers on two cores each ran two torch threads and the study ran several
    times slower. The workqueue layer leaves torch's count alone. Must be set before the
    sweep's fork server starts (it passes its environment to every worker)."""
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")


def _train(
    experiment: Experiment,
    folder: Path,
    jobs: int,
    in_process: bool,
    progress: bool,
    backend: RayBackend | None,
) -> None:
    """A sweep in worker processes, or (for a user's model, which workers cannot import) one run
    after another in this process; either way finished runs are skipped."""
    if not in_process:
        _keep_torch_threads_pinned()
        sweep(experiment.sweep, folder, jobs=jobs, progress=progress, backend=backend)
        return
    for name, config in run_names(experiment.sweep):
        train(config, folder / name, progress=progress)


def warm_kernels(study: Study) -> None:
    """Compile (or load from numba's disk cache) the CPU kernels of every norm kind the study
    trains, once, here: otherwise the first run of each kind in every worker compiles them."""
    from bnlab.nn import norm_layer

    for rank in sorted(
        {2 if e.sweep.base.model.name.startswith("vgg") else 1 for e in study.experiments}
    ):
        experiments = [
            e
            for e in study.experiments
            if (2 if e.sweep.base.model.name.startswith("vgg") else 1) == rank
        ]
        kinds = {v for e in experiments for v in e.sweep.grid.get("model.norm", [])}
        kinds |= {e.sweep.base.model.norm for e in experiments}
        shape = (8, 3, 2, 2) if rank == 2 else (8, 3)
        for kind in sorted(kinds - {"none"}):
            x = torch.randn(shape, requires_grad=True)
            norm_layer(kind, 3, rank)(x).square().sum().backward()


def _extension_beside(study: Study, out: Path) -> tuple[ProcessPoolExecutor, Future[Any]] | None:
    """Start the extension in a process of its own (one thread), to train beside the
    measurements: both are serial, and each took about 20 s of the default study's wall time
    on two cores. None when the study has no extension."""
    if study.extension is None:
        return None
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context(method),
        initializer=torch.set_num_threads,
        initargs=(1,),
    )
    return executor, executor.submit(run_extension, out, study.extension)


def landscape_experiments(study: Study) -> list[Experiment]:
    """The experiments with the landscape probes (one per setting): the ones measured."""
    return [
        e for e in study.experiments if any(p.name == "gradient_path" for p in e.sweep.base.probes)
    ]


def _run(study: Study, out: Path, jobs: int, progress: bool, backend: RayBackend | None) -> Path:
    check_data(study)
    write_manifest(study, out)
    _keep_torch_threads_pinned()
    start = time.perf_counter()
    _say("preparing the CPU norm kernels (compiled once, then loaded from numba's cache)", progress)
    warm_kernels(study)
    timing: dict[str, Any] = {"jobs": jobs, "kernels": time.perf_counter() - start}
    measuring = 2 + len(study.experiments)  # the phase of the measurements
    phases = measuring + (study.extension is not None)

    start = time.perf_counter()
    if study.conditioning:
        _say(f"[1/{phases}] conditioning (claim 9): {', '.join(study.conditioning)}", progress)
        run_conditioning(study, out)
    timing["conditioning"] = time.perf_counter() - start

    for i, experiment in enumerate(study.experiments, start=2):
        count = int(np.prod([len(v) for v in experiment.sweep.grid.values()]))
        at = f"{jobs} at a time" if backend is None else "as Ray tasks"
        _say(f"[{i}/{phases}] training {experiment.name}: {count} runs, {at}", progress)
        start = time.perf_counter()
        folder = out / "runs" / experiment.name
        _train(experiment, folder, jobs, bool(study.model_spec), progress, backend)
        timing[f"training:{experiment.name}"] = time.perf_counter() - start

    _say(f"[{measuring}/{phases}] measurements on the landscape runs' checkpoints", progress)
    start = time.perf_counter()
    beside = _extension_beside(study, out) if jobs > 1 and backend is None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest and shares the machine best
    try:
        for experiment in landscape_experiments(study):
            first = experiment.sweep.grid["seed"][0]
            measure_experiment(
                out / "runs" / experiment.name,
                out / "measurements" / experiment.name,
                detailed_runs={f"norm={norm},seed={first}" for norm in ("none", "bn")},
                progress=progress,
            )
    except BaseException:
        if beside is not None:
            beside[0].shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        torch.set_num_threads(threads)
    timing["measurements"] = time.perf_counter() - start
    if study.extension is not None:
        _say(
            f"[{phases}/{phases}] extension: edge of stability and effective learning rates",
            progress,
        )
        if beside is None:
            start = time.perf_counter()
            run_extension(out, study.extension)
        else:
            with beside[0]:
                beside[1].result()  # re-raises the extension's error here
        # with the extension beside the measurements: from the measurements' start
        timing["extension"] = time.perf_counter() - start
    write_atomic(out / "timing.json", (json.dumps(timing, indent=2) + "\n").encode())
    return out
