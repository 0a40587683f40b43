"""``bnlab compile``: build the native glue and compile the CPU kernels ahead of first use."""

from __future__ import annotations

import click


@click.command("compile")
@click.option(
    "--dtype",
    "dtypes",
    type=click.Choice(["float32", "float64"]),
    multiple=True,
    help="Dtypes to compile (repeatable)  [default: float32]",
)
@click.option(
    "--parallel/--serial-only",
    default=False,
    show_default=True,
    help="Also the thread-pool builds (what a process with several torch threads runs on "
    "large inputs; about three times a serial build's compile time).",
)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Worker processes."
)
def compile_kernels(dtypes: tuple[str, ...], parallel: bool, jobs: int) -> None:
    """Build the native glue and compile the CPU norm kernels into numba's disk cache, so that
    no later process compiles them (``make install`` runs this). Cached entries only load."""
    from bnlab.functional.kernels.prepare import entries_for, prepare

    todo = entries_for(dtypes or ("float32",), (False, True) if parallel else (False,))
    click.echo(f"compiling {len(todo)} kernel entries in {jobs} processes", err=True)
    done = prepare(todo, jobs)
    for name, seconds in done.entries.items():
        click.echo(f"{name:34s} {seconds:6.1f} s", err=True)
    click.echo(f"native glue: {done.glue}; {done.seconds:.1f} s wall", err=True)
