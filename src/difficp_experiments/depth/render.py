"""Depth-map rendering of a triangle mesh with Open3D's ``RaycastingScene``.

Camera conventions follow :mod:`difficp.geometry`: pinhole intrinsics
``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``, pixel ``(u, v)`` = (column, row), the camera looks
along its +z axis with +x right and +y down. A camera pose is a ``(4, 4)`` camera-to-world
matrix ``T_cw`` (``p_world = p_cam @ R.T + t``).

The renderer casts one ray per pixel with direction ``((u - cx)/fx, (v - cy)/fy, 1)`` in camera
coordinates. That direction has unit z, so Open3D's hit distance (measured in units of the
direction's length) *is* the z-depth that :func:`difficp.geometry.depth_to_points` expects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

BODY_MESH = Path("scans") / "human" / "makehuman_hm08_body_2m.obj"


def pinhole_intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """``(3, 3)`` float64 intrinsics with square pixels and vertical field of view ``fov_deg``.

    The principal point is the image centre in pixel-index coordinates, ``((W-1)/2, (H-1)/2)``.
    """
    f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return np.array(
        [[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], dtype=np.float64
    )


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """``(4, 4)`` camera-to-world pose of a camera at ``eye`` looking at ``target``.

    The camera's +y (image down) is aligned with ``-up`` as far as possible (default up = +Y,
    the body mesh's vertical axis). ``eye`` and ``target`` are ``(3,)`` world points.
    """
    up = np.array([0.0, 1.0, 0.0]) if up is None else np.asarray(up, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - np.asarray(eye, dtype=np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(-up, z)  # right = down x forward for a right-handed x-right/y-down/z-forward frame
    n = np.linalg.norm(x)
    if n < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to `up`; pass another `up`")
    x /= n
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = eye
    return T


def camera_rays(intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` camera-frame ray directions with unit z component (see module docstring)."""
    v, u = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    K = intrinsics
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)


def _open3d() -> Any:
    """Open3D, typed Any: its bundled stubs disagree with it (no ndarray constructor for
    ``core.Tensor``, no ``str`` path for ``read_triangle_mesh``)."""
    import open3d  # here: only rendering needs it

    return open3d


class DepthRenderer:
    """Render z-depth maps of one static triangle mesh from arbitrary pinhole cameras.

    Args:
        vertices: ``(V, 3)`` mesh vertices (world frame, metres).
        triangles: ``(F, 3)`` vertex indices.
        nthreads: Embree threads per cast (1 by default: the machine is shared and the
            training loop renders small images, where threading does not pay).

    Moving the object instead of the camera is done by moving the camera the other way:
    the depth of ``P·mesh`` seen from ``T_cw`` equals the depth of ``mesh`` seen from
    ``P^-1 T_cw`` (a rigid motion keeps distances along the ray).
    """

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray, nthreads: int = 1) -> None:
        o3d = _open3d()

        self.vertices = np.ascontiguousarray(vertices, dtype=np.float32)
        self.triangles = np.ascontiguousarray(triangles, dtype=np.uint32)
        self.nthreads = nthreads
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(o3d.core.Tensor(self.vertices), o3d.core.Tensor(self.triangles))
        self._rays: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_file(cls, path: str | Path, nthreads: int = 1) -> DepthRenderer:
        """Read a mesh file (OBJ, PLY, ...) with Open3D."""
        o3d = _open3d()

        mesh = o3d.io.read_triangle_mesh(str(path))
        if len(mesh.triangles) == 0:
            raise ValueError(f"{path}: no triangles read (is it a mesh file?)")
        return cls(np.asarray(mesh.vertices), np.asarray(mesh.triangles), nthreads=nthreads)

    def render(
        self, cam_to_world: np.ndarray, intrinsics: np.ndarray, width: int, height: int
    ) -> np.ndarray:
        """``(H, W)`` float32 z-depth (m) seen from ``cam_to_world``; 0 where nothing is hit."""
        o3d = _open3d()

        key = (width, height, *np.round(intrinsics[:2].ravel(), 9))
        dirs = self._rays.get(key)
        if dirs is None:
            dirs = self._rays[key] = camera_rays(intrinsics, width, height)
        R, t = cam_to_world[:3, :3], cam_to_world[:3, 3]
        rays = np.empty((height, width, 6), dtype=np.float32)
        rays[..., :3] = t
        rays[..., 3:] = dirs @ R.T
        hit = self._scene.cast_rays(o3d.core.Tensor(rays), nthreads=self.nthreads)["t_hit"].numpy()
        return np.where(np.isfinite(hit), hit, 0.0).astype(np.float32)
