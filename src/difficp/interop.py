"""Point clouds in and out of the containers users already hold, without importing them.

Accepted inputs (:func:`as_points`): a ``torch.Tensor`` or ``numpy`` array ``(N, 3)`` /
``(B, N, 3)``, an Open3D ``geometry.PointCloud`` (legacy) or ``t.geometry.PointCloud`` (tensor),
a ``trimesh.PointCloud`` or ``trimesh.Trimesh`` (its vertices), a :class:`difficp.io.PointCloudData`,
and PyTorch3D-style ``Pointclouds`` (anything with ``points_padded()`` and
``num_points_per_cloud()``), which give a padded ``(B, N, 3)`` batch plus its ``(B,)`` lengths —
the same convention as :func:`difficp.icp`'s ``source_lengths`` / ``target_lengths``.

Open3D and trimesh are recognised by their type's module name, so this module imports neither;
:func:`to_open3d` and :func:`to_trimesh` import them only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class Cloud:
    """Points with optional per-point normals and colours, as torch tensors.

    Attributes:
        points: ``(N, 3)`` or padded ``(B, N, 3)``.
        normals: same shape as ``points``, or None.
        colors: same shape as ``points``, RGB in ``[0, 1]``, or None.
        lengths: ``(B,)`` valid counts of a padded batch, or None.
    """

    points: Tensor
    normals: Tensor | None = None
    colors: Tensor | None = None
    lengths: Tensor | None = None


def _library(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def _tensor(value: Any, dtype: torch.dtype | None, device: Any) -> Tensor:
    if isinstance(value, Tensor):
        t = value
    else:
        array = np.asarray(value)
        # A read-only array (trimesh's cached vertices) would be shared by a tensor that
        # PyTorch lets the caller write to; copy it instead.
        t = torch.as_tensor(array if array.flags.writeable else array.copy())
    if dtype is None and not t.is_floating_point():
        dtype = torch.get_default_dtype()
    return t.to(dtype=dtype, device=device)


def _optional(value: Any, dtype: torch.dtype | None, device: Any) -> Tensor | None:
    return None if value is None else _tensor(value, dtype, device)


def _from_pytorch3d(obj: Any) -> tuple[Any, Any, Any, Any]:
    normals = obj.normals_padded() if hasattr(obj, "normals_padded") else None
    return obj.points_padded(), normals, None, obj.num_points_per_cloud()


def _from_open3d_tensor(obj: Any) -> tuple[Any, Any, Any, Any]:
    attrs = obj.point

    def get(key: str) -> np.ndarray | None:
        return attrs[key].numpy() if key in attrs else None

    return get("positions"), get("normals"), get("colors"), None


def _from_open3d_legacy(obj: Any) -> tuple[Any, Any, Any, Any]:
    normals = np.asarray(obj.normals) if obj.has_normals() else None
    colors = np.asarray(obj.colors) if obj.has_colors() else None
    return np.asarray(obj.points), normals, colors, None


def _from_trimesh_mesh(obj: Any) -> tuple[Any, Any, Any, Any]:
    return np.asarray(obj.vertices), np.asarray(obj.vertex_normals), None, None


def _from_trimesh_cloud(obj: Any) -> tuple[Any, Any, Any, Any]:
    colors = getattr(obj, "colors", None)
    has_colors = colors is not None and len(colors) == len(obj.vertices)
    rgb = np.asarray(colors)[:, :3] / 255.0 if has_colors else None
    return np.asarray(obj.vertices), None, rgb, None


def _from_difficp(obj: Any) -> tuple[Any, Any, Any, Any]:
    return obj.points, obj.normals, obj.colors, None


def _converter(obj: Any) -> Any:
    """The function that unpacks ``obj`` into (points, normals, colors, lengths), or None."""
    if hasattr(obj, "points_padded") and hasattr(obj, "num_points_per_cloud"):
        return _from_pytorch3d
    by_type = {
        ("open3d", "PointCloud"): _from_open3d_tensor if hasattr(obj, "point") else None,
        ("trimesh", "Trimesh"): _from_trimesh_mesh,
        ("trimesh", "PointCloud"): _from_trimesh_cloud,
        ("difficp", "PointCloudData"): _from_difficp,
    }
    converter = by_type.get((_library(obj), type(obj).__name__))
    if converter is None and _library(obj) == "open3d" and type(obj).__name__ == "PointCloud":
        return _from_open3d_legacy
    return converter


def as_points(obj: Any, dtype: torch.dtype | None = None, device: Any = None) -> Cloud:
    """A :class:`Cloud` from any supported container (see the module docstring).

    ``dtype`` / ``device`` default to the input's (float64 for Open3D legacy and trimesh, whose
    arrays are float64). Raises ``TypeError`` for an unsupported type, naming what is accepted.
    """
    if isinstance(obj, Tensor | np.ndarray):
        return Cloud(_tensor(obj, dtype, device))
    converter = _converter(obj)
    if converter is None:
        raise TypeError(
            f"cannot read points from a {type(obj).__module__}.{type(obj).__name__}: pass a "
            "torch tensor or numpy array (N, 3) / (B, N, 3), an Open3D PointCloud (legacy or "
            "tensor), a trimesh PointCloud or Trimesh, a difficp.io.PointCloudData, or "
            "PyTorch3D-style Pointclouds"
        )
    points, normals, colors, lengths = converter(obj)
    return Cloud(
        _tensor(points, dtype, device),
        _optional(normals, dtype, device),
        _optional(colors, dtype, device),
        None if lengths is None else _tensor(lengths, torch.long, device),
    )


def _numpy(value: Tensor | np.ndarray | None) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"expected one cloud of shape (N, 3), got {tuple(array.shape)}")
    return array


def to_open3d(
    points: Tensor | np.ndarray,
    normals: Tensor | np.ndarray | None = None,
    colors: Tensor | np.ndarray | None = None,
    *,
    tensor_api: bool = False,
) -> Any:
    """An Open3D point cloud (legacy ``geometry.PointCloud``, or ``t.geometry.PointCloud`` with
    ``tensor_api=True``) from ``(N, 3)`` points and optional normals / colours (detached)."""
    import open3d as o3d  # here: optional (not a requirement of difficp)

    pts, nrm, col = _numpy(points), _numpy(normals), _numpy(colors)
    assert pts is not None
    if tensor_api:
        # open3d's type stubs omit Tensor's ndarray constructor (it copies the array)
        as_tensor: Any = o3d.core.Tensor
        tensor_cloud = o3d.t.geometry.PointCloud(as_tensor(pts))
        if nrm is not None:
            tensor_cloud.point.normals = as_tensor(nrm)
        if col is not None:
            tensor_cloud.point.colors = as_tensor(col)
        return tensor_cloud
    cloud: Any = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    if nrm is not None:
        cloud.normals = o3d.utility.Vector3dVector(nrm)
    if col is not None:
        cloud.colors = o3d.utility.Vector3dVector(col)
    return cloud


def to_trimesh(points: Tensor | np.ndarray, colors: Tensor | np.ndarray | None = None) -> Any:
    """A ``trimesh.PointCloud`` from ``(N, 3)`` points and optional RGB colours in ``[0, 1]``."""
    import trimesh  # here: optional (not a requirement of difficp)

    pts, col = _numpy(points), _numpy(colors)
    rgba = None if col is None else np.concatenate([col, np.ones((len(col), 1))], 1) * 255
    return trimesh.PointCloud(pts, colors=None if rgba is None else rgba.astype(np.uint8))


__all__ = ["Cloud", "as_points", "to_open3d", "to_trimesh"]
