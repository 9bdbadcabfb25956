"""Step 5a of ICP: the error metrics, as residuals and their Jacobians in a 6-D step.

A metric gives, for source points ``p`` (already moved by the current transform) and their
partners ``q``, the residuals ``r`` ``(B, N, m)`` and the Jacobian ``J`` ``(B, N, m, 6)`` of the
residuals with respect to a small step ``x = (omega, v)`` applied to the source, and says how a
solved step becomes a rigid update (``step_to_transform``).

* point_to_point: ``r = p - q`` (m = 3); step ``p -> p + omega x p + v``.
* point_to_plane: ``r = (p - q) . n_q`` (m = 1); same step.
* symmetric (Rusinkiewicz 2019): ``r = (p - q) . (n_p + n_q)`` (m = 1); the rotation is split
  half on the source, half (inverse) on the target: the linearised step is
  ``r ~ (p - q) . n + ((p + q) x n) . a + n . t`` with ``a = axis * tan(theta)`` and
  ``t = translation / cos(theta)``; the update is ``p -> R_theta (R_theta p + t cos(theta))``.
"""

from __future__ import annotations

from typing import Protocol

import roma
import torch
from torch import Tensor

from difficp.correspondence import Correspondences
from difficp.geometry import make_transform, twist_to_transform


def _skew(v: Tensor) -> Tensor:
    """``(..., 3)`` -> ``(..., 3, 3)`` cross-product matrix ``[v]x``."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack(
        [torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1), torch.stack([-y, x, z], -1)], -2
    )


class Metric(Protocol):
    """What the solvers need from an error metric."""

    name: str
    residual_dim: int

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        """``(B, N, m)`` residuals."""
        ...

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        """``(B, N, m, 6)`` derivative of the residuals in the step ``x``."""
        ...

    def step_to_transform(self, step: Tensor) -> Tensor:
        """``(B, 6)`` solved step -> ``(B, 4, 4)`` rigid update applied on the left."""
        ...


class PointToPoint:
    name = "point_to_point"
    residual_dim = 3

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        return source - corr.points

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        eye = torch.eye(3, dtype=source.dtype, device=source.device).expand(*source.shape[:2], 3, 3)
        return torch.cat([-_skew(source), eye], dim=-1)

    def step_to_transform(self, step: Tensor) -> Tensor:
        return twist_to_transform(step)


class PointToPlane:
    name = "point_to_plane"
    residual_dim = 1

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        assert corr.normals is not None
        return ((source - corr.points) * corr.normals).sum(-1, keepdim=True)

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        assert corr.normals is not None
        n = corr.normals
        return torch.cat([torch.cross(source, n, dim=-1), n], dim=-1)[..., None, :]

    def step_to_transform(self, step: Tensor) -> Tensor:
        return twist_to_transform(step)


class Symmetric:
    name = "symmetric"
    residual_dim = 1

    @staticmethod
    def _normal_sum(source_normals: Tensor | None, corr: Correspondences) -> Tensor:
        assert source_normals is not None and corr.normals is not None
        return source_normals + corr.normals

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        n = self._normal_sum(source_normals, corr)
        return ((source - corr.points) * n).sum(-1, keepdim=True)

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        n = self._normal_sum(source_normals, corr)
        return torch.cat([torch.cross(source + corr.points, n, dim=-1), n], dim=-1)[..., None, :]

    def step_to_transform(self, step: Tensor) -> Tensor:
        a, t = step[..., :3], step[..., 3:]
        tan = a.norm(dim=-1, keepdim=True)
        theta = torch.atan(tan)
        # rotation vector axis*theta = a * atan(|a|)/|a|, written to stay smooth at a = 0
        scale = torch.where(tan > 1e-12, theta / tan.clamp_min(1e-12), 1 - tan**2 / 3)
        R_half = roma.rotvec_to_rotmat(a * scale)
        translation = (R_half @ (t * torch.cos(theta))[..., None])[..., 0]
        return make_transform(R_half @ R_half, translation)


METRICS: dict[str, Metric] = {
    "point_to_point": PointToPoint(),
    "point_to_plane": PointToPlane(),
    "symmetric": Symmetric(),
}


def get_metric(name: str) -> Metric:
    """The metric object for a config name."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {tuple(METRICS)}") from None
