"""SE(3) / SO(3) maths (the one copy: rotation vectors, skew matrices, twists, orthonormalisation)
and depth map <-> point conversions.

Conventions: points are row vectors, ``(B, N, 3)``; a transform ``T`` is a ``(B, 4, 4)``
homogeneous matrix acting as ``p' = p @ R.T + t`` with ``R = T[..., :3, :3]``, ``t = T[..., :3, 3]``.
Pinhole intrinsics are ``(3, 3)`` or ``(B, 3, 3)`` matrices ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``;
pixel ``(u, v)`` is column ``u``, row ``v``; camera looks along +z.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difficp.strategies.registry import compiled_helper

# float64 epsilon of the compiled twins (plain floats: numba folds them as constants)
_EPS64 = float(np.finfo(np.float64).eps)


def transform_points(points: Tensor, transform: Tensor) -> Tensor:
    """Apply ``transform`` ``(..., 4, 4)`` to ``points`` ``(..., N, 3)``."""
    return rotate_vectors(points, transform) + transform[..., None, :3, 3]


def rotate_vectors(vectors: Tensor, transform: Tensor) -> Tensor:
    """Rotate direction vectors ``(..., N, 3)`` by the rotation part of ``transform``."""
    # R @ v^T, not v @ R^T: a batched product whose long axis (N) is the columns runs as one
    # wide product per pair; with N as the rows and 3 as the inner size, CPU BLAS took 3.5x
    # longer (263 vs 75 us for 32 x 1024 float32 points, 2 threads).
    return (transform[..., :3, :3] @ vectors.transpose(-1, -2)).transpose(-1, -2)


def make_transform(rotation: Tensor, translation: Tensor) -> Tensor:
    """Build ``(..., 4, 4)`` from ``rotation`` ``(..., 3, 3)`` and ``translation`` ``(..., 3)``."""
    top = torch.cat([rotation, translation[..., :, None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def invert_transform(transform: Tensor) -> Tensor:
    """Inverse of a rigid ``(..., 4, 4)`` transform (uses R^T, not a general inverse)."""
    R_t = transform[..., :3, :3].transpose(-1, -2)
    t = transform[..., :3, 3]
    return make_transform(R_t, -(R_t @ t[..., None])[..., 0])


def twist_to_transform(twist: Tensor) -> Tensor:
    """``(..., 6)`` step ``(alpha, beta, gamma, v)`` -> ``(..., 4, 4)`` with
    ``R = Rz(gamma) Ry(beta) Rx(alpha)`` and ``t = v``.

    To first order this is ``p' ~ p + omega x p + v`` with ``omega = (alpha, beta, gamma)``, the
    step the linearised metrics solve for; the Euler form is the one Open3D composes its updates
    with, so iterates match Open3D's step for step.
    """
    # Written out (rather than roma.euler_to_rotmat): this runs once per ICP iteration, where
    # the quaternion round trip measured ~0.7 ms per call, a third of a small ICP iteration.
    c, s = torch.cos(twist[..., :3]), torch.sin(twist[..., :3])
    ca, cb, cg = c.unbind(-1)
    sa, sb, sg = s.unbind(-1)
    rows = (
        (cg * cb, cg * sb * sa - sg * ca, cg * sb * ca + sg * sa),
        (sg * cb, sg * sb * sa + cg * ca, sg * sb * ca - cg * sa),
        (-sb, cb * sa, cb * ca),
    )
    R = torch.stack([torch.stack(row, -1) for row in rows], -2)
    return make_transform(R, twist[..., 3:])


def twist_to_transform_twin(step: np.ndarray, out: np.ndarray) -> None:
    """Compiled twin of :func:`twist_to_transform` (plain Python that :mod:`difficp.fused`
    compiles): ``step`` ``(6,)`` into ``out`` ``(4, 4)`` (its last row untouched)."""
    ca, cb, cg = math.cos(step[0]), math.cos(step[1]), math.cos(step[2])
    sa, sb, sg = math.sin(step[0]), math.sin(step[1]), math.sin(step[2])
    out[0, 0], out[0, 1], out[0, 2] = cg * cb, cg * sb * sa - sg * ca, cg * sb * ca + sg * sa
    out[1, 0], out[1, 1], out[1, 2] = sg * cb, sg * sb * sa + cg * ca, sg * sb * ca - cg * sa
    out[2, 0], out[2, 1], out[2, 2] = -sb, cb * sa, cb * ca
    out[0, 3], out[1, 3], out[2, 3] = step[3], step[4], step[5]


def skew(v: Tensor) -> Tensor:
    """``(..., 3)`` -> ``(..., 3, 3)`` cross-product matrix ``[v]x``."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack(
        [torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1), torch.stack([-y, x, z], -1)], -2
    )


