"""Step 5a of ICP: the error metrics, as residuals and their Jacobians in a 6-D step.

A metric gives, for source points ``p`` (already moved by the current transform) and their
partners ``q``, the residuals ``r`` ``(B, N, m)`` and the Jacobian ``J`` ``(B, N, m, 6)`` of the
residuals with respect to a small step ``x = (omega, v)`` applied to the source, and says how a
solved step becomes a rigid update (``step_to_transform``).

* point_to_point: ``r = p - q`` (m = 3); step ``p -> p + omega x p + v``.
* point_to_plane: ``r = (p - q) . n_q`` (m = 1); same step.
* gicp (Segal et al. 2009): ``r = L^-1 (p - q)`` (m = 3) with ``C = L L^T`` the combined
  covariance of the pair (Mahalanobis weight ``C^-1``); same step as point_to_point.
* symmetric (Rusinkiewicz 2019): ``r = (p - q) . (n_p + n_q)`` (m = 1), ``n_p`` flipped where it
  opposes ``n_q`` (normals are lines: opposite ones would cancel); the rotation is split
  half on the source, half (inverse) on the target: the linearised step is
  ``r ~ (p - q) . n + ((p + q) x n) . a + n . t`` with ``a = axis * tan(theta)`` and
  ``t = translation / cos(theta)``; the update is ``p -> R_theta (R_theta p + t cos(theta))``.
* colored (Park, Zhou & Koltun 2017; Open3D's ``TransformationEstimationForColoredICP``): m = 2,
  ``sqrt(lambda) (p - q) . n_q`` and ``sqrt(1 - lambda) (I_p - I_q - d_q . P(p - q))`` with
  ``I`` the intensities, ``d_q`` the target's intensity gradient on its tangent plane and
  ``P = I - n_q n_q^T`` (:mod:`difficp.colors`); both rows are weighted by the same
  correspondence weight (Open3D's robust kernel weighs each row by its own residual).

Each metric is one class registered in :data:`METRICS` (the allowed values of
``ICPConfig.metric``), with its compiled twins beside it: ``compiled_residual`` (the residual
norm of one correspondence, for the robust kernel), ``compiled_accumulate`` (its weighted
normal-equation terms) and ``compiled_step_to_transform``. Twins are plain
Python on floats and numpy arrays; :mod:`difficp.fused` compiles them with numba and dispatches
by ``METRICS.code(name)``, so this module does not import numba. A metric the compiled path
cannot run sets ``fused_reason`` (why not).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from difficp.correspondence import Correspondences
from difficp.geometry import (
    make_transform,
    skew,
    skew_twin,
    twist_to_transform,
    twist_to_transform_twin,
)
from difficp.strategies.registry import Registry, compiled_helper


class Metric(Protocol):
    """What the solvers need from an error metric."""

    name: str
    residual_dim: int
    needs_source_normals: bool
    needs_target_normals: bool
    # How far the linearisation point moves when both sides are centred on c: p moves by c
    # (1), symmetric's p + q by 2c (2). See difficp.solvers._step_to_transform.
    centre_factor: float
    # The solver of ICPConfig(solver=None).
    default_solver: str

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


METRICS: Registry[Metric] = Registry("metric")


class RigidStepMetric:
    """Defaults of a metric whose solved step ``x = (omega, v)`` is the twist
    ``p -> R(omega) p + v`` (:func:`~difficp.geometry.twist_to_transform`)."""

    name: str
    needs_source_normals = False
    needs_target_normals = True
    centre_factor = 1.0
    default_solver = "linear"
    # Per-point covariances (source and target), read by metric "gicp".
    needs_covariances = False
    # Whether it reads colour features (Correspondences.features / source_features).
    needs_colors = False
    # Why the compiled path cannot run it (None: its compiled twins are below / beside it).
    fused_reason: str | None = None

    def step_to_transform(self, step: Tensor) -> Tensor:
        return twist_to_transform(step)

    compiled_step_to_transform = staticmethod(twist_to_transform_twin)


@METRICS.register("point_to_point")
class PointToPoint(RigidStepMetric):
    residual_dim = 3
    default_solver = "svd"
    needs_target_normals = False

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        return source - corr.points

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        eye = torch.eye(3, dtype=source.dtype, device=source.device).expand(*source.shape[:2], 3, 3)
        return torch.cat([-skew(source), eye], dim=-1)

    @staticmethod
    def compiled_residual(d: float, v: tuple) -> float:
        """Twin of the residual norm of one correspondence (for the robust kernel): ``d``.

        Every metric's twins take ``d = |p - q|`` and ``v``, the 21 floats ``r = p - q``,
        ``a = p - c``, ``b = q - c`` (centred on the pair's centre ``c``), ``m`` / ``n`` the
        moved source / target normals, and six values of the metric's own (zeros for the
        others): the upper triangle of the combined covariance ``C`` (GICP), or the colour
        features ``s I_p``, ``sqrt(lambda)``, ``s I_q``, ``s d_q`` (colored) (a tuple: numba
        keeps it in registers)."""
        return d

    @staticmethod
    def compiled_accumulate(
        sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, v: tuple
    ) -> None:
        """Twin of :meth:`jacobian` / :meth:`residuals`: adds the correspondence's weighted
        normal-equation terms to ``sums[row, k0:k0 + 27]`` (:func:`_add_row`); ``J`` ``(6,)``
        is scratch. Rows ``[-[a]x | I]``, residuals ``r``."""
        rx, ry, rz, ax, ay, az = v[:6]
        J[0], J[1], J[2], J[3], J[4], J[5] = 0.0, az, -ay, 1.0, 0.0, 0.0
        _add_row(sums, row, k0, J, rx, w)
        J[0], J[1], J[2], J[3], J[4], J[5] = -az, 0.0, ax, 0.0, 1.0, 0.0
        _add_row(sums, row, k0, J, ry, w)
        J[0], J[1], J[2], J[3], J[4], J[5] = ay, -ax, 0.0, 0.0, 0.0, 1.0
        _add_row(sums, row, k0, J, rz, w)


@compiled_helper
def _add_row(sums: np.ndarray, row: int, k0: int, J: np.ndarray, r: float, w: float) -> None:
    """Adds ``w J^T J`` (upper triangle, row by row: 21) and ``w J^T r`` (6) of one residual
    row ``J`` ``(6,)`` to ``sums[row, k0:k0 + 27]`` (compiled helper of the metrics' twins)."""
    k = k0
    for i in range(6):
        wi = w * J[i]
        for j in range(i, 6):
            sums[row, k] += wi * J[j]
            k += 1
    for i in range(6):
        sums[row, k0 + 21 + i] += w * J[i] * r


@compiled_helper
def _lever_row(
    sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, e: tuple, s: tuple, r: float
) -> None:
    """Adds one residual row ``r`` with Jacobian ``[e x s, s]`` (compiled helper of the
    plane-like metrics' twins)."""
    ex, ey, ez = e
    sx, sy, sz = s
    J[0] = ey * sz - ez * sy
    J[1] = ez * sx - ex * sz
    J[2] = ex * sy - ey * sx
    J[3], J[4], J[5] = sx, sy, sz
    _add_row(sums, row, k0, J, r, w)


@METRICS.register("point_to_plane")
class PointToPlane(RigidStepMetric):
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

    @staticmethod
    def compiled_residual(d: float, v: tuple) -> float:
        """Twin of :meth:`residuals` (see :meth:`PointToPoint.compiled_residual`): ``r . n``."""
        return v[0] * v[12] + v[1] * v[13] + v[2] * v[14]

    @staticmethod
    def compiled_accumulate(
        sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, v: tuple
    ) -> None:
        """Twin of :meth:`jacobian` / :meth:`residuals`: ``[a x n, n]``, ``r . n``."""
        r = v[0] * v[12] + v[1] * v[13] + v[2] * v[14]
        _lever_row(sums, row, k0, J, w, v[3:6], v[12:15], r)


def _symmetric_update(step: np.ndarray, out: np.ndarray) -> None:
    """Compiled twin of :meth:`Symmetric.step_to_transform`; ``step`` ``(6,)`` into ``out``
    ``(4, 4)`` (its last row untouched)."""
    a = step[:3]
    tan = math.sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2])
    theta = math.atan(tan)
    scale = theta / tan if tan > 1e-12 else 1.0 - tan * tan / 3.0
    v = a * scale
    # Rodrigues' formula for the half rotation
    angle = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    R_half = np.eye(3)
    if angle >= 1e-300:
        K = skew_twin(v / angle)
        R_half = R_half + math.sin(angle) * K + (1.0 - math.cos(angle)) * (K @ K)
    translation = R_half @ (step[3:] * math.cos(theta))
    out[:3, :3] = R_half @ R_half
    out[:3, 3] = translation


