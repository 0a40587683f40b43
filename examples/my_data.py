"""Example data for ``bnlab measure --data``: any function returning (train, test) works.

    bnlab measure --model examples/my_model.py:small_cnn --data examples/my_data.py:digits_split

Each part is a ``torch.utils.data.Dataset`` or a ``DataLoader`` of ``(input, target)`` pairs;
integer targets make a classification task, float targets a regression.
"""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


def digits_split() -> tuple[TensorDataset, DataLoader]:
    """scikit-learn's digits (embedded, nothing downloaded): 8x8 images in [0, 1], 10 classes;
    the first 1,400 images to train, the rest to test."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    train = TensorDataset(x[:1400], y[:1400])
    test = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=100)
    return train, test
