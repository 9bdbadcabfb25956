"""Steps 3 and 4 of ICP: weight the correspondences and reject outliers.

Every factor is a ``(B, N)`` tensor in ``[0, 1]``; they multiply, so any combination works and
shapes never change (a hard rejection is a 0 weight, not a removed row). Soft rejection is a
sigmoid of the margin to the threshold and so is differentiable in the thresholds too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difficp.correspondence import Correspondences
from difficp.strategies.kernels import robust_weights
from difficp.strategies.rejection import NEGLIGIBLE_WEIGHT, Rejection, soft_keep

Scalar = float | Tensor


@dataclass(frozen=True)
class Weighting:
    """What steps 3-4 read from the config (built by :attr:`difficp.ICPConfig.weighting`).

    Attributes:
        max_distance, max_normal_angle: rejection thresholds (distance units / degrees; None =
            none), floats or 0-d tensors.
        rejection: the :class:`~difficp.strategies.rejection.Rejection` strategy (hard / soft).
        rejection_temperature: its temperature (soft).
        weight_distance, weight_normal: the linear weights by distance / normal agreement.
    """

    max_distance: float | Tensor | None
    max_normal_angle: float | Tensor | None
    rejection: Rejection
    rejection_temperature: float | Tensor
    weight_distance: bool
    weight_normal: bool


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def normal_agreement(source_normals: Tensor, target_normals: Tensor) -> Tensor:
    """``(B, N)`` cosine between source and partner normals."""
    return (source_normals * target_normals).sum(-1)


def distance_rejection(d: Tensor, d_max: Scalar | None, how: Rejection, t: Scalar) -> Tensor:
    """Keep-weight of distances ``d`` ``(B, N)``: ``how.keep(d_max - d, t)`` (1 without
    ``d_max``); ``how`` the hard / soft rejection, ``t`` its temperature."""
    if d_max is None:
        return torch.ones_like(d)
    return how.keep(_as_tensor(d_max, d) - d, t)


def normal_rejection(cos: Tensor, angle: Scalar | None, how: Rejection, t: Scalar) -> Tensor:
    """Keep-weight of normal agreements ``cos`` ``(B, N)``: ``how.keep(cos - cos(angle), t)``
    (``angle`` in degrees; 1 without it)."""
    if angle is None:
        return torch.ones_like(cos)
    return how.keep(cos - torch.cos(torch.deg2rad(_as_tensor(angle, cos))), t)


def linear_distance_weight(distance: Tensor, valid: Tensor, max_distance: Scalar | None) -> Tensor:
    """``1 - d / d_max`` clipped at 0; ``d_max`` is ``max_distance`` or the pair's largest distance."""
    if max_distance is not None:
        d_max = _as_tensor(max_distance, distance)
    else:
        masked = torch.where(valid, distance, torch.zeros_like(distance))
        d_max = masked.amax(dim=1, keepdim=True).clamp_min(torch.finfo(distance.dtype).tiny)
    return (1 - distance / d_max).clamp_min(0)


def correspondence_weights(
    corr: Correspondences, source_normals: Tensor | None, weighting: Weighting
) -> Tensor:
    """The ``(B, N)`` weight of each correspondence before robust re-weighting.

    The product of: validity (padding / no partner -> 0), distance rejection, normal rejection,
    and the optional linear weights by distance and by normal agreement.
    """
    o = weighting
    w = corr.valid.to(corr.distance.dtype)
    w = w * distance_rejection(corr.distance, o.max_distance, o.rejection, o.rejection_temperature)
    if o.weight_distance:
        w = w * linear_distance_weight(corr.distance, corr.valid, o.max_distance)
    if o.max_normal_angle is not None or o.weight_normal:
        if source_normals is None or corr.normals is None:
            raise ValueError("normal rejection / weighting needs source_normals and target_normals")
        cosine = normal_agreement(source_normals, corr.normals)
        w = w * normal_rejection(cosine, o.max_normal_angle, o.rejection, o.rejection_temperature)
        if o.weight_normal:
            w = w * cosine.clamp_min(0)
    return torch.where(corr.valid, w, torch.zeros_like(w))


def inlier_statistics(
    corr: Correspondences, source_counts: Tensor, max_distance: float | Tensor | None
) -> tuple[Tensor, Tensor]:
    """Open3D's ``fitness`` and ``inlier_rmse`` of the current correspondences.

    Inliers are valid correspondences closer than ``max_distance`` (all valid ones without it).
    ``fitness = inliers / source points``, ``inlier_rmse = sqrt(mean squared inlier distance)``
    (0 without inliers). Both ``(B,)``, not differentiated.
    """
    d = corr.distance.detach()
    inlier = corr.valid
    if max_distance is not None:
        inlier = inlier & (d < float(torch.as_tensor(max_distance).detach()))
    count = inlier.sum(1)
    sq = torch.where(inlier, d * d, torch.zeros_like(d)).sum(1)
    fitness = count.to(d.dtype) / source_counts.to(d.dtype).clamp_min(1)
    rmse = torch.where(
        count > 0, (sq / count.clamp_min(1).to(d.dtype)).sqrt(), torch.zeros_like(sq)
    )
    return fitness, rmse


__all__ = [
    "NEGLIGIBLE_WEIGHT",
    "Weighting",
    "correspondence_weights",
    "distance_rejection",
    "inlier_statistics",
    "linear_distance_weight",
    "normal_agreement",
    "normal_rejection",
    "robust_weights",
    "soft_keep",
]
