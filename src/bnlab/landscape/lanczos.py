"""The Lanczos iteration with full reorthogonalization, on any symmetric operator v -> A v.

Lanczos builds an orthonormal basis Q_j of the Krylov space span{v, A v, ..., A^{j-1} v} and
the tridiagonal T_j = Q_j^T A Q_j (diagonal alphas, off-diagonal betas). The eigenpairs
(theta, s) of T_j give Ritz pairs (theta, Q_j s) with ||A Q_j s - theta Q_j s|| = beta_j |s_j|
(exact while Q_j stays orthonormal, which full reorthogonalization keeps in floating point).
Used for the top eigenvalues (:func:`top_eigenpairs`) and for stochastic Lanczos quadrature
(:func:`quadrature`: nodes theta_i and weights s_{1,i}^2 with sum_i w_i f(theta_i) ~ v^T f(A) v,
exact for polynomials f of degree < 2j).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


@dataclass
class LanczosState:
    basis: list[Tensor]
    alphas: list[float]
    betas: list[float]
    """betas[j] couples basis[j] and basis[j + 1]; a 0 marks a restart after breakdown."""
    residual_norm: float
    """beta after the last step: ||r_j||, the size of the part of A q_j outside the basis."""

    def tridiagonal(self) -> Tensor:
        j = len(self.alphas)
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if j > 1:
            off = torch.tensor(self.betas[: j - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t


def _orthogonalize(w: Tensor, basis: list[Tensor]) -> Tensor:
    q = torch.stack(basis)
    for _ in range(2):  # twice is enough (Kahan, Parlett)
        w = w - q.T @ (q @ w)
    return w


def lanczos_steps(
    matvec: Operator,
    start: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    after_step: Callable[[LanczosState], bool] | None = None,
    restart: bool = True,
) -> LanczosState:
    """Run up to ``steps`` Lanczos steps from ``start``; ``after_step(state)`` returning True stops.

    On breakdown (the Krylov space is invariant) the iteration stops if ``restart`` is False;
    otherwise it continues from a fresh random vector orthogonal to the basis, with a zero
    coupling, until ``steps`` or the dimension (a single start vector sees each eigenvalue once;
    the restart finds the other copies of a repeated one, should the space run out first).
    """
    dim = start.numel()
    q = start / torch.linalg.vector_norm(start)
    state = LanczosState([], [], [], 0.0)
    beta_prev = 0.0
    for _ in range(min(steps, dim)):
        state.basis.append(q)
        w = matvec(q)
        alpha = float(torch.dot(q, w))
        w = w - alpha * q
        if len(state.basis) > 1:
            w = w - beta_prev * state.basis[-2]
        w = _orthogonalize(w, state.basis)
        beta = float(torch.linalg.vector_norm(w))
        state.alphas.append(alpha)
        state.residual_norm = beta
        scale = max(abs(a) for a in state.alphas) + max(state.betas, default=0.0)
        broke_down = beta <= 1e-12 * max(scale, 1e-300)
        if broke_down:
            state.residual_norm = 0.0
        if len(state.basis) == dim or (broke_down and not restart):
            break
        # At a breakdown, eigenvalues outside the Krylov space are still unseen: go on.
        if not broke_down and after_step is not None and after_step(state):
            break
        if broke_down:
            fresh = torch.randn(dim, dtype=start.dtype, device=start.device, generator=generator)
            w = _orthogonalize(fresh, state.basis)
            beta_prev = 0.0
            q = w / torch.linalg.vector_norm(w)
        else:
            beta_prev = beta
            q = w / beta
        state.betas.append(beta_prev)
    return state


@dataclass
class TopEigenpairs:
    eigenvalues: list[float]
    eigenvectors: Tensor
    """(dim, k), unit columns."""
    residuals: list[float]
    iterations: int
    converged: bool


def _ritz(state: LanczosState, k: int, which: str) -> tuple[Tensor, Tensor, Tensor]:
    theta, s = torch.linalg.eigh(state.tridiagonal())
    order = torch.argsort(theta, descending=which == "largest")[:k]
    residuals = state.residual_norm * s[-1, order].abs()
    return theta[order], s[:, order], residuals


def top_eigenpairs(
    matvec: Operator,
    start: Tensor,
    k: int,
    *,
    tol: float,
    max_iterations: int,
    which: str = "largest",
    generator: torch.Generator | None = None,
) -> TopEigenpairs:
    """The k largest (or smallest) eigenpairs of a symmetric operator, stopping once every Ritz
    residual is at most ``tol * |theta|`` (or after ``max_iterations`` steps)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f'which must be "largest" or "smallest", got {which!r}')

    def converged(state: LanczosState) -> bool:
        if len(state.alphas) < k:
            return False
        theta, _, residuals = _ritz(state, k, which)
        return bool((residuals <= tol * theta.abs()).all())

    state = lanczos_steps(matvec, start, max_iterations, generator=generator, after_step=converged)
    theta, s, residuals = _ritz(state, k, which)
    basis = torch.stack(state.basis, dim=1)
    vectors = basis @ s.to(basis.dtype)
    return TopEigenpairs(
        eigenvalues=[float(t) for t in theta],
        eigenvectors=vectors,
        residuals=[float(r) for r in residuals],
        iterations=len(state.alphas),
        converged=bool((residuals <= tol * theta.abs()).all()),
    )


def quadrature(
    matvec: Operator, start: Tensor, steps: int, *, generator: torch.Generator | None = None
) -> tuple[list[float], list[float], int]:
    """Gauss quadrature nodes and weights of the spectral measure of A seen from ``start``
    (weights sum to 1); returns ``(nodes, weights, steps taken)``."""
    state = lanczos_steps(matvec, start, steps, generator=generator, restart=False)
    theta, s = torch.linalg.eigh(state.tridiagonal())
    weights = s[0, :] ** 2
    return [float(t) for t in theta], [float(w) for w in weights], len(state.alphas)
