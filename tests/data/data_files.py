"""Writers of small dataset files in the real formats (CIFAR-10 python pickles, MNIST idx)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CIFAR_NAMES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def cifar_batch_bytes(n: int, seed: int, legacy_numpy: bool = True) -> bytes:
    """A CIFAR-10 batch as the python version stores it: a protocol-2 pickle of a dict with
    b'batch_label', b'labels' (a list), b'data' (n x 3072 uint8), b'filenames'. With
    ``legacy_numpy`` the array refers to ``numpy.core.multiarray`` like the original files."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    raw = pickle.dumps(batch, protocol=2)
    if legacy_numpy:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return raw


def write_cifar_folder(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(CIFAR_NAMES):
        (folder / name).write_bytes(cifar_batch_bytes(n, i))
    return folder


def write_cifar_tarball(path: Path, n: int = 4, members: dict[str, bytes] | None = None) -> Path:
    contents = members or {name: cifar_batch_bytes(n, i) for i, name in enumerate(CIFAR_NAMES)}
    with tarfile.open(path, "w:gz") as archive:
        for name, raw in contents.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


MNIST_STEMS = {
    "train-images-idx3-ubyte": ("images", 6),
    "train-labels-idx1-ubyte": ("labels", 6),
    "t10k-images-idx3-ubyte": ("images", 3),
    "t10k-labels-idx1-ubyte": ("labels", 3),
}


def write_mnist(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    """Four idx files of 6 training and 3 test 28x28 images; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, (what, n) in MNIST_STEMS.items():
        if what == "images":
            array = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            raw = idx_bytes(array, 2051)
        else:
            array = rng.integers(0, 10, n, dtype=np.uint8)
            raw = idx_bytes(array, 2049)
        arrays[stem] = array
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays
