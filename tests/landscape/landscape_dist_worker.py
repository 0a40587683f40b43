"""One rank of the probes-across-processes test (run by test_landscape_distributed.py).

Usage: python landscape_dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE
Every rank takes its (uneven) share of a global batch, runs the probes on
``across_ranks(share)`` and saves their JSON results and one HVP.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L

SPLIT = (7, 5)  # uneven shares: the all-reduce must weight by sample counts
CE = nn.functional.cross_entropy


def shares() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (sum(SPLIT),), generator=gen)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


KINDS = ("plain", "bn", "bn_per_rank")
"""No normalization; bnlab BN (statistics over all ranks under torch.distributed, like
SyncBatchNorm); bnlab BN with ``sync_stats=False`` (statistics of each rank's share)."""


def model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    norm: nn.Module = nn.Identity()
    if kind != "plain":
        norm = bnn.BatchNorm1d(6, sync_stats=kind == "bn")
    return nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()


def measure(kind: str, data: Any) -> dict[str, Any]:
    """The probes' results on ``data`` (a batch, a loader or a RankShare)."""
    m = model(kind)
    ones = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    first_order = {
        "path": L.gradient_path(m, CE, data, etas=[0.1, 1.0]).to_dict(),
        "effective_lr": L.effective_learning_rates(m, CE, data, lr=0.1).to_dict(),
    }
    if kind == "bn" and isinstance(data, L.RankShare):
        try:  # statistics across ranks: curvature is refused
            L.hvp(m, CE, data, ones)
        except ValueError as error:
            return {**first_order, "refused": str(error)}
    if kind == "bn":
        return first_order
    return {
        **first_order,
        "eigenvalues": L.top_eigenvalues(m, CE, data, k=2, tol=1e-10).to_dict(),
        "ggn": L.top_eigenvalues(m, CE, data, k=2, tol=1e-10, operator="ggn").to_dict(),
        "trace": L.hutchinson_trace(m, CE, data, samples=4).to_dict(),
        "density": L.spectral_density(m, CE, data, iterations=6).to_dict(),
        "sharpness": L.sharpness(m, CE, data, tol=1e-10).to_dict(),
        "hvp": {k: v.tolist() for k, v in L.hvp(m, CE, data, ones).items()},
    }


def main() -> None:
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = L.across_ranks(shares()[rank])
        torch.save({kind: measure(kind, share) for kind in KINDS}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
