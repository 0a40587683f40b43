"""Readers of local dataset files: CIFAR-10 (python pickles) and MNIST (idx). Never downloads.

Every problem with a file becomes a :class:`DataFileError` that names the file and says what
was expected.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bnlab.data.dataset import Dataset, from_arrays

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


class DataFileError(ValueError):
    """A dataset file is missing, truncated or not in the expected format."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays: a dataset file cannot run code.

    The CIFAR-10 batches were pickled by Python 2 against ``numpy.core``, which NumPy 2 calls
    ``numpy._core``; both names are accepted.
    """

    _allowed: ClassVar[set[tuple[str, str]]] = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3's protocol 2 stores bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        canonical = "numpy._core.multiarray" if module == "numpy.core.multiarray" else module
        if (canonical, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if canonical == "numpy._core.multiarray" and not hasattr(np, "_core"):
            canonical = "numpy.core.multiarray"  # pragma: no cover - NumPy 1
        return super().find_class(canonical, name)


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    expected = "a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints in 0..9)"
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # any unpickling failure means a damaged or foreign file
        raise DataFileError(
            f"CIFAR-10: {where} is truncated or not a pickle ({error}); expected {expected}"
        ) from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataFileError(f"CIFAR-10: {where} holds {keys}; expected {expected}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFileError(
            f"CIFAR-10: {where} has data of shape {data.shape} and dtype {data.dtype}; "
            f"expected {expected}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataFileError(
            f"CIFAR-10: {where} has {labels.size} labels for {data.shape[0]} images; "
            f"expected {expected}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_members(path: Path) -> dict[str, bytes]:
    names = (*CIFAR_TRAIN, CIFAR_TEST)
    if path.is_dir():
        folder = path / CIFAR_FOLDER if (path / CIFAR_FOLDER).is_dir() else path
        found = {}
        for name in names:
            file = folder / name
            if not file.is_file():
                raise DataFileError(
                    f"CIFAR-10: {file} is missing; "
                    f"expected the batches {', '.join(names)} in {folder}"
                )
            found[str(file)] = file.read_bytes()
        return found
    if not path.exists():
        raise DataFileError(
            f"CIFAR-10: {path} does not exist; "
            f"expected cifar-10-python.tar.gz or its extracted folder {CIFAR_FOLDER}"
        )
    try:
        with tarfile.open(path, "r:*") as archive:
            found = {}
            for name in names:
                member = f"{CIFAR_FOLDER}/{name}"
                try:
                    handle = archive.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise DataFileError(
                        f"CIFAR-10: {path} has no member {member}; "
                        "expected the python version of CIFAR-10 (cifar-10-python.tar.gz)"
                    )
                found[f"{path}:{member}"] = handle.read()
            return found
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataFileError(
            f"CIFAR-10: {path} is truncated or not a tar archive ({error}); "
            "expected cifar-10-python.tar.gz"
        ) from error


def load_cifar10(path: str | Path) -> Dataset:
    """CIFAR-10 from ``cifar-10-python.tar.gz`` or its extracted folder: images (N, 3, 32, 32) in
    [0, 1], the official 50000/10000 split. Raises DataFileError naming the bad file."""
    members = _read_cifar_members(Path(path))
    batches = [_cifar_batch(raw, where) for where, raw in members.items()]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    x_test, y_test = batches[-1]
    scale = np.float32(1.0 / 255.0)
    return from_arrays(
        "cifar10", x_train * scale, y_train, x_test * scale, y_test, "classification", 10
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    what = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataFileError(
            f"MNIST: {path} cannot be read or is a truncated gzip file ({error}); "
            f"expected an idx {what} file"
        ) from error
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    found = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else None
    if found is not None and found != magic:
        raise DataFileError(
            f"MNIST: {path} starts with magic number {found}; expected {magic} (idx {what})"
        )
    if len(raw) < header:
        raise DataFileError(
            f"MNIST: {path} is {len(raw)} bytes, shorter than the {header}-byte idx header; "
            f"expected an idx {what} file"
        )
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise DataFileError(
            f"MNIST: {path} holds {len(raw) - header} data bytes; "
            f"expected {size} for shape {shape} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFileError(
        f"MNIST: {folder / stem} (or {stem}.gz) is missing; "
        f"expected the four idx files {', '.join(MNIST_FILES.values())}"
    )


def load_mnist(path: str | Path) -> Dataset:
    """MNIST from a folder of the four idx files (gzipped or not): images (N, 1, 28, 28) in
    [0, 1], the official 60000/10000 split. Raises DataFileError naming the bad file."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataFileError(
            f"MNIST: {folder} is not a folder; "
            f"expected a folder with {', '.join(MNIST_FILES.values())}"
        )
    arrays = {}
    for key, stem in MNIST_FILES.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        arrays[key] = _read_idx(_idx_file(folder, stem), magic)
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels) or (labels.size and labels.max() > 9):
            top = labels.max() if labels.size else "-"
            raise DataFileError(
                f"MNIST: {folder} has {len(images)} {part} images and {len(labels)} labels "
                f"(max {top}); expected one label in 0..9 per image"
            )
    scale = np.float32(1.0 / 255.0)
    return from_arrays(
        "mnist",
        arrays["train_images"][:, None] * scale,
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None] * scale,
        arrays["test_labels"].astype(np.int64),
        "classification",
        10,
    )
