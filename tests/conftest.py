"""Shared test settings: hypothesis profiles sized for a 2-core CI machine."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores run two pytest workers: one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)


@pytest.fixture
def two_threads():
    """torch (and so the kernels) on two threads for the test; the suite runs on one."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's pool has one thread on this machine")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
