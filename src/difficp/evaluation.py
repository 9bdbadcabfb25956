"""How well a given transform registers two clouds, without running ICP: Open3D's
``evaluate_registration`` and ``get_information_matrix_from_point_clouds`` in one batched,
differentiable call.

Use it to score a network's pose estimate or a registration from elsewhere with the numbers ICP
users already know (fitness, inlier RMSE), as a differentiable loss (the inlier RMSE), or to weigh
a pairwise registration in a pose graph (the information matrix).
"""

from __future__ import annotations

from typing import NamedTuple, get_args

import torch
from torch import Tensor

from difficp.config import ICPConfig
from difficp.correspondence import PointTarget, SearchBackend, _gather
from difficp.geometry import skew, transform_points
from difficp.inputs import prepare_problem


class RegistrationEvaluation(NamedTuple):
    """What :func:`evaluate_registration` measured (unbatched input gives unbatched fields).

    Attributes:
        fitness: ``(B,)`` inlier correspondences / source points (Open3D's meaning).
        inlier_rmse: ``(B,)`` root mean squared distance of the inlier pairs (0 without inliers);
            differentiable in the points and the transform.
        correspondences: ``(B, N)`` long: each source point's inlier partner, an index into its
            target cloud; -1 where it has none (padding, or no target point closer than
            ``max_distance``). Open3D's ``correspondence_set`` is ``(i, correspondences[i])``
            for the ``i`` where it is not -1.
        information: ``(B, 6, 6)`` ``sum J^T J`` over the inlier pairs, ``J = [-[q]x, I]`` the
            Jacobian of the point-to-point residual with respect to a small motion
            ``(rotation vector, translation)`` at the partners ``q``: Open3D's
            ``get_information_matrix_from_point_clouds`` (rotation first), the inverse
            covariance of the motion up to the noise variance. Differentiable in the targets.
    """

    fitness: Tensor
    inlier_rmse: Tensor
    correspondences: Tensor
    information: Tensor


def evaluate_registration(
    source: Tensor,
    target: Tensor,
    max_distance: float,
    transform: Tensor | None = None,
    *,
    source_lengths: Tensor | None = None,
    target_lengths: Tensor | None = None,
    search_backend: SearchBackend = "auto",
) -> RegistrationEvaluation:
    """Score ``transform`` as a registration of ``source`` onto ``target``.

    Each source point, moved by ``transform``, is paired with its nearest target point; pairs
    closer than ``max_distance`` are the inliers (as in ICP's fitness and RMSE, and Open3D's
    ``evaluate_registration(source, target, max_distance, transform)``).

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` points, any float dtype / device.
        target: ``(M, 3)`` or ``(B, M, 3)`` points.
        max_distance: the inlier threshold (> 0), in the clouds' units.
        transform: ``(4, 4)`` / ``(B, 4, 4)`` rigid source->target transform (identity).
        source_lengths, target_lengths: ``(B,)`` valid counts of padded batches.
        search_backend: the nearest-neighbour search (:class:`difficp.NeighborIndex`'s
            backends; ``"auto"``: compiled on the CPU, brute force on other devices).

    Returns:
        :class:`RegistrationEvaluation`. Gradients flow from ``inlier_rmse`` into ``source``,
        ``target`` and ``transform``, and from ``information`` into ``target``; which pairs
        are inliers is a selection, not differentiated.

    Raises:
        ValueError: bad input (NaN/inf, empty or mismatched shapes, a non-rigid transform,
            ``max_distance`` not positive), naming the argument.
    """
    if search_backend not in get_args(SearchBackend):
        raise ValueError(
            f"search_backend must be one of {get_args(SearchBackend)}, got {search_backend!r}"
        )
    config = ICPConfig(max_distance=max_distance)  # validates it
    radius = float(torch.as_tensor(max_distance).detach())
    problem = prepare_problem(
        source,
        target,
        config,
        init=transform,
        source_lengths=source_lengths,
        target_lengths=target_lengths,
        search_backend=search_backend,
        init_name="transform",
    )
    points = problem.target
    assert isinstance(points, PointTarget) and points.index is not None
    moved = transform_points(problem.source, problem.init)
    index, found = points.index.query(
        moved, 1, problem.source_mask, max_distance=radius, repeated=False
    )
    index, found = index[..., 0], found[..., 0]
    partner = _gather(points.points, index)
    squared = (moved - partner).square().sum(-1)
    inlier = found & (squared.detach() < radius * radius)
    weight = inlier.to(squared.dtype)

    count = weight.sum(1)
    fitness = count / problem.source_counts.to(count.dtype).clamp_min(1)
    mean_square = (weight * squared).sum(1) / count.clamp_min(1)
    # sqrt's derivative is infinite at 0 (no inliers, or a perfect fit): 0 there instead
    positive = mean_square > 0
    rmse = torch.where(positive, torch.where(positive, mean_square, 1.0).sqrt(), 0.0)

    dtype = problem.result_dtype or problem.source.dtype
    result = RegistrationEvaluation(
        fitness.detach().to(dtype),
        rmse.to(dtype),
        torch.where(inlier, index, -1),
        information_from_partners(partner, weight).to(dtype),
    )
    if problem.unbatched:
        return RegistrationEvaluation(*(field[0] for field in result))
    return result


def information_from_partners(partners: Tensor, weights: Tensor) -> Tensor:
    """``(B, 6, 6)`` ``sum_i w_i J_i^T J_i`` with ``J_i = [-[q_i]x, I]`` for partners ``q``
    ``(B, N, 3)`` and weights ``(B, N)`` (0/1: the inliers), in closed form:
    ``[[sum w (|q|^2 I - q q^T), [s]x], [-[s]x, (sum w) I]]`` with ``s = sum w q``."""
    weighted = partners * weights[..., None]
    s = weighted.sum(1)
    second = weighted.transpose(1, 2) @ partners  # sum w q q^T
    eye = torch.eye(3, dtype=partners.dtype, device=partners.device)
    rotation = (weighted * partners).sum((1, 2))[:, None, None] * eye - second
    translation = weights.sum(1)[:, None, None] * eye
    top = torch.cat([rotation, skew(s)], dim=-1)
    bottom = torch.cat([-skew(s), translation], dim=-1)
    return torch.cat([top, bottom], dim=-2)


__all__ = ["RegistrationEvaluation", "evaluate_registration", "information_from_partners"]
