"""Verdicts: how a claim's per-seed numbers become reproduced / not reproduced / inconclusive.

Every rule here is a small pure function of per-seed values, so the report can show the rule's
source next to the numbers it judged. The shared idea: an effect counts as reproduced only when
the seed medians differ in the claimed direction by more than a stated margin *and* the seed
ranges do not overlap; it is not reproduced when the medians point the other way (or are equal
within the margin with separated ranges); anything in between is inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    """The three outcomes a claim can have; never forced, always computed."""

    REPRODUCED = "reproduced"
    NOT_REPRODUCED = "not reproduced"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Spread:
    """One arm's per-seed values with their median and range (NaN values are kept, not hidden)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(tuple(float(v) for v in values))

    @property
    def finite(self) -> tuple[float, ...]:
        return tuple(v for v in self.values if math.isfinite(v))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        v = sorted(self.finite)
        if not v:
            return math.nan
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])

    @property
    def low(self) -> float:
        return min(self.finite, default=math.nan)

    @property
    def high(self) -> float:
        return max(self.finite, default=math.nan)

    def to_dict(self) -> dict[str, object]:
        return {
            "values": [_json_float(v) for v in self.values],
            "median": _json_float(self.median),
            "min": _json_float(self.low),
            "max": _json_float(self.high),
            "n": self.n,
        }

    def describe(self, fmt: str = ".3g") -> str:
        """``median [min, max] (n=k)``, the form the report prints."""
        if not self.finite:
            return f"n/a (n={self.n})"
        return f"{self.median:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}] (n={self.n})"


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def smaller(a: Spread, b: Spread, margin: float) -> Verdict:
    """Is ``a`` smaller than ``b``? Reproduced when median(a) < (1 - margin) * median(b) and
    max(a) < min(b); not reproduced when median(a) >= median(b); otherwise inconclusive.
    Needs two finite values per arm; values must be non-negative (norms, steps, ratios)."""
    if len(a.finite) < 2 or len(b.finite) < 2:
        return Verdict.INCONCLUSIVE
    if a.median < (1.0 - margin) * b.median and a.high < b.low:
        return Verdict.REPRODUCED
    if a.median >= b.median:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def not_smaller(a: Spread, b: Spread, margin: float) -> Verdict:
    """Is ``a`` *not* meaningfully smaller than ``b`` (the paper's "BN does not reduce ICS")?
    Reproduced when median(a) >= (1 - margin) * median(b); not reproduced when ``a`` is smaller
    beyond the margin with separated seed ranges (max(a) < min(b)); otherwise inconclusive."""
    if len(a.finite) < 2 or len(b.finite) < 2:
        return Verdict.INCONCLUSIVE
    if a.median >= (1.0 - margin) * b.median:
        return Verdict.REPRODUCED
    if a.high < b.low:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def at_least(a: Spread, b: Spread, tolerance: float) -> Verdict:
    """Does ``a`` do about as well as or better than ``b`` (higher is better, e.g. accuracy)?
    Reproduced when median(a) >= median(b) - tolerance; not reproduced when median(a) is below
    median(b) - tolerance and max(a) < min(b); otherwise inconclusive."""
    if len(a.finite) < 2 or len(b.finite) < 2:
        return Verdict.INCONCLUSIVE
    if a.median >= b.median - tolerance:
        return Verdict.REPRODUCED
    if a.high < b.low:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def better(a: Spread, b: Spread, margin: float) -> Verdict:
    """Is ``a`` better than ``b`` (higher is better)? Reproduced when median(a) > median(b) +
    margin and min(a) > max(b); not reproduced when median(a) <= median(b); else inconclusive."""
    if len(a.finite) < 2 or len(b.finite) < 2:
        return Verdict.INCONCLUSIVE
    if a.median > b.median + margin and a.low > b.high:
        return Verdict.REPRODUCED
    if a.median <= b.median:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def all_of(verdicts: Sequence[Verdict]) -> Verdict:
    """A claim made of parts: reproduced only if every part is; not reproduced if any part is
    not; otherwise inconclusive."""
    if not verdicts:
        return Verdict.INCONCLUSIVE
    if all(v is Verdict.REPRODUCED for v in verdicts):
        return Verdict.REPRODUCED
    if any(v is Verdict.NOT_REPRODUCED for v in verdicts):
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE
