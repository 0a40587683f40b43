"""`bnlab bench hessian`'s pieces: the clustered case's truth, the HVP counter, the cap search,
and every tool's adapter on the clustered case (skipped where a tool is not installed)."""

from __future__ import annotations

import pytest
import torch

from bnlab import landscape
from bnlab.bench import curvature_tools as bench


def test_clustered_case_has_the_chosen_clustered_top():
    case = bench.clustered_case(seed=0, dim=40)
    assert case.truth == pytest.approx([1.0, 0.97, 0.95, 0.93, 0.91], rel=1e-5)
    found = landscape.top_eigenvalues(
        case.model.double(), case.loss_fn, (case.batch[0].double(), case.batch[1].double()),
        k=5, tol=1e-10, mode="eval",
    )  # fmt: skip
    assert found.eigenvalues == pytest.approx(case.truth, rel=1e-5)


def test_counting_counts_calls_and_puts_the_function_back():
    class Owner:
        def twice(self, x):
            return 2 * x

    with bench.counting(Owner, "twice") as count:
        assert Owner().twice(3) == 6 and Owner().twice(1) == 2
    assert count == [2]
    assert Owner.twice.__name__ == "twice"


def test_fewest_finds_the_smallest_passing_cap():
    calls = []

    def solve(cap):
        calls.append(cap)
        return bench.Attempt([float(cap)], cap, 0.0)

    best = bench._fewest(solve, lambda a: a.hvps >= 13, low=1)
    assert best is not None and best.hvps == 13
    assert len(calls) <= 10
    assert bench._fewest(solve, lambda a: False, low=1) is None


@pytest.mark.parametrize("tool", bench.TOOLS)
def test_each_tool_finds_the_clustered_top_and_its_hvps_are_counted(tool):
    needs = {
        "pyhessian": "pyhessian",
        "eigenthings": "hessian_eigenthings",
        "curvlinops": "curvlinops",
    }
    if tool in needs:
        pytest.importorskip(needs[tool])
    torch.manual_seed(0)
    case = bench.clustered_case(seed=0, dim=40)
    result = bench.compare_eigenvalues(tool, case, k=1, tol=1e-3, seed=0)
    assert result.hvps_to_tol is not None and result.hvps_to_tol >= 2
    assert result.own_rule_hvps is not None and result.own_rule_hvps >= 1
