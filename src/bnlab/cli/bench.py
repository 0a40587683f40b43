"""``bnlab bench``: the performance scripts (ratios against torch.nn and peer tools)."""

from __future__ import annotations

import click

from bnlab.cli import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "layers": "bnlab.bench.layers:command",
        "hessian": "bnlab.bench.curvature_tools:command",
        "models": "bnlab.bench.models:command",
    },
)
def bench() -> None:
    """Benchmarks, each measured against its baseline in the same run."""
