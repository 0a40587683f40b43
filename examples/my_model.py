"""An example model for ``bnlab measure``: any function returning a torch.nn.Module works.

    bnlab measure --model examples/my_model.py:small_cnn --data digits --norms none,bn,l1

The model must contain normalization layers (here torch.nn.BatchNorm2d): ``bnlab measure``
swaps them for each kind of ``--norms`` with ``bnlab.nn.convert_norm`` ("none" removes them).
"""

from torch import nn


def small_cnn() -> nn.Module:
    """A two-block CNN for 8x8 single-channel images (scikit-learn digits), 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 24, 3, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(24 * 2 * 2, 10),
    )
