"""Cross-process statistics: two gloo processes equal one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    worker = Path(dist_worker.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(rank),
                "2",
                str(tmp / "init"),
                str(tmp / f"rank{rank}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("kind", dist_worker.KINDS)
def test_two_processes_match_one_process_on_the_concatenated_batch(rank_results, kind):
    single = dist_worker.run(kind, slice(None))
    per_rank = [r[kind] for r in rank_results]
    for key in ("y", "dx"):
        for step, expected in enumerate(single[key]):
            got = torch.cat([r[key][step] for r in per_rank])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{kind} {key}")
    for key in ("dweight", "dbias"):
        for step, expected in enumerate(single[key]):
            for r in per_rank:
                torch.testing.assert_close(r[key][step], expected, rtol=1e-5, atol=1e-5)
    for r in per_rank:
        for got, expected in zip(r["buffers"], single["buffers"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
