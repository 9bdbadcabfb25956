"""Gauss-Newton and Levenberg-Marquardt on row-sparse residual blocks, batched.

Each step builds the normal equations ``H = J^T J``, ``g = J^T r`` from a list of
:class:`~difficp.nonrigid.model.ResidualBlock` (scatter-adding each row's small ``Q x Q`` block into
the ``(B, P, P)`` system, so a deformation graph costs ``O(N Q^2)``, not ``O(N P^2)``), and solves
``(H + damping) delta = -g`` with a batched dense solve. Every operation is differentiable, so
unrolling the steps gives gradients of the fitted parameters w.r.t. everything the residuals
depend on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difficp.nonrigid.model import ResidualBlock

# Residual blocks at given parameters: (params (B, P), with_jacobian) -> blocks.
BlockFn = Callable[[Tensor, bool], list[ResidualBlock]]


def normal_equations(blocks: list[ResidualBlock], num_params: int) -> tuple[Tensor, Tensor, Tensor]:
    """Assemble ``H = J^T J`` ``(B, P, P)``, ``g = J^T r`` ``(B, P)`` and the cost ``(B,)``."""
    ref = blocks[0].residuals
    B, P = ref.shape[0], num_params
    H = ref.new_zeros(B, P * P)
    g = ref.new_zeros(B, P)
    cost = ref.new_zeros(B)
    for block in blocks:
        r, J, idx = block.residuals, block.jacobian, block.index
        if J is None:
            raise ValueError("normal_equations needs blocks with Jacobians")
        cost = cost + block.cost()
        if idx is None:
            Jf = J.flatten(1, 2)  # (B, R*D, P)
            H = H + (Jf.transpose(1, 2) @ Jf).reshape(B, P * P)
            g = g + (Jf.transpose(1, 2) @ r.reshape(B, -1, 1))[..., 0]
            continue
        H_local = torch.einsum("brdp,brdq->brpq", J, J)  # (B, R, Q, Q)
        g_local = torch.einsum("brdp,brd->brp", J, r)  # (B, R, Q)
        flat = (idx[..., :, None] * P + idx[..., None, :]).reshape(B, -1)
        H = H.scatter_add(1, flat, H_local.reshape(B, -1))
        g = g.scatter_add(1, idx.reshape(B, -1), g_local.reshape(B, -1))
    return H.reshape(B, P, P), g, cost


def total_cost(blocks: list[ResidualBlock]) -> Tensor:
    """``(B,)`` sum of squared residuals of all blocks."""
    return torch.stack([b.cost() for b in blocks]).sum(0)


def damped_solve(H: Tensor, g: Tensor, damping: Tensor | float) -> Tensor:
    """``delta`` ``(B, P)`` solving ``(H + damping * (diag(H) + eps)) delta = -g``.

    Marquardt's scaling by ``diag(H)`` keeps the step invariant to parameter units; the small
    ``eps`` (relative to the mean diagonal) makes parameters no residual constrains (e.g. the
    unobserved side of a graph with no regulariser) stay put instead of making ``H`` singular.
    A pair with an all-zero ``H`` (no residual at all: it lost every correspondence and has no
    regulariser) solves with the identity instead, so its step (0, as ``g = 0``) and the
    gradients through it stay finite.
    """
    diag = H.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1, keepdim=True)
    # The guard must stay a normal number: 1e-9 * tiny would be subnormal, its inverse inf.
    usable = mean.detach() > torch.finfo(H.dtype).tiny * 1e9
    eps = 1e-9 * torch.where(usable, mean, torch.ones_like(mean))
    lam = torch.as_tensor(damping, dtype=H.dtype, device=H.device).reshape(-1, 1)
    A = H + torch.diag_embed(lam * diag + eps)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    A = torch.where(usable[..., None], A, eye)
    return -torch.linalg.solve(A, g[..., None])[..., 0]


def gauss_newton_step(
    blocks_fn: BlockFn, params: Tensor, damping: float = 0.0
) -> tuple[Tensor, Tensor]:
    """One (lightly damped) Gauss-Newton step. Returns new ``params`` ``(B, P)`` and the cost
    ``(B,)`` *before* the step."""
    H, g, cost = normal_equations(blocks_fn(params, True), params.shape[-1])
    return params + damped_solve(H, g, damping), cost


def levenberg_marquardt(
    blocks_fn: BlockFn, params: Tensor, damping: Tensor, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Levenberg-Marquardt trials from ``params`` ``(B, P)``, per pair.

    A trial is accepted (and the damping divided by 10) if it lowers that pair's cost, else it is
    rejected and the damping multiplied by 10; the choice is a ``torch.where``, so the accepted
    steps stay differentiable.

    Args:
        damping: ``(B,)`` current Marquardt damping (carried across ICP iterations).
    Returns:
        ``params`` ``(B, P)``, ``damping`` ``(B,)``, cost ``(B,)`` at the returned params.
    """
    P = params.shape[-1]
    cost = None
    for _ in range(steps):
        H, g, cost = normal_equations(blocks_fn(params, True), P)
        trial = params + damped_solve(H, g, damping)
        trial_cost = total_cost(blocks_fn(trial, False))
        accept = trial_cost.detach() < cost.detach()
        params = torch.where(accept[:, None], trial, params)
        cost = torch.where(accept, trial_cost, cost)
        damping = torch.where(
            accept, (damping / 10).clamp_min(1e-12), (damping * 10).clamp_max(1e12)
        )
    assert cost is not None
    return params, damping, cost


__all__ = [
    "damped_solve",
    "gauss_newton_step",
    "levenberg_marquardt",
    "normal_equations",
    "total_cost",
]
