"""Distributed launch through torch's own launcher, ``torch.distributed.run`` (torchrun).

``launch(torchrun_command(config_path, run_dir, nproc))`` runs ``python -m torch.distributed.run
--nproc-per-node N ... -m bnlab.train.distributed CONFIG RUN_DIR [--set key=value ...]``; every
process then calls :func:`bnlab.train.train`, which joins the process group torchrun describes
(gloo on CPU, nccl on CUDA), wraps the model in DistributedDataParallel and takes its shard of
each global batch. Probes run on rank 0 only, over its shard, with per-process statistics. The
same module works under a hand-written torchrun command on several machines::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 \\
        -m bnlab.train.distributed CONFIG RUN_DIR

(the run directory must then be on a filesystem every node sees).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def torchrun_command(
    config_path: str | Path,
    run_dir: str | Path,
    nproc: int,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str = "c10d",
    rdzv_id: str | None = None,
    progress: bool = True,
) -> list[str]:
    """The torchrun command line for a distributed run (a single node is ``--standalone``)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv_endpoint is None and nnodes == "1":
        command.append("--standalone")
    else:
        command += ["--nnodes", nnodes, "--rdzv-backend", rdzv_backend]
        if rdzv_endpoint is not None:
            command += ["--rdzv-endpoint", rdzv_endpoint]
        if rdzv_id is not None:
            command += ["--rdzv-id", rdzv_id]
        if node_rank is not None:
            command += ["--node-rank", str(node_rank)]
    command += ["-m", "bnlab.train.distributed", str(config_path), str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    if not progress:
        command.append("--no-progress")
    return command


def launch(command: Sequence[str]) -> int:
    """Run a :func:`torchrun_command`; returns torchrun's exit code."""
    return subprocess.run(list(command), check=False).returncode


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of each torchrun process: load the config and train."""
    parser = argparse.ArgumentParser(prog="python -m bnlab.train.distributed")
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from bnlab.train.config import load_config
    from bnlab.train.loop import train

    config = load_config(args.config, args.overrides)
    try:
        train(config, args.run_dir, progress=not args.no_progress)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; leave together
    finally:
        # frees the gloo backend and joins its threads while the interpreter is whole (it
        # must drop the last reference to the group: see loop._distributed_setup)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
