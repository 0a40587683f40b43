"""Bad input: one `error:` line naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlab.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_model.py"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["reproduce", "--data", "imagenet"], "unknown dataset 'imagenet'"),
        (["reproduce", "--data", "cifar10:/no/such/folder"], "/no/such/folder"),
        (["reproduce", "--data", "gaussian"], "needs class labels"),
        (["reproduce", "--protocol", "paper"], "needs --data cifar10:PATH"),
        (["reproduce", "--protocol", "paper", "--data", "cifar10:/no/such"], "/no/such"),
        (["measure", "--model", "no_such_file.py:f"], "no such file"),
        (["measure", "--model", f"{EXAMPLE}:no_factory"], "no callable 'no_factory'"),
        (["measure", "--model", f"{EXAMPLE}:small_cnn", "--norms", "none,batchnorm"], "batchnorm"),
        (["measure", "--model", f"{EXAMPLE}:small_cnn", "--data", "cancer"], "does not accept"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in result.output
    assert not out.exists()


def test_report_of_a_folder_that_is_not_a_study(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "study.json" in result.output


def test_a_folder_of_another_study_is_refused(tmp_path: Path) -> None:
    from bnlab.studies import santurkar_study
    from bnlab.studies.run import write_manifest

    write_manifest(santurkar_study("digits", quick=True), tmp_path)
    result = CliRunner().invoke(main, ["reproduce", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds a different study" in result.output
    assert not (tmp_path / "runs").exists()


def test_bad_option_value_exits_2() -> None:
    result = CliRunner().invoke(main, ["reproduce", "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.output
