"""Steps 3 and 4 of ICP: weight the correspondences and reject outliers.

Every factor is a ``(B, N)`` tensor in ``[0, 1]``; they multiply, so any combination works and
shapes never change (a hard rejection is a 0 weight, not a removed row). Soft rejection is a
sigmoid of the margin to the threshold and so is differentiable in the thresholds too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difficp.config import ICPConfig
from difficp.correspondence import Correspondences

# A soft-rejection keep-weight below this counts as rejected (exactly 0). The sigmoid is never 0,
# and the solvers are invariant to a common scale of the weights, so a pair whose every
# correspondence is rejected by a wide margin (weights ~1e-80) would otherwise take full steps
# on them and report converged=True instead of being lost.
NEGLIGIBLE_WEIGHT = 1e-12


def soft_keep(margin: Tensor, temperature: float | Tensor) -> Tensor:
    """``sigmoid(margin / temperature)``, with values below :data:`NEGLIGIBLE_WEIGHT` set to 0."""
    s = torch.sigmoid(margin / temperature)
    return torch.where(s > NEGLIGIBLE_WEIGHT, s, torch.zeros_like(s))


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def normal_agreement(source_normals: Tensor, target_normals: Tensor) -> Tensor:
    """``(B, N)`` cosine between source and partner normals."""
    return (source_normals * target_normals).sum(-1)


def distance_rejection(distance: Tensor, config: ICPConfig) -> Tensor:
    """Keep-weight by distance: hard ``d <= max_distance``, soft sigmoid((max_distance - d)/T_r)."""
    if config.max_distance is None:
        return torch.ones_like(distance)
    threshold = _as_tensor(config.max_distance, distance)
    if config.rejection == "hard":
        return (distance <= threshold).to(distance.dtype)
    return soft_keep(threshold - distance, config.rejection_temperature)


def normal_rejection(cosine: Tensor, config: ICPConfig) -> Tensor:
    """Keep-weight by normal angle: hard ``angle <= max_normal_angle``, soft
    sigmoid((n_s . n_t - cos(max_normal_angle)) / T_r)."""
    if config.max_normal_angle is None:
        return torch.ones_like(cosine)
    threshold = torch.cos(torch.deg2rad(_as_tensor(config.max_normal_angle, cosine)))
    if config.rejection == "hard":
        return (cosine >= threshold).to(cosine.dtype)
    return soft_keep(cosine - threshold, config.rejection_temperature)


def linear_distance_weight(distance: Tensor, valid: Tensor, config: ICPConfig) -> Tensor:
    """``1 - d / d_max`` clipped at 0; ``d_max`` is ``max_distance`` or the pair's largest distance."""
    if config.max_distance is not None:
        d_max = _as_tensor(config.max_distance, distance)
    else:
        masked = torch.where(valid, distance, torch.zeros_like(distance))
        d_max = masked.amax(dim=1, keepdim=True).clamp_min(torch.finfo(distance.dtype).tiny)
    return (1 - distance / d_max).clamp_min(0)


def correspondence_weights(
    corr: Correspondences, source_normals: Tensor | None, config: ICPConfig
) -> Tensor:
    """The ``(B, N)`` weight of each correspondence before robust re-weighting.

    The product of: validity (padding / no partner -> 0), distance rejection, normal rejection,
    and the optional linear weights by distance and by normal agreement.
    """
    w = corr.valid.to(corr.distance.dtype)
    w = w * distance_rejection(corr.distance, config)
    if config.weight_distance:
        w = w * linear_distance_weight(corr.distance, corr.valid, config)
    if config.max_normal_angle is not None or config.weight_normal:
        if source_normals is None or corr.normals is None:
            raise ValueError("normal rejection / weighting needs source_normals and target_normals")
        cosine = normal_agreement(source_normals, corr.normals)
        w = w * normal_rejection(cosine, config)
        if config.weight_normal:
            w = w * cosine.clamp_min(0)
    return torch.where(corr.valid, w, torch.zeros_like(w))


def robust_weights(residual: Tensor, kernel: str | None, scale: float | Tensor) -> Tensor:
    """IRLS weights ``w(r) = rho'(r) / r`` of a robust kernel for residual norms ``r`` ``(B, N)``.

    huber: 1 if r <= k else k / r;  cauchy: 1 / (1 + (r/k)^2);
    geman_mcclure: (k^2 / (k^2 + r^2))^2;  tukey: (1 - (r/k)^2)^2 if r <= k else 0.
    """
    if kernel is None:
        return torch.ones_like(residual)
    k = _as_tensor(scale, residual)
    r = residual.abs()
    if kernel == "huber":
        return torch.where(r <= k, torch.ones_like(r), k / r.clamp_min(torch.finfo(r.dtype).tiny))
    if kernel == "cauchy":
        return 1 / (1 + (r / k) ** 2)
    if kernel == "geman_mcclure":
        return (k**2 / (k**2 + r**2)) ** 2
    if kernel == "tukey":
        return torch.where(r <= k, (1 - (r / k) ** 2) ** 2, torch.zeros_like(r))
    raise ValueError(f"unknown robust kernel {kernel!r}")


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
    "correspondence_weights",
    "distance_rejection",
    "inlier_statistics",
    "linear_distance_weight",
    "normal_agreement",
    "normal_rejection",
    "robust_weights",
    "soft_keep",
]
