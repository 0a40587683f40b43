"""The options that choose where a sweep's runs train: ``--backend local|ray`` and Ray's
``--address``, ``--cpus-per-run``, ``--gpus-per-run`` (shared by ``bnlab sweep`` and
``bnlab reproduce``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from bnlab.train.ray_backend import RayBackend

F = TypeVar("F", bound=Callable[..., object])

_OPTIONS = (
    click.option(
        "--backend",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Where runs train: worker processes of this machine, or tasks on a Ray cluster "
        "(needs bnlab[ray]).",
    ),
    click.option(
        "--address",
        default=None,
        help="Ray cluster address (ray start --head prints it); default $RAY_ADDRESS, else Ray "
        "on this machine only.",
    ),
    click.option(
        "--cpus-per-run",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Ray: CPUs each run reserves, and its thread count when the config sets none "
        "[default: 1].",
    ),
    click.option(
        "--gpus-per-run",
        type=click.FloatRange(min=0),
        default=None,
        help="Ray: GPUs each run reserves (fractions share a GPU) [default: 1 with --device "
        "cuda, else 0].",
    ),
)


def backend_options(command: F) -> F:
    """Add the backend options to a click command; it takes them as ``**backend`` and passes
    that to :func:`backend_from_options`."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def backend_from_options(options: Mapping[str, Any], device: str) -> RayBackend | None:
    """None for the local pool, else the RayBackend ``options`` (backend, address,
    cpus_per_run, gpus_per_run) describe for runs on ``device``. A Ray option without
    ``--backend ray``, ``--backend ray`` without Ray installed, or an ``--address`` where no
    cluster answers, prints one ``error:`` line and exits with status 2. Connects to Ray."""
    ray_only = {f"--{k.replace('_', '-')}": v for k, v in options.items() if k != "backend"}
    if options["backend"] == "local":
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            _fail(f"{given[0]} needs --backend ray")
        return None
    from bnlab.train.ray_backend import RayBackend, RayConnectError, RayUnavailableError

    gpus = options["gpus_per_run"]
    backend = RayBackend(
        address=options["address"],
        cpus_per_run=options["cpus_per_run"] or 1.0,
        gpus_per_run=float(device.startswith("cuda")) if gpus is None else gpus,
    )
    try:
        backend.connect()
    except (RayUnavailableError, RayConnectError) as error:
        _fail(str(error))
    return backend


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)
