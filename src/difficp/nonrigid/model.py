"""The deformation-model interface of non-rigid ICP, and autograd Jacobian helpers.

A :class:`DeformationModel` is any differentiable map ``params (B, P) -> points (B, N, 3)`` (the
deformed source), plus optional regularisers written as extra least-squares residuals and an
initial parameter value. Non-rigid ICP minimises

    sum_i w_i |r_i(x_i(params))|^2  +  sum_blocks |reg(params)|^2

by Gauss-Newton / Levenberg-Marquardt (:mod:`difficp.solvers`), so a model only has to say
how its points (and regularisers) depend on the parameters; Jacobians come from autograd.

Jacobians are stored *sparsely by rows*: a :class:`ResidualBlock` holds, for each of its ``R`` rows
(a point, a graph node, a graph edge ...), the derivative of that row's ``D`` residuals with respect
to the ``Q`` parameters it depends on, and which parameters those are (``index``). A dense model
(e.g. rigid, where every point depends on all 6 parameters) has ``Q = P`` and ``index=None``; an
embedded deformation graph, where a point depends on only ``k`` nodes, has ``Q = 12 k << P``. The
normal equations are then assembled by scatter-adding ``R`` small ``Q x Q`` blocks.

Convention: Jacobians are ``(B, R, D, Q)``: batch, row, residual component, local parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from torch.func import jvp, vmap

from difficp.solvers import ResidualBlock


def rowwise_jacobian(
    fn: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Jacobian of a *row-independent* function by forward-mode autograd.

    ``fn`` maps ``x`` ``(*rows, Q)`` to ``(*rows, D)`` where output row ``i`` depends only on input
    row ``i`` (batch elements, or the points of a deformation graph with their gathered node
    parameters). Then one forward-mode pass with the same unit tangent ``e_q`` in every row gives
    column ``q`` of every row's Jacobian at once, so ``Q`` passes (vectorised with ``vmap``) give
    them all: cost ``Q`` forward evaluations, not ``rows * Q``.

    The result is differentiable (backward-over-forward) in ``x`` and in whatever ``fn`` closes
    over, which is what unrolled Gauss-Newton needs.

    Returns:
        ``(*rows, D, Q)``.
    """
    Q = x.shape[-1]
    eye = torch.eye(Q, dtype=x.dtype, device=x.device)
    tangents = eye.reshape(Q, *([1] * (x.dim() - 1)), Q).expand(Q, *x.shape)

    def column(tangent: Tensor) -> Tensor:
        return jvp(fn, (x,), (tangent,))[1]

    cols = vmap(column, chunk_size=chunk_size)(tangents)  # (Q, *rows, D)
    return cols.movedim(0, -1)


def as_batched_points(name: str, points: Tensor) -> tuple[Tensor, bool]:
    """``(N, 3)`` or ``(B, N, 3)`` -> ``(B, N, 3)`` and whether the input was unbatched."""
    if not isinstance(points, Tensor) or not points.is_floating_point():
        raise ValueError(f"{name} must be a float torch.Tensor of shape (N, 3) or (B, N, 3)")
    if points.dim() not in (2, 3) or points.shape[-1] != 3 or points.shape[-2] == 0:
        raise ValueError(f"{name} must have shape (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    if not torch.isfinite(points.detach()).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return (points[None], True) if points.dim() == 2 else (points, False)


class DeformationModel(ABC):
    """A differentiable deformation of a source point set: ``params (B, P) -> points (B, N, 3)``.

    Subclasses set ``rest_points`` (the source, ``(B, N, 3)``), optionally ``rest_normals`` and
    ``lengths`` (valid counts of a padded batch), and implement :meth:`initial_params` and
    :meth:`deform`. Everything else has a generic autograd default that a model may override to
    exploit its structure (see :class:`~difficp.nonrigid.EmbeddedDeformationGraph`).

    Attributes:
        rest_points: ``(B, N, 3)`` undeformed source points.
        rest_normals: ``(B, N, 3)`` their unit normals, or None.
        lengths: ``(B,)`` valid counts, or None (all valid).
        unbatched: the model was built from a single ``(N, 3)`` cloud (results are squeezed).
    """

    rest_points: Tensor
    rest_normals: Tensor | None = None
    lengths: Tensor | None = None
    unbatched: bool = False

    @property
    @abstractmethod
    def num_params(self) -> int:
        """``P``, the number of parameters per batch element."""

    @abstractmethod
    def initial_params(self) -> Tensor:
        """``(B, P)`` starting value (usually the identity deformation)."""

    @abstractmethod
    def deform(self, params: Tensor) -> Tensor:
        """``(B, P)`` -> ``(B, N, 3)`` deformed points. Must be ``torch.func`` friendly
        (no in-place ops on inputs, no ``.item()``), since Jacobians use ``jvp`` + ``vmap``."""

    def deform_normals(self, params: Tensor) -> Tensor | None:
        """``(B, N, 3)`` unit normals of the deformed points, or None (model has no normals)."""
        return None

    def point_jacobian(self, params: Tensor) -> tuple[Tensor, Tensor | None]:
        """Derivative of the deformed points w.r.t. the parameters.

        Default: dense, by forward-mode autograd over the batch (batch elements are independent).

        Returns:
            ``values`` ``(B, N, 3, Q)`` and ``index`` ``(B, N, Q)`` (None when dense, ``Q = P``).
        """
        B, N = self.rest_points.shape[:2]
        jac = rowwise_jacobian(lambda p: self.deform(p).reshape(p.shape[0], N * 3), params)
        return jac.reshape(B, N, 3, -1), None

    def regularizer_residuals(self, params: Tensor) -> Tensor | None:
        """``(B, R)`` extra residuals (weights folded in), or None. Override for a dense
        regulariser; its Jacobian then comes from autograd (see :meth:`regularizers`)."""
        return None

    def regularizers(self, params: Tensor, with_jacobian: bool = True) -> list[ResidualBlock]:
        """Regularisers as residual blocks. Default: the dense :meth:`regularizer_residuals`."""
        res = self.regularizer_residuals(params)
        if res is None:
            return []
        jac = None
        if with_jacobian:
            # not None here: res above was not
            residuals = cast(Callable[[Tensor], Tensor], self.regularizer_residuals)
            jac = rowwise_jacobian(residuals, params)[:, None]  # (B, 1, R, P)
        return [ResidualBlock(res[:, None], jac, None)]

    def valid_mask(self) -> Tensor:
        """``(B, N)`` bool of real (non-padding) points."""
        B, N = self.rest_points.shape[:2]
        ar = torch.arange(N, device=self.rest_points.device)
        if self.lengths is None:
            return torch.ones(B, N, dtype=torch.bool, device=self.rest_points.device)
        return ar[None] < self.lengths[:, None]


__all__ = [
    "DeformationModel",
    "ResidualBlock",
    "as_batched_points",
    "rowwise_jacobian",
]