def rotvec_to_rotmat(rotvec: Tensor) -> Tensor:
    """``(..., 3)`` rotation vector -> ``(..., 3, 3)`` rotation matrix, smooth to all orders.

    Rodrigues' formula ``R = I + a(t) K + b(t) K^2`` with ``K = [rotvec]x``, ``t = |rotvec|^2``,
    ``a = sin(theta)/theta``, ``b = (1 - cos(theta))/theta^2`` written as functions of ``t`` (with
    their Taylor series below ``t = 1e-4``), so no square root is differentiated at 0. Same values
    as ``roma.rotvec_to_rotmat``, but roma switches to a first-order formula near 0 whose second
    derivative is NaN there, and unrolled Gauss-Newton differentiates the Jacobian (a second
    derivative) exactly at the zero initial value of the parameters.
    """
    K = skew(rotvec)
    t = (rotvec * rotvec).sum(-1)[..., None, None]
    small = t < 1e-4
    t_safe = torch.where(small, torch.ones_like(t), t)  # keeps the unused branch finite
    theta = t_safe.sqrt()
    a = torch.where(small, 1 - t / 6 + t * t / 120, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - t / 24 + t * t / 720, (1 - torch.cos(theta)) / t_safe)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + a * K + b * (K @ K)


def se3_exp(twist: Tensor) -> Tensor:
    """``(..., 6)`` ``(rotation vector, translation)`` -> ``(..., 4, 4)``; inverse of :func:`se3_log`."""
    import roma  # here: importing roma loads torch._dynamo (seconds)

    return make_transform(roma.rotvec_to_rotmat(twist[..., :3]), twist[..., 3:])


def se3_log(transform: Tensor) -> Tensor:
    """``(..., 4, 4)`` -> ``(..., 6)`` ``(rotation vector, translation)``."""
    import roma  # here: importing roma loads torch._dynamo (seconds)

    return torch.cat([roma.rotmat_to_rotvec(transform[..., :3, :3]), transform[..., :3, 3]], dim=-1)


def orthonormalize(transform: Tensor) -> Tensor:
    """``transform`` ``(B, 4, 4)`` with its rotation block pulled back onto SO(3).

    Composing thousands of updates lets rounding drift the rotation off SO(3) (float32:
    orthonormality error 1e-4 after 1000 iterations). One Newton-Schulz step of the polar
    decomposition, ``R <- R (3 I - R^T R) / 2``, squares the error each iteration, so it never
    builds up; it is differentiable, costs two 3x3 products, and moves an orthonormal float64
    rotation only by rounding (Open3D parity is unchanged).
    """
    R = transform[..., :3, :3]
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    R = 0.5 * R @ (3 * eye - R.transpose(-1, -2) @ R)
    return make_transform(R, transform[..., :3, 3])


def unit_vectors(v: Tensor) -> Tensor:
    """``v`` ``(B, 3)`` normalised; a zero vector gives ``(1, 0, 0)`` (finite gradients)."""
    n = v.norm(dim=-1, keepdim=True)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    e = torch.zeros_like(v)
    e[:, 0] = 1
    return torch.where(n > 0, v / safe, e)


