"""``bnlab train`` and ``bnlab sweep``: parse, call ``bnlab.train``, print.

A bad config prints one line naming the key (``error: optim.lr: must be > 0, got -1``) and
exits with status 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from bnlab.cli.backend import backend_from_options, backend_options

T = TypeVar("T")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    click.echo(f"warning: {message}", err=True)


def _or_exit(call: Callable[[], T]) -> T:
    """Run ``call``, each warning (a repaired run store, a skipped damaged checkpoint) on one
    line; a ConfigError, a dataset file error or a run directory another process holds
    becomes one line and exit 2."""
    from bnlab.data import DataFileError
    from bnlab.train import ConfigError, RunLockedError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return call()
    except (ConfigError, DataFileError, RunLockedError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optim.lr=0.1 (repeatable).",
)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run directory (default: runs/<config name>). An existing run resumes.",
)
@_set_option
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Override device.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Processes (torchrun).")
@click.option("--nnodes", default="1", show_default=True, help="torchrun --nnodes.")
@click.option("--node-rank", type=int, default=None, help="torchrun --node-rank.")
@click.option("--rdzv-endpoint", default=None, help="torchrun --rdzv-endpoint HOST:PORT.")
@click.option("--rdzv-id", default=None, help="torchrun --rdzv-id.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def train(
    config: Path,
    run_dir: Path | None,
    overrides: tuple[str, ...],
    device: str | None,
    nproc: int,
    nnodes: str,
    node_rank: int | None,
    rdzv_endpoint: str | None,
    rdzv_id: str | None,
    progress: bool,
) -> None:
    """Train CONFIG (a TOML file) into a run directory; an interrupted run resumes."""
    from bnlab.train import load_config
    from bnlab.train import train as train_run

    sets = [*overrides, *([f'device="{device}"'] if device else [])]
    loaded = _or_exit(lambda: load_config(config, sets))
    out = run_dir or Path("runs") / config.stem
    distributed = nproc > 1 or nnodes != "1" or rdzv_endpoint is not None
    if distributed:
        from bnlab.train import RunLockedError, lock_holder
        from bnlab.train.distributed import launch, torchrun_command

        holder = lock_holder(out)  # the ranks lock it too; this says so before torchrun starts
        if holder is not None:
            click.echo(f"error: {RunLockedError(out, *holder)}", err=True)
            sys.exit(2)

        command = torchrun_command(
            config,
            out,
            nproc,
            sets,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            rdzv_id=rdzv_id,
            progress=progress,
        )
        code = launch(command)
        if code:
            click.echo(f"error: torchrun exited with code {code}; see {out}", err=True)
            sys.exit(code)
        result: Any = _status_line(out)
    else:
        try:
            result = _or_exit(lambda: train_run(loaded, out, progress=progress))
        except OSError as error:
            _disk_full_exit(error, out)
        result = f"{result.state} at step {result.step}"
    click.echo(f"{out}: {result}")


def _disk_full_exit(error: OSError, run_dir: Path) -> None:
    """A full disk (or quota) ends the run ``failed``: one line, exit 1; anything else raises."""
    from bnlab.train.store import DISK_FULL

    if error.errno not in DISK_FULL:
        raise error
    click.echo(
        f"error: {run_dir} failed ({_status_line(run_dir)}): {error.strerror}: "
        f"{error.filename}; free space and run the same command again to resume",
        err=True,
    )
    sys.exit(1)


def _status_line(run_dir: Path) -> str:
    from bnlab.train import read_status

    status = read_status(run_dir)
    return "no status" if status is None else f"{status['state']} at step {status['step']}"


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sweep directory, one subdirectory per run (default: runs/<config name>).",
)
@click.option("--jobs", "-j", type=int, default=1, show_default=True, help="Worker processes.")
@_set_option
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@backend_options
def sweep(
    config: Path,
    out: Path | None,
    jobs: int,
    overrides: tuple[str, ...],
    progress: bool,
    **backend: Any,
) -> None:
    """Run every point of CONFIG's [sweep.grid]; finished runs are skipped, others resumed."""
    from bnlab.train import load_sweep_config
    from bnlab.train import sweep as run_sweep

    loaded = _or_exit(lambda: load_sweep_config(config, overrides))
    if jobs < 1:
        click.echo(f"error: --jobs must be >= 1, got {jobs}", err=True)
        sys.exit(2)
    ray_backend = backend_from_options(backend, loaded.base.device)
    target = out or Path("runs") / config.stem
    results = run_sweep(loaded, target, jobs=jobs, progress=progress, backend=ray_backend)
    for name, result in results.items():
        line = f"{result.state:9s} step {result.step:6d}  {target / name}"
        click.echo(f"{line}  ({result.reason})" if result.state == "locked" else line)
    if any(r.state in ("failed", "locked") for r in results.values()):
        sys.exit(1)
