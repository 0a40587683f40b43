"""The kernels package's structure (issue 15, item 4): no import circle between the kernels (the
loop modules included), the noise and the torch-op formulas; one table of the entries' C
arguments that native.cpp and the entry templates follow; every loop's docstring points to its
reference function; numba's disk cache of the loops keyed on every loop module."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import bnlab.functional

FUNCTIONAL = Path(bnlab.functional.__file__).parent
MODULES = {
    "bnlab.functional.noise": FUNCTIONAL / "noise.py",
    "bnlab.functional.ops": FUNCTIONAL / "ops.py",
    "bnlab.functional.kernels": FUNCTIONAL / "kernels" / "__init__.py",
    "bnlab.functional.kernels.native": FUNCTIONAL / "kernels" / "native.py",
    "bnlab.functional.kernels.plan": FUNCTIONAL / "kernels" / "plan.py",
    "bnlab.functional.kernels.runtime": FUNCTIONAL / "kernels" / "runtime.py",
    "bnlab.functional.kernels.entries": FUNCTIONAL / "kernels" / "entries.py",
    "bnlab.functional.kernels.loops": FUNCTIONAL / "kernels" / "loops" / "__init__.py",
} | {
    f"bnlab.functional.kernels.loops.{path.stem}": path
    for path in (FUNCTIONAL / "kernels" / "loops").glob("*.py")
    if path.stem != "__init__"
}


def _imports(path: Path) -> set[str]:
    """Every module of MODULES that the file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_kernels_noise_and_ops_import_no_circle():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_C_TYPES = {"void*": "P", "double*": "D", "const double*": "D", "int64_t": "I", "double": "F"}


def _native_pointer_types() -> dict[str, list[str]]:
    """native.cpp's entry function pointer types, per stage, as ARGUMENTS' type codes."""
    source = (FUNCTIONAL / "kernels" / "native.cpp").read_text()
    found = {}
    for stage, params in re.findall(r"using (\w+)Fn = void \(\*\)\(([^)]*)\);", source):
        found[stage.lower()] = [_C_TYPES[" ".join(p.split())] for p in params.split(",")]
    return found


def test_native_glue_calls_the_entries_with_the_table_s_argument_types():
    from bnlab.functional.kernels.entries import ARGUMENTS

    assert _native_pointer_types() == {
        stage: [code for _, code in arguments] for stage, arguments in ARGUMENTS.items()
    }


def test_entry_templates_take_the_table_s_arguments():
    from bnlab.functional.kernels import entries

    for name, (template, _) in entries._TEMPLATES.items():
        names = list(inspect.signature(template).parameters)
        assert names == [n for n, _ in entries.ARGUMENTS[name.split("_")[0]]], name


def _undocumented_kernels(path: Path) -> list[str]:
    """Top-level functions of ``path`` whose docstring neither names an existing function of
    bnlab.functional.reference (``reference.NAME``) nor says it is a helper."""
    from bnlab.functional import reference

    missing = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        doc = ast.get_docstring(node) or ""
        names = re.findall(r"``reference\.(\w+)``", doc)
        if not ("A helper" in doc or (names and all(hasattr(reference, n) for n in names))):
            missing.append(node.name)
    return missing


LOOPS = FUNCTIONAL / "kernels" / "loops"
# Every module of the loops package holds kernels but these two (the re-exports, numba's cache).
KERNEL_MODULES = sorted(
    path for path in LOOPS.glob("*.py") if path.name not in ("__init__.py", "cache_locator.py")
)


def test_every_loop_names_the_reference_function_it_implements():
    passes = {"stats_pass", "normalize_pass", "backward_pass", "noise_draws", "eval_pass"}
    assert passes | {"drivers", "loop_common"} <= {path.stem for path in KERNEL_MODULES}
    for path in KERNEL_MODULES:
        assert _undocumented_kernels(path) == [], path.name


def test_the_docstring_check_sees_a_missing_or_wrong_pointer(tmp_path: Path):
    source = tmp_path / "loops.py"
    source.write_text(
        'def a():\n    """y = x. Implements ``reference.batch_norm_forward``."""\n'
        'def b():\n    """y = x."""\n'
        'def c():\n    """Implements ``reference.no_such_function``."""\n'
        'def d():\n    """A helper: no equation of its own."""\n'
    )
    assert _undocumented_kernels(source) == ["b", "c"]


def test_loop_functions_are_cached_against_every_loop_module():
    """numba's locator for a loop function is the package's (stamp: the digest of every loop
    module) in the folder numba would have chosen; a function elsewhere keeps numba's own."""
    from numba.core import caching

    from bnlab.functional.kernels import entries
    from bnlab.functional.kernels.loops import cache_locator, drivers, noise_draws

    numba_own = [c for c in caching.CacheImpl._locator_classes if c not in cache_locator.LOCATORS]
    for function in (noise_draws._noise_params, drivers.forward_rows_serial):
        py_func = function.py_func
        locator = caching.FunctionCache(py_func)._impl.locator
        assert isinstance(locator, cache_locator.LOCATORS)
        assert locator.get_source_stamp() == cache_locator.source_digest()
        source = inspect.getfile(py_func)
        found = next(filter(None, (c.from_function(py_func, source) for c in numba_own)))
        assert locator.get_cache_path() == found.get_cache_path()
    locator = caching.FunctionCache(entries._key.py_func)._impl.locator
    assert not isinstance(locator, cache_locator.LOCATORS)


_CHILD = """
import json
import numpy as np
from bnlab.functional.kernels.loops import noise_draws
conf = np.array([0.5, 2.0, 0.25, 0.125])
params = noise_draws._noise_params(conf, np.array([1, 2], dtype=np.uint64), 2)
stats = noise_draws._noise_params.stats
print(json.dumps({"rows": params[2:].tolist(), "hits": sum(stats.cache_hits.values())}))
"""


def test_an_edit_of_one_loop_module_recompiles_the_loops_that_read_it(tmp_path: Path):
    """In a copy of the package: _noise_params (noise_draws.py) compiles in the noise rows of
    loop_common.py; after an edit of loop_common.py alone a new process must not load the
    cached machine code (numba's own stamp would: noise_draws.py is unchanged)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import bnlab

    copy = tmp_path / "src" / "bnlab"
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc")
    shutil.copytree(Path(bnlab.__file__).parent, copy, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "src")

    def run() -> dict:
        command = [sys.executable, "-c", _CHILD]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    rows = [[0.25, 0.25], [0.125, 0.125]]  # r_mu, r_sigma per channel
    assert run() == {"rows": rows, "hits": 0}
    assert run() == {"rows": rows, "hits": 1}  # the disk cache serves a second process
    common = copy / "functional" / "kernels" / "loops" / "loop_common.py"
    source = common.read_text()
    line = "_MU_T, _SIGMA_T, _R_MU, _R_SIGMA = range(4)"
    assert line in source
    common.write_text(source.replace(line, "_MU_T, _SIGMA_T, _R_SIGMA, _R_MU = range(4)"))
    assert run() == {"rows": rows[::-1], "hits": 0}
