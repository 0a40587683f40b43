"""The study report: claim verdicts from stored metrics, figures, and the self-contained HTML.

Reads only the study folder's files, so ``bnlab report DIR`` rebuilds everything without
training: ``build_report(folder)`` writes ``figures/*.png``, ``claims.json``, ``summary.md`` and
``report.html`` (last).
"""

from bnlab.report.build import build_report
from bnlab.report.claim import ClaimResult
from bnlab.report.evidence import StudyFolderError, load_study
from bnlab.report.verdicts import Spread, Verdict

__all__ = ["ClaimResult", "Spread", "StudyFolderError", "Verdict", "build_report", "load_study"]
