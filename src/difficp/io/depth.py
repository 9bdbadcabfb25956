"""Depth images and pinhole intrinsics.

Depth images are single-channel rasters of z-depth, 0 marking a missing measurement:
16-bit PNG in sensor units (millimetres for Redwood / PrimeSense / Kinect, ``depth_scale``
1000; TUM RGB-D uses 5000 per metre) or ``.npy`` arrays (``depth_scale`` 1 for metres).
PNG decoding uses Pillow, imported only when a PNG is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from difficp.io.cloud import PathLike, check_readable

DEPTH_EXTENSIONS = (".png", ".npy")


def read_depth(path: PathLike, depth_scale: float = 1000.0) -> np.ndarray:
    """A depth image as ``(H, W)`` float64 depths (stored value / ``depth_scale``; 0 = invalid).

    Raises ``ValueError`` (naming the file) for a multi-channel image, negative or non-finite
    depths or a non-positive ``depth_scale``.
    """
    path = Path(path)
    if not np.isfinite(depth_scale) or depth_scale <= 0:
        raise ValueError(f"depth_scale must be a positive number, got {depth_scale!r}")
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        raw = _read_png(path)
    elif suffix == ".npy":
        raw = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"{path}: unknown depth-image extension; use one of {DEPTH_EXTENSIONS}")
    if raw.ndim != 2 or raw.dtype.kind not in "uif":
        raise ValueError(
            f"{path}: a depth image must be one channel of numbers, got shape {raw.shape} "
            f"and dtype {raw.dtype}"
        )
    depth = raw.astype(np.float64) / depth_scale
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise ValueError(f"{path}: depths must be finite and >= 0 (0 marks a missing pixel)")
    return depth


def _read_png(path: Path) -> np.ndarray:
    try:
        from PIL import Image  # here: optional, the [depth] extra
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError(
            f"{path}: reading PNG depth images needs Pillow: pip install 'difficp[depth]'"
        ) from None
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except OSError as err:
        raise ValueError(f"{path}: not a readable PNG ({err})") from None


def read_intrinsics(source: PathLike | Sequence[float]) -> np.ndarray:
    """A ``(3, 3)`` pinhole matrix from ``(fx, fy, cx, cy)`` or a JSON file.

    JSON: Open3D's ``PinholeCameraIntrinsic`` layout (``"intrinsic_matrix"``: 9 numbers, column
    major, as Redwood's ``camera_primesense.json``) or an object with ``fx, fy, cx, cy``.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        check_readable(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON file ({err})") from None
        if isinstance(data, dict) and "intrinsic_matrix" in data:
            K = np.asarray(data["intrinsic_matrix"], dtype=np.float64)
            if K.size != 9:
                raise ValueError(f"{path}: intrinsic_matrix must hold 9 numbers, got {K.size}")
            return _check_intrinsics(str(path), K.reshape(3, 3).T)
        if isinstance(data, dict) and {"fx", "fy", "cx", "cy"} <= data.keys():
            values = [data[k] for k in ("fx", "fy", "cx", "cy")]
            return _check_intrinsics(str(path), _matrix(values))
        raise ValueError(f"{path}: expected 'intrinsic_matrix' or fx, fy, cx, cy")
    values = list(source)
    if len(values) != 4:
        raise ValueError(f"intrinsics must be fx fy cx cy (4 numbers), got {len(values)}")
    return _check_intrinsics("intrinsics", _matrix(values))


def _matrix(values: Sequence[float]) -> np.ndarray:
    fx, fy, cx, cy = (float(v) for v in values)
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _check_intrinsics(name: str, K: np.ndarray) -> np.ndarray:
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{name}: focal lengths must be positive and finite, got {K.tolist()}")
    if not np.allclose(K[2], [0, 0, 1]):
        raise ValueError(f"{name}: the last row of a pinhole matrix is 0 0 1, got {K[2].tolist()}")
    return K


__all__ = ["DEPTH_EXTENSIONS", "read_depth", "read_intrinsics"]