@compiled_helper
def _oriented_normal_sum(v: tuple) -> tuple:
    """Twin of :meth:`Symmetric._normal_sum` for one correspondence: ``n + m``, ``m`` (the moved
    source normal, ``v[9:12]``) flipped where it opposes ``n`` (``v[12:15]``)."""
    mx, my, mz, nx, ny, nz = v[9:15]
    if mx * nx + my * ny + mz * nz < 0.0:
        return (nx - mx, ny - my, nz - mz)
    return (nx + mx, ny + my, nz + mz)


@METRICS.register("symmetric")
class Symmetric(RigidStepMetric):
    residual_dim = 1
    needs_source_normals = True
    centre_factor = 2.0

    @staticmethod
    def _normal_sum(source_normals: Tensor | None, corr: Correspondences) -> Tensor:
        """``n_p + n_q`` ``(B, N, 3)`` with ``n_p`` flipped where it opposes ``n_q``: normals
        are lines, not directions, and opposite ones would sum to 0 (no residual, no step)."""
        assert source_normals is not None and corr.normals is not None
        agree = (source_normals * corr.normals).sum(-1, keepdim=True).detach() >= 0
        return torch.where(agree, source_normals, -source_normals) + corr.normals

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
        import roma  # here: importing roma loads torch._dynamo (seconds)

        R_half = roma.rotvec_to_rotmat(a * scale)
        translation = (R_half @ (t * torch.cos(theta))[..., None])[..., 0]
        return make_transform(R_half @ R_half, translation)

    @staticmethod
    def compiled_residual(d: float, v: tuple) -> float:
        """Twin of :meth:`residuals` (see :meth:`PointToPoint.compiled_residual`): ``r . s``
        with ``s`` the normals' sum (:func:`_oriented_normal_sum`)."""
        sx, sy, sz = _oriented_normal_sum(v)
        return v[0] * sx + v[1] * sy + v[2] * sz

    @staticmethod
    def compiled_accumulate(
        sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, v: tuple
    ) -> None:
        """Twin of :meth:`jacobian` / :meth:`residuals`: ``[(a + b) x s, s]``, ``r . s``."""
        rx, ry, rz, ax, ay, az, bx, by, bz = v[:9]
        s = _oriented_normal_sum(v)
        r = rx * s[0] + ry * s[1] + rz * s[2]
        _lever_row(sums, row, k0, J, w, (ax + bx, ay + by, az + bz), s, r)

    compiled_step_to_transform = staticmethod(_symmetric_update)


def _whitening(corr: Correspondences) -> Tensor:
    """``(B, N, 3, 3)`` lower Cholesky factor ``L`` of the combined covariances ``C = L L^T``."""
    assert corr.covariances is not None, "metric 'gicp' needs correspondence covariances"
    return torch.linalg.cholesky(corr.covariances)


@METRICS.register("gicp")
class GeneralizedICP(RigidStepMetric):
    """Generalized-ICP (Segal, Haehnel and Thrun 2009): the plane-to-plane cost
    ``r^T C^-1 r`` with ``r = p - q`` and ``C = S_q + R S_p R^T`` (the partner's covariance
    plus the moved source point's, in ``corr.covariances``), held fixed during a step.

    Written as the whitened residual ``L^-1 r`` (m = 3, ``C = L L^T``) so that the normal
    equations are ``sum w J^T C^-1 J`` / ``sum w J^T C^-1 r`` (a 3 x 3 Mahalanobis block per
    correspondence) with ``J = [-[p]x | I]``; its norm, the Mahalanobis distance, is what a
    robust kernel weighs.
    """

    residual_dim = 3
    needs_target_normals = False
    needs_covariances = True

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        L = _whitening(corr)
        r = (source - corr.points)[..., None]
        return torch.linalg.solve_triangular(L, r, upper=False)[..., 0]

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        L = _whitening(corr)
        eye = torch.eye(3, dtype=source.dtype, device=source.device).expand(*source.shape[:2], 3, 3)
        J = torch.cat([-skew(source), eye], dim=-1)
        return torch.linalg.solve_triangular(L, J, upper=False)

    @staticmethod
    def compiled_residual(d: float, v: tuple) -> float:
        """Twin of :meth:`residuals` (see :meth:`PointToPoint.compiled_residual`; ``v[15:21]``
        holds ``C``'s upper triangle ``c00 c01 c02 c11 c12 c22``): ``|L^-1 r|``."""
        m00, m10, m11, m20, m21, m22 = _inverse_cholesky(v[15:21])
        e0 = m00 * v[0]
        e1 = m10 * v[0] + m11 * v[1]
        e2 = m20 * v[0] + m21 * v[1] + m22 * v[2]
        return math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)

    @staticmethod
    def compiled_accumulate(
        sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, v: tuple
    ) -> None:
        """Twin of :meth:`jacobian` / :meth:`residuals`: the three whitened rows ``m`` of
        ``L^-1``: ``[a x m, m]``, residual ``m . r``."""
        m00, m10, m11, m20, m21, m22 = _inverse_cholesky(v[15:21])
        a = v[3:6]
        _lever_row(sums, row, k0, J, w, a, (m00, 0.0, 0.0), m00 * v[0])
        _lever_row(sums, row, k0, J, w, a, (m10, m11, 0.0), m10 * v[0] + m11 * v[1])
        r2 = m20 * v[0] + m21 * v[1] + m22 * v[2]
        _lever_row(sums, row, k0, J, w, a, (m20, m21, m22), r2)


