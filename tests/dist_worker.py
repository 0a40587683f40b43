"""One rank of the cross-process statistics test (run by tests/test_distributed.py).

Usage: python dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE
Every rank takes its (uneven) slice of a global batch, runs two training steps of each variant,
and saves outputs, input gradients, all-reduced parameter gradients and running statistics.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import bnlab.nn as bnn

KINDS = ("bn", "l1", "l2", "linf", "ghost", "renorm")
SPLIT = (6, 2)  # uneven per-rank batch sizes; multiples of the ghost virtual batch (2)


def global_batches(steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shape = (sum(SPLIT), 3, 4, 4)
    return [
        (torch.randn(shape, generator=gen) * 2 + 3, torch.randn(shape, generator=gen))
        for _ in range(steps)
    ]


def make_layer(kind: str) -> torch.nn.Module:
    options = {"virtual_batch_size": 2} if kind == "ghost" else {}
    layer = bnn.norm_layer(kind, 3, rank=2, momentum=0.3, **options)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def run(kind: str, rows: slice) -> dict[str, list[torch.Tensor]]:
    """Two steps on the given rows of each global batch; gradients summed over ranks."""
    layer = make_layer(kind)
    out: dict[str, list[torch.Tensor]] = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x, dy in global_batches():
        xs = x[rows].clone().requires_grad_()
        y = layer(xs)
        y.backward(dy[rows])
        dweight, dbias = layer.weight.grad.clone(), layer.bias.grad.clone()
        if dist.is_initialized():
            dist.all_reduce(dweight)
            dist.all_reduce(dbias)
        out["y"].append(y.detach())
        out["dx"].append(xs.grad)
        out["dweight"].append(dweight)
        out["dbias"].append(dbias)
        layer.zero_grad()
    out["buffers"] = [b.clone() for b in layer.buffers()]
    return out


def main() -> None:
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    start = sum(SPLIT[:rank])
    rows = slice(start, start + SPLIT[rank])
    torch.save({kind: run(kind, rows) for kind in KINDS}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
