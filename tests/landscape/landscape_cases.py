"""Models whose loss, gradient and Hessian are known, shared by the landscape tests (float64)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import bnlab.nn as bnn


class Quadratic(nn.Module):
    """Outputs its parameters: with :func:`quadratic_loss`, L(w) = 1/2 (w - c)^T A (w - c)."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.parts = nn.ParameterList(
            nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in sizes
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(list(self.parts)).expand(x.shape[0], -1)


def quadratic_loss(a: Tensor):
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        d = outputs[0] - targets[0]
        return 0.5 * d @ a @ d

    return loss


def spd_with_spectrum(eigenvalues: list[float], seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def mlp(seed: int = 0, hidden: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def bn_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), bnn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def classification_batch(n: int = 24, seed: int = 1, features: int = 4, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, dtype=torch.float64, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def full_hessian(model: nn.Module, loss_fn, batch, names=None) -> Tensor:
    """The Hessian w.r.t. the trainable parameters ``names`` (flattened, in order), by
    ``torch.autograd.functional.hessian`` on a fresh copy of the model in its current mode."""
    params = dict(model.named_parameters())
    names = list(names or params)
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_of(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        state = {n: p.detach() for n, p in params.items()}
        state.update(
            {n: part.reshape(params[n].shape) for n, part in zip(names, parts, strict=False)}
        )
        state.update({n: b.clone() for n, b in buffers.items()})
        return loss_fn(torch.func.functional_call(model, state, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss_of, flat0)


def flat_grad(model: nn.Module, loss_fn, batch) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = {n: p for n, p in model.named_parameters()}
    out = torch.func.functional_call(model, {**state, **buffers}, (batch[0],))
    grads = torch.autograd.grad(loss_fn(out, batch[1]), params)
    return torch.cat([g.reshape(-1) for g in grads])
