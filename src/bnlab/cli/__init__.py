"""The ``bnlab`` command line: a thin shell over the library.

Commands load lazily, so ``bnlab --help`` starts without importing torch. Each command lives in
its own module of this package and is also a library function a notebook can call.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from bnlab import __version__

# command name -> "module:attribute"; a command whose module is absent is not offered.
COMMANDS: dict[str, str] = {
    "bench": "bnlab.cli.bench:bench",
    "compile": "bnlab.cli.kernels:compile_kernels",
    "train": "bnlab.cli.train:train",
    "sweep": "bnlab.cli.train:sweep",
    "reproduce": "bnlab.cli.study:reproduce",
    "report": "bnlab.cli.study:report",
    "measure": "bnlab.cli.study:measure",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def __init__(self, *args: object, lazy: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy or {}

    def _available(self, name: str) -> bool:
        return importlib.util.find_spec(self.lazy[name].split(":")[0]) is not None

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [n for n in self.lazy if self._available(n)]
        return sorted({*super().list_commands(ctx), *lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and self._available(cmd_name):
            module, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="bnlab")
def main() -> None:
    """bnlab: Batch Normalization from first principles, and why it helps optimization."""
