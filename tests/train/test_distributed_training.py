"""`bnlab train --nproc 2` (torchrun, gloo, DDP, synced BN) matches one process on the same
global batch, and a distributed run killed after a checkpoint resumes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.train import read_metrics, read_status, train
from train.train_cases import final_weights, run_cli, tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_processes_match_one_process_and_resume(tmp_path: Path) -> None:
    # BN statistics are reduced over both ranks and DDP averages the two half-batch gradients,
    # so each step is the single-process step on the same 32 samples, up to float rounding.
    config = tiny_config(**{"steps": 6, "eval_every": 3, "checkpoint.every": 3, "optim.lr": 0.05})
    path = write_config(tmp_path / "config.toml", config)
    single, double = tmp_path / "single", tmp_path / "double"
    assert train(config, single, progress=False).state == "finished"

    args = ("train", str(path), "--run-dir", str(double), "--nproc", "2", "--no-progress")
    killed = run_cli(*args, kill_at="after_checkpoint:3", timeout=240)
    assert killed.returncode != 0
    assert read_status(double)["step"] == 3  # type: ignore[index]
    resumed = run_cli(*args, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(double)["state"] == "finished"  # type: ignore[index]

    rows_1, rows_2 = read_metrics(single), read_metrics(double)
    assert [(r["step"], r["kind"]) for r in rows_1] == [(r["step"], r["kind"]) for r in rows_2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    weights_1, weights_2 = final_weights(single), final_weights(double)
    assert weights_1.keys() == weights_2.keys()
    for key, value in weights_1.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights_2[key], value, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(weights_2[key], value), key


_RANK_THEN_THREADS = """
import os, sys
from bnlab.train.distributed import main
main(sys.argv[1:])
tasks = os.listdir("/proc/self/task")
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)
# one write(2) per rank, so the two ranks' lines cannot interleave on the shared pipe
os.write(1, f"threads at exit of rank {os.environ['RANK']} {names}\\n".encode())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_rank_leaves_no_native_thread_running_into_interpreter_teardown(tmp_path: Path) -> None:
    # A rank's gloo threads (gloo_tcp_loop, pt_gloo_runloop) must be joined by
    # destroy_process_group, not torn down with the interpreter, where a rank aborted now and
    # then ("terminate called without an active exception"). They outlived it when
    # torch._dynamo was first imported after init_process_group and kept the group alive.
    path = write_config(tmp_path / "config.toml", tiny_config(**{"steps": 2, "eval_every": 0}))
    script = tmp_path / "rank.py"
    script.write_text(_RANK_THEN_THREADS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*torchrun, "--standalone", str(script), str(path), str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("threads at exit"))
    assert [line.split(" [")[0] for line in lines] == [
        "threads at exit of rank 0",
        "threads at exit of rank 1",
    ], run.stdout
    # Only threads that keep the process's name: the main thread and, where an op ran on
    # torch's OpenMP pool, its idle workers (libgomp parks them; they end safely with the
    # process). A named native thread (gloo_tcp_loop, pt_gloo_runloop) still running is the bug.
    for line in lines:
        names = ast.literal_eval(line[line.index("[") :])
        assert names.count("python") >= 1 and set(names) == {"python"}, line
