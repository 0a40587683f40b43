"""What a checked claim is: its statement, the numbers, the verdict and the rule that gave it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnlab.report.verdicts import Spread, Verdict


@dataclass
class ClaimResult:
    """One claim of the study, judged from stored metrics.

    ``numbers`` maps a label ("BN, steps to 90% train accuracy") to a :class:`Spread` over seeds
    or to a plain number; ``rule`` says in words how ``numbers`` became ``verdict``, and
    ``rule_source`` is the code that did it. ``explanation`` is shown whenever the verdict is not
    "reproduced": which parts decided it, computed from the evidence. ``notes`` are computed
    from the evidence too (each part's gap and seed ranges); a hypothesis among them says so
    and names the evidence that would test it. ``settings`` names the settings (and seed
    counts) the claim was judged in.
    """

    id: int
    title: str
    statement: str
    verdict: Verdict
    rule: str
    rule_source: str
    numbers: dict[str, Spread | float | int | str | None] = field(default_factory=dict)
    parts: dict[str, Verdict] = field(default_factory=dict)
    explanation: str = ""
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "statement": self.statement,
            "verdict": self.verdict.value,
            "rule": self.rule,
            "rule_source": self.rule_source,
            "numbers": {
                k: v.to_dict() if isinstance(v, Spread) else v for k, v in self.numbers.items()
            },
            "parts": {k: v.value for k, v in self.parts.items()},
            "explanation": self.explanation if self.verdict is not Verdict.REPRODUCED else "",
            "figures": list(self.figures),
            "notes": list(self.notes),
            "settings": list(self.settings),
        }

    def headline(self) -> str:
        """The first numbers, short, for the claims table."""
        shown = []
        for label, value in list(self.numbers.items())[:2]:
            text = value.describe() if isinstance(value, Spread) else _short(value)
            shown.append(f"{label}: {text}")
        return "; ".join(shown)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def source_of(*rules: Callable[..., Any]) -> str:
    """The source code of the functions that decided a verdict, for the report."""
    return "\n".join(inspect.getsource(rule) for rule in rules)
