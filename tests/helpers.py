"""Small helpers for the tests: float64 comparisons, and a launcher of gloo rank processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rel_err(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """max |actual - expected| / max(|expected|, 1): the relative error the issue's bounds use."""
    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    e = expected.detach().double().cpu().numpy() if isinstance(expected, torch.Tensor) else expected
    a = np.asarray(a, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1.0))


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def run_ranks(worker: str | Path, folder: Path, world: int = 2, timeout: float = 240) -> list[Any]:
    """Run ``python worker RANK WORLD INIT_FILE RESULT_FILE`` as ``world`` processes at once
    (a gloo group rendezvousing through ``folder/init``, one intra-op thread each) and return
    what each rank saved with ``torch.save`` to its result file, by rank. A rank that fails
    fails the test with its output; no process outlives the call."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(worker)]
    results = [folder / f"rank{rank}.pt" for rank in range(world)]
    procs = [
        subprocess.Popen(
            [*command, str(rank), str(world), str(folder / "init"), str(results[rank])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, output
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [torch.load(path) for path in results]
