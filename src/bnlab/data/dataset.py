"""The in-memory dataset every loader returns, and the seeded split and standardization."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one dataset.

    ``x_*``: float32 (N, *input_shape); ``y_*``: int64 class labels (N,) for classification,
    float32 targets (N, num_outputs) for regression. ``num_outputs``: classes or target size.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    task: Task
    num_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def standardized(self) -> Dataset:
        """Inputs shifted and scaled by the training set's mean and std, per channel for images
        (N, C, H, W) and per feature otherwise; constant features are left unscaled."""
        x = self.x_train.double()
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))

        def scale(t: Tensor) -> Tensor:
            return ((t.double() - mean) / std).float()

        return replace(self, x_train=scale(self.x_train), x_test=scale(self.x_test))


def split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    num_outputs: int,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """A seeded random train/test split of arrays ``x`` (N, ...) and ``y`` (N, ...)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return from_arrays(name, x[train], y[train], x[test], y[test], task, num_outputs)


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    task: Task,
    num_outputs: int,
) -> Dataset:
    """A Dataset from NumPy arrays, with the dtypes of :class:`Dataset`."""
    label_dtype = torch.int64 if task == "classification" else torch.float32
    return Dataset(
        name=name,
        x_train=torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        y_train=torch.as_tensor(np.ascontiguousarray(y_train), dtype=label_dtype),
        x_test=torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        y_test=torch.as_tensor(np.ascontiguousarray(y_test), dtype=label_dtype),
        task=task,
        num_outputs=num_outputs,
    )
