"""The verdict rules on hand-made seed values: each outcome is reachable and none is forced."""

from __future__ import annotations

import math

from bnlab.report.verdicts import Spread, Verdict, all_of, at_least, better, not_smaller, smaller

S = Spread.of


def test_smaller_needs_separated_seed_ranges_and_the_margin() -> None:
    assert smaller(S([1, 2]), S([5, 6]), margin=0.1) is Verdict.REPRODUCED
    assert smaller(S([1, 5.5]), S([5, 6]), margin=0.1) is Verdict.INCONCLUSIVE  # ranges overlap
    assert smaller(S([5.2, 5.3]), S([5.4, 5.5]), margin=0.1) is Verdict.INCONCLUSIVE  # < margin
    assert smaller(S([6, 7]), S([5, 6]), margin=0.1) is Verdict.NOT_REPRODUCED
    assert smaller(S([1]), S([5]), margin=0.1) is Verdict.INCONCLUSIVE  # one seed: no spread


def test_not_smaller_is_the_ics_rule() -> None:
    assert not_smaller(S([4, 6]), S([5, 6]), margin=0.2) is Verdict.REPRODUCED
    assert not_smaller(S([1, 2]), S([5, 6]), margin=0.2) is Verdict.NOT_REPRODUCED
    assert not_smaller(S([1, 5.5]), S([5, 6]), margin=0.2) is Verdict.INCONCLUSIVE


def test_at_least_and_better_for_accuracies() -> None:
    assert at_least(S([0.93, 0.95]), S([0.95, 0.96]), tolerance=0.02) is Verdict.REPRODUCED
    assert at_least(S([0.5, 0.6]), S([0.9, 0.95]), tolerance=0.02) is Verdict.NOT_REPRODUCED
    assert better(S([0.9, 0.95]), S([0.5, 0.6]), margin=0.01) is Verdict.REPRODUCED
    assert better(S([0.5, 0.6]), S([0.9, 0.95]), margin=0.01) is Verdict.NOT_REPRODUCED
    assert better(S([0.55, 0.99]), S([0.6, 0.9]), margin=0.01) is Verdict.INCONCLUSIVE


def test_non_finite_seeds_are_reported_but_not_counted() -> None:
    spread = S([1.0, math.nan, 3.0])
    assert spread.n == 3 and spread.median == 2.0
    assert spread.to_dict()["values"] == [1.0, None, 3.0]
    assert "n=3" in spread.describe()


def test_all_of_combines_parts() -> None:
    r, n, i = Verdict.REPRODUCED, Verdict.NOT_REPRODUCED, Verdict.INCONCLUSIVE
    assert all_of([r, r]) is r
    assert all_of([r, i]) is i
    assert all_of([r, i, n]) is n
    assert all_of([]) is i
