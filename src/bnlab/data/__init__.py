"""Datasets, from embedded sources or local files; nothing is ever downloaded.

``load_dataset(spec)`` is the entry point: ``digits`` (default), ``cancer``, ``mouse``,
``gaussian``, ``cifar10:PATH``, ``mnist:PATH``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from bnlab.data import embedded
from bnlab.data.dataset import Dataset, Task, from_arrays, split
from bnlab.data.files import DataFileError, load_cifar10, load_mnist

EMBEDDED: dict[str, Callable[..., Dataset]] = {
    "digits": embedded.digits,
    "cancer": embedded.cancer,
    "mouse": embedded.mouse,
    "gaussian": embedded.gaussian,
}
FROM_FILES: dict[str, Callable[..., Dataset]] = {"cifar10": load_cifar10, "mnist": load_mnist}
DATASETS: tuple[str, ...] = (*EMBEDDED, *(f"{name}:PATH" for name in FROM_FILES))
SPLIT_OPTIONS = ("seed", "test_fraction")  # given by load_dataset itself


def dataset_name(spec: str) -> str:
    """The name part of a spec (``"mnist:/data"`` -> ``"mnist"``); ValueError if unknown."""
    name, _, path = spec.partition(":")
    if name in EMBEDDED and not path:
        return name
    if name in FROM_FILES:
        if not path:
            raise ValueError(f"dataset {name!r} needs a path: {name}:PATH")
        return name
    raise ValueError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASETS)}")


def dataset_options(spec: str) -> tuple[str, ...]:
    """The generator options ``load_dataset(spec, **options)`` accepts (none for files)."""
    name = dataset_name(spec)
    if name in FROM_FILES:
        return ()
    parameters = inspect.signature(EMBEDDED[name]).parameters
    return tuple(p for p in parameters if p not in SPLIT_OPTIONS)


def load_dataset(
    spec: str = "digits",
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = False,
    **options: Any,
) -> Dataset:
    """Load the dataset ``spec``: ``digits``, ``cancer``, ``mouse``, ``gaussian`` (split into
    train/test by ``seed`` and ``test_fraction``), or ``cifar10:PATH`` / ``mnist:PATH`` (local
    files, their official split). ``standardize`` scales inputs by the training set's mean and
    std. ``options`` go to the generator (``n_samples``, ``input_dim``, ``output_dim``, ``noise``
    for gaussian; ``n_samples`` for mouse).

    Raises ValueError for an unknown spec or option (listing the known ones) and
    DataFileError for a missing or damaged file.
    """
    name = dataset_name(spec)
    if name in FROM_FILES:
        if options:
            raise ValueError(f"dataset {name!r} takes no options, got {', '.join(options)}")
        dataset = FROM_FILES[name](spec.partition(":")[2])
    else:
        builder = EMBEDDED[name]
        allowed = dataset_options(spec)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"dataset {name!r} has no option {unknown[0]!r}; "
                f"its options: {', '.join(allowed) or 'none'}"
            )
        dataset = builder(seed=seed, test_fraction=test_fraction, **options)
    return dataset.standardized() if standardize else dataset


__all__ = [
    "DATASETS",
    "DataFileError",
    "Dataset",
    "Task",
    "dataset_name",
    "dataset_options",
    "from_arrays",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "split",
]
