"""Cold compile time of the numba kernel entries: ``python benchmarks/compile_time.py``.

numba caches compiled kernels on disk, keyed on their source files (the loops on every module
of ``bnlab.functional.kernels.loops``), so a fresh clone pays the compilation once. This script
measures that cost without touching the real cache: it copies ``src/bnlab`` (the loops package
with it) to a temporary directory and, in a child process importing that copy with an empty
``NUMBA_CACHE_DIR``, compiles each entry of :mod:`bnlab.functional.kernels.entries`
(``entries.address(name, parallel, dtype)``) in turn, printing the CPU and wall seconds each
one added. Entries share helpers, so an entry's time depends on what was compiled before it:
the order is the one given (default: every template, parallel then serial, float32 then
float64). CPU seconds are the figure to compare on a busy machine.

    python benchmarks/compile_time.py                      # every entry
    python benchmarks/compile_time.py --dtype float32      # what a float32 model uses
    python benchmarks/compile_time.py forward_planar:1:float32 backward_planar:1:float32
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bnlab.functional.kernels.entries import TEMPLATES

_CHILD = """
import sys, time
from bnlab.functional.kernels import entries
total_cpu = total_wall = 0.0
for spec in sys.argv[1:]:
    name, parallel, dtype = spec.split(":")
    cpu, wall = time.process_time(), time.perf_counter()
    entries.address(name, parallel == "1", dtype)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    total_cpu += cpu
    total_wall += wall
    print(f"{name:16s} {'parallel' if parallel == '1' else 'serial':8s} {dtype:8s} "
          f"cpu {cpu:7.1f} s  wall {wall:7.1f} s", flush=True)
print(f"{'total':34s} cpu {total_cpu:7.1f} s  wall {total_wall:7.1f} s", flush=True)
"""


def _specs(dtypes: list[str], modes: list[str]) -> list[str]:
    return [
        f"{name}:{'1' if mode == 'parallel' else '0'}:{dtype}"
        for name in TEMPLATES
        for mode in modes
        for dtype in dtypes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="*", help="NAME:PARALLEL(0/1):DTYPE, in order")
    parser.add_argument("--dtype", action="append", choices=("float32", "float64"))
    parser.add_argument("--mode", action="append", choices=("parallel", "serial"))
    args = parser.parse_args()
    specs = args.entries or _specs(
        args.dtype or ["float32", "float64"], args.mode or ["parallel", "serial"]
    )
    source = Path(__file__).resolve().parents[1] / "src" / "bnlab"
    with tempfile.TemporaryDirectory(prefix="bnlab-compile-") as tmp:
        shutil.copytree(source, Path(tmp) / "src" / "bnlab", ignore=shutil.ignore_patterns(
            "__pycache__", "*.nbi", "*.nbc"
        ))  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(tmp) / "src")
        env["NUMBA_CACHE_DIR"] = str(Path(tmp) / "numba_cache")
        command = [sys.executable, "-c", _CHILD, *specs]
        raise SystemExit(subprocess.run(command, env=env, cwd=tmp, check=False).returncode)


if __name__ == "__main__":
    main()