@compiled_helper
def _inverse_cholesky(c: tuple) -> tuple:
    """The lower triangle ``(m00, m10, m11, m20, m21, m22)`` of ``L^-1`` for the symmetric
    positive-definite ``C = L L^T`` given by its upper triangle ``c`` =
    ``(c00, c01, c02, c11, c12, c22)`` (compiled helper of GICP's twins)."""
    l00 = math.sqrt(c[0])
    l10 = c[1] / l00
    l20 = c[2] / l00
    l11 = math.sqrt(c[3] - l10 * l10)
    l21 = (c[4] - l20 * l10) / l11
    l22 = math.sqrt(c[5] - l20 * l20 - l21 * l21)
    m00, m11, m22 = 1.0 / l00, 1.0 / l11, 1.0 / l22
    m10 = -l10 * m00 / l11
    m21 = -l21 * m11 / l22
    m20 = -(l20 * m00 + l21 * m10) / l22
    return (m00, m10, m11, m20, m21, m22)


@METRICS.register("colored")
class Colored(RigidStepMetric):
    """Colored ICP: a point-to-plane row and a photometric row per correspondence.

    Reads the features of :func:`difficp.colors.colored_features`, in which the weights are
    folded: partner ``(sqrt(lambda), s I_q, s d_q)`` in ``corr.features`` ``(B, N, 5)`` and
    ``s I_p`` in ``corr.source_features`` ``(B, N, 1)``, ``s = sqrt(1 - lambda)``.
    """

    residual_dim = 2
    needs_colors = True

    @staticmethod
    def _terms(source: Tensor, corr: Correspondences) -> tuple[Tensor, ...]:
        """``r = p - q``, ``n``, the geometric weight ``(B, N, 1)``, the intensity difference
        ``(B, N)`` and the tangential gradient ``P d`` ``(B, N, 3)``."""
        assert corr.normals is not None and corr.features is not None
        assert corr.source_features is not None
        n, f = corr.normals, corr.features
        gradient = f[..., 2:5]
        tangential = gradient - (gradient * n).sum(-1, keepdim=True) * n
        difference = corr.source_features[..., 0] - f[..., 1]
        return source - corr.points, n, f[..., :1], difference, tangential

    def residuals(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        r, n, geometric, difference, tangential = self._terms(source, corr)
        plane = geometric * (r * n).sum(-1, keepdim=True)
        photometric = difference - (r * tangential).sum(-1)
        return torch.cat([plane, photometric[..., None]], dim=-1)

    def jacobian(
        self, source: Tensor, source_normals: Tensor | None, corr: Correspondences
    ) -> Tensor:
        _, n, geometric, _, tangential = self._terms(source, corr)
        d = -tangential  # the photometric residual's derivative in p
        plane = geometric * torch.cat([torch.cross(source, n, dim=-1), n], dim=-1)
        photometric = torch.cat([torch.cross(source, d, dim=-1), d], dim=-1)
        return torch.stack([plane, photometric], dim=-2)

    @staticmethod
    def compiled_residual(d: float, v: tuple) -> float:
        """Twin of :meth:`residuals` (see :meth:`PointToPoint.compiled_residual`; ``v[15:21]``
        holds ``s I_p, sqrt(lambda), s I_q, s d_q``): the norm of the two rows (what the
        robust kernel weighs)."""
        plane, photometric, _, _, _ = _colored_rows(v)
        return math.sqrt(plane * plane + photometric * photometric)

    @staticmethod
    def compiled_accumulate(
        sums: np.ndarray, row: int, k0: int, J: np.ndarray, w: float, v: tuple
    ) -> None:
        """Twin of :meth:`jacobian` / :meth:`residuals`: rows ``[a x sqrt(lambda) n,
        sqrt(lambda) n]`` and ``[a x (-P d), -P d]``."""
        plane, photometric, dx, dy, dz = _colored_rows(v)
        g = v[16]
        a = v[3:6]
        _lever_row(sums, row, k0, J, w, a, (g * v[12], g * v[13], g * v[14]), plane)
        _lever_row(sums, row, k0, J, w, a, (dx, dy, dz), photometric)


@compiled_helper
def _colored_rows(v: tuple) -> tuple:
    """Colored ICP's two residuals of one correspondence and the photometric row's derivative
    in ``p``, ``-P d`` (compiled helper of its twins): ``(plane, photometric, dx, dy, dz)``
    (plain floats: numba's parallel analysis refused nested tuples here)."""
    rx, ry, rz, nx, ny, nz = v[0], v[1], v[2], v[12], v[13], v[14]
    gx, gy, gz = v[18], v[19], v[20]
    rn = rx * nx + ry * ny + rz * nz
    gn = gx * nx + gy * ny + gz * nz
    dx, dy, dz = gn * nx - gx, gn * ny - gy, gn * nz - gz  # -P d
    photometric = v[15] - v[17] + (rx * dx + ry * dy + rz * dz)
    return v[16] * rn, photometric, dx, dy, dz


def get_metric(name: str) -> Metric:
    """The metric object for a config name."""
    return METRICS[name]
