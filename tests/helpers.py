"""Small comparison helpers for the tests (float64 references, relative errors)."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """max |actual - expected| / max(|expected|, 1): the relative error the issue's bounds use."""
    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    e = expected.detach().double().cpu().numpy() if isinstance(expected, torch.Tensor) else expected
    a = np.asarray(a, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1.0))


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
