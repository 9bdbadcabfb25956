"""Gradients of a converged ICP fixed point by the implicit function theorem.

The forward iterations run without a graph; one differentiable step at the converged value
then carries the implicit derivative, so memory and backward time do not grow with the
iterations. Rigid ICP (:func:`implicit_transform`, on SE(3)) and non-rigid ICP
(:func:`implicit_params`, on a flat parameter vector) share the conventions: a pair without
enough correspondences at its fixed point (lost) keeps its value with a zero gradient, and the
rest of the batch gets exactly the gradient it would get alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difficp.geometry import se3_exp, se3_log
from difficp.solvers import damped_solve

# Singular values of the implicit system ``I - df/dxi`` (see :func:`implicit_transform`) below
# this (absolute, and relative to the largest) are dropped. ``1 - sigma`` is how much of a
# perturbation along that direction one ICP step leaves: below 1e-4 the loop would need more
# than 1e4 iterations to undo it, so the forward pass never resolved that direction (a symmetry
# of the shape, or one the solvers' regularisation pins at ~1e-8 of the trace), and the exact
# inverse would amplify rounding noise by up to 1e16 (measured 6e9-8e10 on a sphere). Well-posed
# systems have sigma of order 0.1-1: their gradients are unchanged.
IMPLICIT_SINGULAR_TOL = 1e-4


def implicit_transform(
    step: Callable[[Tensor], tuple[Tensor, Tensor]], converged_T: Tensor
) -> Tensor:
    """Re-attach gradients to a converged transform by the implicit function theorem.

    With ``T = exp(xi) T*`` and one ICP step ``f(xi, theta) = log(step(exp(xi) T*) T*^-1)`` (6-D,
    per pair), the converged transform is a fixed point ``xi* = f(xi*, theta)`` at ``xi* = 0``.
    Differentiating, ``d xi*/d theta = (I - df/dxi)^-1 df/dtheta``. We build one step's graph
    (``step(T)``: the ``(B, 4, 4)`` update at ``T`` and ``(B,)`` bool, enough correspondences),
    form the ``(B, 6, 6)`` Jacobian ``df/dxi`` with six backward passes, and return
    ``exp(xi) T*`` with ``xi = (I - df/dxi)^+ (f - f.detach())``: its value is exactly ``T*``
    and its gradient is the implicit one. Memory and backward time do not depend on how many
    iterations the forward took.

    ``(I - df/dxi)^+`` is a pseudo-inverse that drops singular values below
    :data:`IMPLICIT_SINGULAR_TOL` (see there): a shape with a symmetry (sphere, plane, line)
    has a continuum of fixed points, and the minimum-norm derivative does not slide along it.
    A pair without enough correspondences at ``T*`` (lost) has no fixed point: it gets a zero
    gradient, and the rest of the batch exactly the gradient it would get alone.
    """
    B = converged_T.shape[0]
    T_star = converged_T.detach()
    with torch.enable_grad():
        xi = torch.zeros(B, 6, dtype=T_star.dtype, device=T_star.device, requires_grad=True)
        update, enough = step(se3_exp(xi) @ T_star)
        # T T*^-1 = exp(xi), so one step moves T* by update @ exp(xi).
        f = se3_log(update @ se3_exp(xi))
        rows = [
            torch.autograd.grad(f[:, k].sum(), xi, retain_graph=True, allow_unused=True)[0]
            for k in range(6)
        ]
        jac = torch.stack([torch.zeros_like(xi) if r is None else r for r in rows], dim=1)
    jac = jac.detach()
    ok = enough & torch.isfinite(jac).flatten(1).all(1)
    eye = torch.eye(6, dtype=jac.dtype, device=jac.device)
    # A lost pair's system is replaced by 0 (pseudo-inverse 0) before the SVD, so nothing it
    # holds (a singular or non-finite Jacobian) can reach the others' solves.
    system = torch.where(ok[:, None, None], eye - jac, torch.zeros_like(jac))
    inverse = torch.linalg.pinv(system, atol=IMPLICIT_SINGULAR_TOL, rtol=IMPLICIT_SINGULAR_TOL)
    # The where (not just the zero inverse) keeps a non-finite f of a lost pair out of the value.
    delta = torch.where(ok[:, None], f - f.detach(), torch.zeros_like(f))
    implicit_xi = (inverse @ delta[..., None])[..., 0]
    return se3_exp(implicit_xi) @ T_star


def implicit_params(
    system: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], params_star: Tensor
) -> Tensor:
    """Re-attach gradients to converged ``(B, P)`` parameters by the implicit function theorem.

    At a converged ``p*`` the gradient ``g(p*, inputs) = J^T r`` vanishes, so
    ``dp*/dinputs = -(dg/dp)^-1 dg/dinputs``. With the Gauss-Newton approximation ``dg/dp ~ H``
    this is the gradient of one step ``p* - H^-1 g(p*, inputs)`` with ``H`` held constant: its
    value is ``p*`` (up to the remaining gradient) and memory does not grow with the iterations.
    (Unlike :func:`implicit_transform` it needs no ``P`` backward passes for ``df/dp``: ``P`` is
    hundreds for a deformation graph.)

    Args:
        system: ``p`` ``(B, P)`` -> the normal equations ``H`` ``(B, P, P)``, ``g`` ``(B, P)``
            at ``p`` (differentiable in the inputs) and ``(B,)`` bool, enough correspondences.
    """
    p = params_star.detach()
    H, g, enough = system(p)
    # A lost pair's H may be all zero: its solve divides by the tiny diagonal guard, and even a
    # zero gradient through it would overflow, so it takes no step and gets none through it.
    return torch.where(enough[:, None], p + damped_solve(H.detach(), g, 0.0), p)
