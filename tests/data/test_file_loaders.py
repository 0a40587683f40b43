"""CIFAR-10 and MNIST loaders on small files in the real formats, and their error messages."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import DataFileError, load_cifar10, load_dataset, load_mnist
from data.data_files import (
    CIFAR_NAMES,
    cifar_batch_bytes,
    idx_bytes,
    write_cifar_folder,
    write_cifar_tarball,
    write_mnist,
)


def _expected_cifar(n: int) -> tuple[np.ndarray, np.ndarray]:
    batches = [pickle.loads(cifar_batch_bytes(n, i, legacy_numpy=False)) for i in range(6)]
    data = [b[b"data"].reshape(-1, 3, 32, 32) / 255.0 for b in batches]
    labels = [np.array(b[b"labels"]) for b in batches]
    return np.concatenate(data[:5]), np.concatenate(labels[:5])


def test_cifar_from_the_extracted_folder_and_its_parent(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)
    x, y = _expected_cifar(4)
    for path in (folder, tmp_path):
        data = load_cifar10(path)
        assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
        np.testing.assert_allclose(data.x_train.numpy(), x, rtol=1e-6)
        np.testing.assert_array_equal(data.y_train.numpy(), y)
        assert data.num_outputs == 10 and data.task == "classification"


def test_cifar_from_the_tarball_equals_the_folder(tmp_path: Path) -> None:
    tarball = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    folder = write_cifar_folder(tmp_path / "x")
    a, b = load_dataset(f"cifar10:{tarball}"), load_cifar10(folder)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_cifar_truncated_tarball_names_the_file(tmp_path: Path) -> None:
    tarball = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    raw = tarball.read_bytes()
    tarball.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFileError, match=r"cifar-10-python\.tar\.gz is truncated"):
        load_cifar10(tarball)


def test_cifar_missing_batch_names_it(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataFileError, match="data_batch_3 is missing"):
        load_cifar10(folder)
    members = {name: cifar_batch_bytes(2, 0) for name in CIFAR_NAMES if name != "test_batch"}
    tarball = write_cifar_tarball(tmp_path / "c.tar.gz", members=members)
    with pytest.raises(DataFileError, match="no member cifar-10-batches-py/test_batch"):
        load_cifar10(tarball)


def test_cifar_corrupt_or_foreign_batches_name_the_file(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 3])
    with pytest.raises(DataFileError, match=r"data_batch_2 is truncated or not a pickle"):
        load_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}))
    with pytest.raises(DataFileError, match=r"data_batch_2 holds .*expected a pickled dict"):
        load_cifar10(folder)
    wrong = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(wrong, protocol=2))
    with pytest.raises(DataFileError, match=r"data_batch_2 has data of shape \(2, 100\)"):
        load_cifar10(folder)


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataFileError, match=r"refusing to load builtins\.print"):
        load_cifar10(folder)


def test_cifar_missing_path_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"does not exist; expected cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path / "nope.tar.gz")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_plain_or_gzipped(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    expected = arrays["train-images-idx3-ubyte"][:, None] / 255.0
    np.testing.assert_allclose(data.x_train.numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_wrong_magic_names_the_file_and_the_number(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, gz=False)
    # labels where images belong: the magic number says so
    labels = idx_bytes(arrays["train-labels-idx1-ubyte"], 2049)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(
        DataFileError, match=r"train-images-idx3-ubyte starts with magic number 2049; expected 2051"
    ):
        load_mnist(tmp_path)


def test_mnist_truncated_files_are_reported(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(DataFileError, match=r"t10k-images-idx3-ubyte holds .* \(truncated\?\)"):
        load_mnist(tmp_path)
    path.write_bytes(raw[:10])
    with pytest.raises(DataFileError, match="shorter than the 16-byte idx header"):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip_is_reported(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.compress(b"\x00" * 50000)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFileError, match=r"train-labels-idx1-ubyte\.gz .*truncated gzip"):
        load_mnist(tmp_path)


def test_mnist_missing_file_and_label_mismatch(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataFileError, match=r"t10k-labels-idx1-ubyte \(or .*\.gz\) is missing"):
        load_mnist(tmp_path)
    short = idx_bytes(arrays["t10k-labels-idx1-ubyte"][:2], 2049)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(short)
    with pytest.raises(DataFileError, match="3 test images and 2 labels"):
        load_mnist(tmp_path)
    with pytest.raises(DataFileError, match="is not a folder"):
        load_mnist(tmp_path / "missing")
