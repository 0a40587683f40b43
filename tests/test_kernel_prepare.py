"""``bnlab compile`` / :func:`bnlab.functional.kernels.prepare.prepare`: the kernel entries
compiled ahead of first use land in numba's disk cache, where a later process loads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.functional.kernels.prepare import entries_for, prepare


def test_entries_cover_every_template_once_per_dtype_and_build_slowest_first() -> None:
    todo = entries_for(["float32", "float64"], [False, True])
    assert len(todo) == len(set(todo)) == 2 * 2 * 6
    assert {e.name for e in todo} == {
        f"{s}_{lay}" for s in ("forward", "backward", "eval") for lay in ("planar", "rows")
    }
    first_eval = next(i for i, e in enumerate(todo) if e.name.startswith("eval"))
    assert all(e.name.startswith("eval") for e in todo[first_eval:])
    assert todo[0].parallel  # parallel builds take about three times longer


def test_a_bad_dtype_or_job_count_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match="kernel dtype must be one of float32, float64, got 'float16'"
    ):
        entries_for(["float16"], [False])
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        prepare([], 0)
    result = CliRunner().invoke(main, ["compile", "--dtype", "float16"])
    assert result.exit_code == 2 and "float16" in result.output


_LOAD_AND_COUNT = """
from bnlab.functional.kernels import entries
entries.address("eval_rows", False, "float64")
print(entries._compiled[("eval_rows", False, "float64")].cache_hits)
"""


def test_a_prepared_entry_is_in_the_disk_cache_and_a_later_process_only_loads_it(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    code = (
        "from bnlab.functional.kernels.prepare import Entry, prepare\n"
        "done = prepare([Entry('eval_rows', False, 'float64')], 1, glue=False)\n"
        "print(sorted(done.entries), done.glue)\n"
    )
    made = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert made.stdout.split("\n")[0] == "['eval_rows serial float64'] not asked"
    assert any(
        f.name.startswith("entries.eval_rows_serial_entry")
        for f in (tmp_path / "cache").rglob("*.nbi")
    )
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_COUNT], env=env, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "1"  # one cache hit: the later process compiled nothing
