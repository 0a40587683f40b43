"""The study report: claim verdicts from stored metrics, figures, and the self-contained HTML.

Reads only the run store's files, so ``bnlab report DIR`` rebuilds everything without training.
"""
