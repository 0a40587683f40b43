"""Benchmarks behind ``bnlab bench`` and ``benchmarks/*.py``: scripts, never timed tests."""