def rotation_between(v: Tensor, u: Tensor) -> Tensor:
    """``(B, 3, 3)`` smallest rotation taking unit vectors ``v`` to ``u`` ``(B, 3)``.

    ``I + K + K^2 / (1 + v.u)`` with ``K = [v x u]x``; for ``v.u < 0`` (where that loses
    precision) the half-turn about ``v x u`` taking ``v`` to ``-v``, then the small rotation from
    there to ``u``: the same rotation, well conditioned. Opposite vectors turn about an axis
    perpendicular to ``v``.
    """
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(v.shape[0], 3, 3)

    def small(a: Tensor, b: Tensor) -> Tensor:
        K = skew(torch.cross(a, b, dim=-1))
        c = (a * b).sum(-1).clamp_min(0)
        return eye + K + (K @ K) / (1 + c)[:, None, None]

    # A half-turn axis: perpendicular to v, along v x u where that is defined.
    least = v.detach().abs().argmin(-1)
    other = torch.nn.functional.one_hot(least, 3).to(v.dtype)
    axis = torch.cross(v, u, dim=-1)
    fallback = torch.cross(v, other, dim=-1)
    tiny = axis.detach().norm(dim=-1, keepdim=True) <= torch.finfo(v.dtype).eps
    axis = unit_vectors(torch.where(tiny, fallback, axis))
    half_turn = 2 * axis[:, :, None] * axis[:, None, :] - eye
    opposite = (v * u).sum(-1) < 0
    # half_turn v is -v up to the rounding of the axis; the small rotation takes it to u
    turned = (half_turn @ v[..., None])[..., 0]
    return torch.where(opposite[:, None, None], small(turned, u) @ half_turn, small(v, u))


@compiled_helper
def skew_twin(v: np.ndarray) -> np.ndarray:
    """Compiled twin of :func:`skew` for one ``(3,)`` vector: ``(3, 3)`` ``[v]x``."""
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


@compiled_helper
def norm3_twin(v: np.ndarray) -> float:
    """``|v|`` of a ``(3,)`` array (compiled helper)."""
    return math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


@compiled_helper
def _small_rotation_twin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``I + K + K^2 / (1 + a.b)``, ``K = [a x b]x`` (compiled helper of the twin below)."""
    K = skew_twin(np.cross(a, b))
    c = max(a[0] * b[0] + a[1] * b[1] + a[2] * b[2], 0.0)
    return np.eye(3) + K + (K @ K) / (1.0 + c)


@compiled_helper
def rotation_between_twin(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Compiled twin of :func:`rotation_between` for unit vectors ``v``, ``u`` ``(3,)``."""
    if v[0] * u[0] + v[1] * u[1] + v[2] * u[2] >= 0:
        return _small_rotation_twin(v, u)
    axis = np.cross(v, u)
    if norm3_twin(axis) <= _EPS64:
        other = np.zeros(3)
        other[np.argmin(np.abs(v))] = 1.0
        axis = np.cross(v, other)
    axis = axis / norm3_twin(axis)
    half_turn = 2.0 * np.outer(axis, axis) - np.eye(3)
    # half_turn v is -v up to the rounding of the axis; the small rotation takes it to u
    return _small_rotation_twin(half_turn @ v, u) @ half_turn


