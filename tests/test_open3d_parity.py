"""Parity with Open3D's registration_icp: same init, same criteria, same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difficp
from difficp.geometry import make_transform, random_rotation

from conftest import make_pair

o3d = pytest.importorskip("open3d")
reg = o3d.pipelines.registration

ESTIMATORS = {
    "point_to_point": reg.TransformationEstimationPointToPoint,
    "point_to_plane": reg.TransformationEstimationPointToPlane,
}


def _cloud(points: np.ndarray, normals: np.ndarray | None = None):
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    if normals is not None:
        pc.normals = o3d.utility.Vector3dVector(normals)
    return pc


def _perturbation(angle_deg: float, translation: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    R = random_rotation(max_angle_deg=angle_deg, generator=g, dtype=torch.float64)
    # exactly angle_deg about a random axis
    import roma

    R = roma.rotvec_to_rotmat(axis / axis.norm() * np.deg2rad(angle_deg))
    t = torch.randn(3, generator=g, dtype=torch.float64)
    return make_transform(R, t / t.norm() * translation).numpy()


def _compare(
    src, tgt, tgt_normals, init, metric: str, max_distance: float
) -> tuple[float, float, float]:
    source, target = _cloud(src), _cloud(tgt, tgt_normals)
    criteria = reg.ICPConvergenceCriteria(
        relative_fitness=1e-10, relative_rmse=1e-10, max_iteration=60
    )
    ref = reg.registration_icp(source, target, max_distance, init, ESTIMATORS[metric](), criteria)
    ours = difficp.icp(
        torch.from_numpy(src),
        torch.from_numpy(tgt),
        init=torch.from_numpy(init),
        target_normals=torch.from_numpy(tgt_normals),
        metric=metric,
        max_distance=max_distance,
        max_iterations=60,
        relative_fitness=1e-10,
        relative_rmse=1e-10,
        differentiation="none",
    )
    T = ours.transform.numpy()
    evaluation = reg.evaluate_registration(source, target, max_distance, T)
    return (
        float(np.abs(T - ref.transformation).max()),
        abs(float(ours.fitness) - evaluation.fitness),
        abs(float(ours.inlier_rmse) - evaluation.inlier_rmse),
    )


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
def test_parity_on_3dmatch_fragments(data_dir, metric: str) -> None:
    folder = data_dir / "scans" / "open3d_3dmatch_pair"
    source = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_0.pcd"))
    target = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_1.pcd"))
    init = _perturbation(5.0, 0.05, seed=0)
    diff_T, diff_fit, diff_rmse = _compare(
        np.asarray(source.points),
        np.asarray(target.points),
        np.asarray(target.normals),
        init,
        metric,
        max_distance=0.05,
    )
    assert diff_T < 1e-5 and diff_fit < 1e-6 and diff_rmse < 1e-6, (diff_T, diff_fit, diff_rmse)


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_on_synthetic_pairs(metric: str, seed: int) -> None:
    p = make_pair(20 + seed, n=2000, angle=10, translation=0.1, noise=0.01, overlap=0.8)
    init = _perturbation(3.0, 0.02, seed)
    diff_T, diff_fit, diff_rmse = _compare(
        p["source"].numpy(), p["target"].numpy(), p["target_normals"].numpy(), init, metric, 0.1
    )
    assert diff_T < 1e-5 and diff_fit < 1e-6 and diff_rmse < 1e-6, (diff_T, diff_fit, diff_rmse)
