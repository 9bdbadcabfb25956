"""Round trips between difficp and the point-cloud containers users hold."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from difficp.interop import as_points, to_open3d, to_trimesh
from difficp.io import PointCloudData


@pytest.fixture
def cloud() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3))
    normals = rng.normal(size=(50, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return points, normals, rng.uniform(size=(50, 3))


def test_numpy_and_tensor_inputs_keep_values_and_take_dtype(cloud) -> None:
    points, _, _ = cloud
    from_numpy = as_points(points)
    assert from_numpy.points.dtype == torch.float64
    np.testing.assert_array_equal(from_numpy.points.numpy(), points)
    as_float32 = as_points(torch.from_numpy(points), dtype=torch.float32)
    assert as_float32.points.dtype == torch.float32
    assert as_points(np.zeros((4, 3), dtype=np.int64)).points.is_floating_point()


@pytest.mark.parametrize("tensor_api", [False, True])
def test_open3d_round_trip_keeps_points_normals_colors(cloud, tensor_api: bool) -> None:
    pytest.importorskip("open3d")
    points, normals, colors = cloud
    o3d_cloud = to_open3d(points, normals, colors, tensor_api=tensor_api)
    back = as_points(o3d_cloud)
    np.testing.assert_allclose(back.points.numpy(), points)
    np.testing.assert_allclose(back.normals.numpy(), normals)
    np.testing.assert_allclose(back.colors.numpy(), colors)


def test_open3d_cloud_without_normals_gives_none(cloud) -> None:
    pytest.importorskip("open3d")
    back = as_points(to_open3d(torch.from_numpy(cloud[0])))
    assert back.normals is None and back.colors is None


def test_trimesh_point_cloud_and_mesh(cloud) -> None:
    trimesh = pytest.importorskip("trimesh")
    points, _, colors = cloud
    back = as_points(to_trimesh(points, colors))
    np.testing.assert_allclose(back.points.numpy(), points)
    np.testing.assert_allclose(back.colors.numpy(), colors, atol=1 / 255)  # stored as uint8
    box = trimesh.creation.box()
    mesh = as_points(box)
    assert mesh.points.shape == (8, 3) and mesh.normals.shape == (8, 3)


def test_read_only_arrays_are_copied_not_shared() -> None:
    frozen = np.arange(12, dtype=np.float32).reshape(4, 3)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when it wraps a non-writable array
        points = as_points(frozen).points
    points += 1  # must not reach the caller's (read-only) array
    np.testing.assert_array_equal(frozen, np.arange(12).reshape(4, 3))
    writable = np.zeros((4, 3), dtype=np.float32)
    assert as_points(writable).points.data_ptr() == writable.ctypes.data  # no needless copy


def test_pytorch3d_style_padded_batch_gives_lengths() -> None:
    class FakePointclouds:  # the two methods difficp relies on, as PyTorch3D names them
        def points_padded(self) -> torch.Tensor:
            return torch.ones(2, 5, 3)

        def num_points_per_cloud(self) -> torch.Tensor:
            return torch.tensor([5, 3])

    batch = as_points(FakePointclouds())
    assert batch.points.shape == (2, 5, 3)
    assert batch.lengths.tolist() == [5, 3]


def test_difficp_io_cloud(cloud) -> None:
    points, normals, colors = cloud
    back = as_points(PointCloudData(points, normals, colors))
    np.testing.assert_array_equal(back.normals.numpy(), normals)


def test_unsupported_type_names_what_is_accepted() -> None:
    with pytest.raises(TypeError, match="Open3D PointCloud"):
        as_points({"points": [1, 2, 3]})


def test_to_open3d_refuses_batches() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        to_open3d(np.zeros((2, 5, 3)))


def test_interop_imports_neither_open3d_nor_trimesh() -> None:
    code = (
        "import sys, numpy as np; from difficp.interop import as_points; as_points(np.ones((3, 3)));"
        "print([m for m in ('open3d', 'trimesh') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