def random_rotation(
    batch: int | None = None,
    max_angle_deg: float = 180.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rotations about uniformly random axes by angles uniform in [0, max_angle_deg]."""
    shape = (1,) if batch is None else (batch,)
    axis = torch.randn(*shape, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.rand(*shape, 1, generator=generator, dtype=torch.float64) * np.deg2rad(
        max_angle_deg
    )
    import roma  # here: importing roma loads torch._dynamo (seconds)

    R = roma.rotvec_to_rotmat(axis * angle).to(dtype)
    return R[0] if batch is None else R


def rotation_angle_deg(R: Tensor) -> Tensor:
    """Geodesic angle of rotation matrices ``(..., 3, 3)`` in degrees.

    ``atan2(sin, cos)`` with ``sin`` from the skew part and ``cos`` from the trace: accurate at
    small angles, where ``arccos`` of the trace loses all precision (float32: 0.03 deg floor).
    """
    asym = R - R.transpose(-1, -2)
    sin = torch.stack([asym[..., 2, 1], asym[..., 0, 2], asym[..., 1, 0]], -1).norm(dim=-1) / 2
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


# --------------------------------------------------------------------------------------------
# Depth maps
# --------------------------------------------------------------------------------------------


def check_intrinsics(intrinsics: Tensor, batch: int | None = None) -> Tensor:
    """Validate pinhole intrinsics and return them as ``(B or 1, 3, 3)``."""
    if not isinstance(intrinsics, Tensor):
        intrinsics = torch.as_tensor(np.asarray(intrinsics))
    if intrinsics.shape[-2:] != (3, 3) or intrinsics.dim() not in (2, 3):
        raise ValueError(
            f"intrinsics must be a (3, 3) or (B, 3, 3) pinhole matrix, got shape {tuple(intrinsics.shape)}"
        )
    K = intrinsics if intrinsics.dim() == 3 else intrinsics[None]
    if batch is not None and K.shape[0] not in (1, batch):
        raise ValueError(f"intrinsics has batch {K.shape[0]} but there are {batch} depth maps")
    if not torch.isfinite(K).all():
        raise ValueError("intrinsics contains NaN or inf; pass finite fx, fy, cx, cy")
    fx, fy = K[:, 0, 0], K[:, 1, 1]
    if (fx <= 0).any() or (fy <= 0).any():
        raise ValueError("intrinsics must have positive focal lengths fx = K[0,0] and fy = K[1,1]")
    off = K.clone()
    off[:, 0, 0] = off[:, 1, 1] = off[:, 0, 2] = off[:, 1, 2] = 0
    off[:, 2, 2] -= 1
    if off.abs().amax() > 1e-6:
        raise ValueError(
            "intrinsics must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (no skew, last row 0 0 1)"
        )
    return K


def depth_to_points(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Back-project depth maps to camera-frame points.

    Args:
        depth: ``(H, W)`` or ``(B, H, W)`` z-depth; 0 marks an invalid pixel.
        intrinsics: ``(3, 3)`` or ``(B, 3, 3)``.
    Returns:
        ``(..., H, W, 3)`` points (invalid pixels give ``(0, 0, 0)``); differentiable in ``depth``.
    """
    unbatched = depth.dim() == 2
    d = depth[None] if unbatched else depth
    B, H, W = d.shape
    K = check_intrinsics(intrinsics, B).to(d)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=d.dtype, device=d.device),
        torch.arange(W, dtype=d.dtype, device=d.device),
        indexing="ij",
    )
    fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
    cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    x = (u - cx) / fx * d
    y = (v - cy) / fy * d
    pts = torch.stack([x, y, d], dim=-1)
    return pts[0] if unbatched else pts


def points_to_pixels(points: Tensor, intrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Project camera-frame ``points`` ``(B, N, 3)`` to continuous pixels ``(B, N, 2)`` ``(u, v)``.

    Returns the pixels and the depth ``z`` ``(B, N)``; points with ``z <= 0`` get pixel ``-1``.
    """
    K = check_intrinsics(intrinsics, points.shape[0]).to(points)
    z = points[..., 2]
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    u = K[:, None, 0, 0] * points[..., 0] / safe_z + K[:, None, 0, 2]
    v = K[:, None, 1, 1] * points[..., 1] / safe_z + K[:, None, 1, 2]
    uv = torch.stack([u, v], dim=-1)
    return torch.where((z > 0)[..., None], uv, torch.full_like(uv, -1.0)), z


def depth_normals(points_map: Tensor, valid: Tensor | None = None) -> Tensor:
    """Normals of an organised point map ``(..., H, W, 3)`` by central differences.

    Normals face the camera (negative z component). Pixels whose neighbours are invalid get
    a zero normal. ``valid`` defaults to ``z > 0``.
    """
    if valid is None:
        valid = points_map[..., 2] > 0
    p = points_map
    pad = torch.nn.functional.pad
    # Central differences along rows and columns; pad so the output keeps the map's size.
    pc = pad(p.movedim(-1, -3), (1, 1, 1, 1), mode="replicate").movedim(-3, -1)
    vc = pad(valid.to(p.dtype)[..., None, :, :], (1, 1, 1, 1))[..., 0, :, :] > 0
    du = pc[..., 1:-1, 2:, :] - pc[..., 1:-1, :-2, :]
    dv = pc[..., 2:, 1:-1, :] - pc[..., :-2, 1:-1, :]
    n = torch.cross(du, dv, dim=-1)
    ok = valid & vc[..., 1:-1, 2:] & vc[..., 1:-1, :-2] & vc[..., 2:, 1:-1] & vc[..., :-2, 1:-1]
    norm = n.norm(dim=-1, keepdim=True)
    ok = ok & (norm[..., 0] > 0)
    n = n / norm.clamp_min(torch.finfo(p.dtype).tiny)
    n = torch.where((n[..., 2:3] > 0), -n, n)
    return torch.where(ok[..., None], n, torch.zeros_like(n))
