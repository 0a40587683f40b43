"""The package's layout (issue 15, item 4): one module per name, so a name says which module."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import bnlab

PACKAGE = Path(bnlab.__file__).parent


def _shared_names(root: Path) -> dict[str, list[str]]:
    where = defaultdict(list)
    for path in root.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            where[path.name].append(str(path.relative_to(root)))
    return {name: sorted(paths) for name, paths in where.items() if len(paths) > 1}


def test_no_two_modules_of_the_package_share_a_name():
    assert _shared_names(PACKAGE) == {}


def test_the_check_sees_a_shared_name(tmp_path: Path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
        (tmp_path / folder / "same.py").write_text("")
    assert _shared_names(tmp_path) == {"same.py": ["a/same.py", "b/same.py"]}
