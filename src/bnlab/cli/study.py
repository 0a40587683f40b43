"""``bnlab reproduce``, ``bnlab report`` and ``bnlab measure``: parse, call the library, print.

Bad input (an unknown dataset, a missing file, a bad option value, a folder of another study)
is reported as one ``error:`` line with exit code 2 and no traceback, before anything is
trained; the report's page is written last, so an interrupted command never leaves one that
looks complete.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bnlab.cli.backend import backend_from_options, backend_options

T = TypeVar("T")


def _user_input(step: Callable[[], T]) -> T:
    """Run a step that validates user input; its ValueError becomes ``error: ...``, exit 2."""
    try:
        return step()
    except (ValueError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: CUDA is not available on this machine; use --device cpu"
            )


_DATA_HELP = "digits | cancer | mouse | cifar10:PATH | mnist:PATH"


@click.command()
@click.option("--data", default="digits", show_default=True, help=_DATA_HELP)
@click.option("--quick", is_flag=True, help="Small study (fewer runs, steps and seeds): ~1 min.")
@click.option(
    "--seeds", type=click.IntRange(min=1), default=None, help="Seeds per arm (default 3; quick 2)."
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=min(2, os.cpu_count() or 1),
    show_default=True,
    help="Runs trained at the same time (worker processes).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/reproduce"),
    show_default=True,
    help="Study folder: run stores, figures, report.html. Re-running skips finished runs.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--protocol",
    type=click.Choice(["default", "paper"]),
    default="default",
    show_default=True,
    help="paper: the paper's own VGG-16 (15,000 steps) and DLN (10,000 steps) protocol; needs "
    "--data cifar10:PATH and is meant for --device cuda (the estimated time is printed first).",
)
@backend_options
def reproduce(
    data: str,
    quick: bool,
    seeds: int | None,
    jobs: int,
    out: Path,
    device: str,
    protocol: str,
    **backend: Any,
) -> None:
    """Reproduce Santurkar et al. (2018): train, probe, judge the 11 claims, write the report."""
    from bnlab.report import build_report
    from bnlab.studies import Study, run_study, santurkar_study
    from bnlab.studies.run import check_data, write_manifest

    ray_backend = backend_from_options(backend, device)

    def prepare() -> Study:
        if ray_backend is None:  # on Ray the runs' nodes have the GPUs, not this one
            _check_device(device)
        study = santurkar_study(data, quick=quick, seeds=seeds, device=device, protocol=protocol)
        check_data(study)
        return study

    study = _user_input(prepare)
    if protocol == "paper":
        from bnlab.studies.estimate import estimate_seconds

        seconds, runs, steps = estimate_seconds(study, jobs)
        click.echo(
            f"estimated time: about {seconds / 3600:.1f} h on {device} ({runs} runs, "
            f"{steps:,} steps in all, {jobs} at a time; from 3 timed steps of each model)"
        )
    _user_input(lambda: write_manifest(study, out))
    run_study(study, out, jobs=jobs, backend=ray_backend)
    report = build_report(out)
    click.echo(f"report: {report}")
    click.echo(f"claims: {out / 'claims.json'}, summary: {out / 'summary.md'}")


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def report(folder: Path) -> None:
    """Rebuild FOLDER's figures, claims.json, summary.md and report.html from its files alone."""
    from bnlab.report import build_report

    path = _user_input(lambda: build_report(folder))
    click.echo(f"report: {path}")


class _NormsOption(click.Option):
    """``--norms``, whose help lists the kinds of bnlab.nn.VARIANTS: read when the help is shown
    (importing bnlab.nn, and so torch, only then)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from bnlab.nn import NORM_KINDS

        self.help = (
            f"Comma-separated norm kinds swapped in by convert_norm: {', '.join(NORM_KINDS)}."
        )
        return super().get_help_record(ctx)


@click.command()
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="FILE.py:FACTORY, a function that returns a torch.nn.Module with normalization layers.",
)
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help=f"{_DATA_HELP} | FILE.py:FACTORY (a function returning your (train, test) Datasets "
    "or DataLoaders)",
)
@click.option(
    "--norms",
    cls=_NormsOption,
    default="none,bn",
    show_default=True,
)
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/measure"),
    show_default=True,
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def measure(
    model_spec: str,
    data: str,
    norms: str,
    steps: int,
    seeds: int,
    lr: float,
    out: Path,
    device: str,
) -> None:
    """Run the study's probes and comparison on your own model, one run per norm kind and seed."""
    from bnlab.report import build_report
    from bnlab.studies import Study, measure_study, run_study
    from bnlab.studies.run import check_data, write_manifest
    from bnlab.studies.user_model import parse_norms, user_model_of

    def prepare() -> Study:
        _check_device(device)
        study = measure_study(
            model_spec, data, parse_norms(norms), steps=steps, seeds=seeds, lr=lr, device=device
        )
        with user_model_of(study):
            check_data(study)
            write_manifest(study, out)
        return study

    study = _user_input(prepare)
    run_study(study, out)
    path = build_report(out)
    click.echo(f"report: {path}")
