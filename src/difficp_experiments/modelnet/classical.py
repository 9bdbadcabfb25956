"""Classical baselines through Open3D: point-to-point ICP and FPFH + Fast Global Registration.

Both work one pair at a time (Open3D has no batch API) on ``(N, 3)`` float arrays and return a
``(4, 4)`` float64 transform mapping the source into the target. Settings suit ModelNet shapes
scaled into the unit sphere with about 1024 points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Open3D is an optional dependency (the ``experiments`` extra); typed Any, because its bundled
# stubs disagree with it (they call compute_fpfh_feature's optional ``indices`` required).
o3d: Any
try:
    import open3d as o3d
except ImportError:  # pragma: no cover - depends on the installation
    o3d = None


def _require_open3d() -> None:
    if o3d is None:
        raise ImportError("open3d is needed for open3d_icp / open3d_fgr: pip install open3d")


def _cloud(points: np.ndarray) -> o3d.geometry.PointCloud:
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64))
    return pc


def open3d_icp(
    source: np.ndarray,
    target: np.ndarray,
    init: np.ndarray | None = None,
    max_distance: float = 2.0,
    max_iterations: int = 50,
) -> np.ndarray:
    """Open3D point-to-point ICP from ``init`` (identity). ``max_distance`` 2.0 keeps every pair
    of a unit-sphere shape, i.e. plain ICP without rejection (as the ``icp`` method)."""
    _require_open3d()
    init = np.eye(4) if init is None else np.asarray(init, dtype=np.float64)
    result = o3d.pipelines.registration.registration_icp(
        _cloud(source),
        _cloud(target),
        max_distance,
        init,
        o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=max_iterations),
    )
    return np.asarray(result.transformation)


def fpfh(
    points: np.ndarray, normal_radius: float, feature_radius: float
) -> tuple[o3d.geometry.PointCloud, o3d.pipelines.registration.Feature]:
    """Cloud with estimated normals and its FPFH features."""
    pc = _cloud(points)
    pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=normal_radius, max_nn=30))
    feat = o3d.pipelines.registration.compute_fpfh_feature(
        pc, o3d.geometry.KDTreeSearchParamHybrid(radius=feature_radius, max_nn=100)
    )
    return pc, feat


def open3d_fgr(
    source: np.ndarray,
    target: np.ndarray,
    normal_radius: float = 0.1,
    feature_radius: float = 0.25,
    max_correspondence_distance: float = 0.05,
) -> np.ndarray:
    """FPFH features + Fast Global Registration (Zhou et al. 2016), Open3D's implementation.

    Radii are in unit-sphere units: normals from 0.1 neighbourhoods, FPFH from 0.25 (about 5x the
    ~0.05 point spacing of 1024 points), the FGR inlier distance 0.05.
    """
    _require_open3d()
    src, f_src = fpfh(source, normal_radius, feature_radius)
    tgt, f_tgt = fpfh(target, normal_radius, feature_radius)
    option = o3d.pipelines.registration.FastGlobalRegistrationOption(
        maximum_correspondence_distance=max_correspondence_distance
    )
    result = o3d.pipelines.registration.registration_fgr_based_on_feature_matching(
        src, tgt, f_src, f_tgt, option
    )
    return np.asarray(result.transformation)
