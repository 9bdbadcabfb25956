"""Point-cloud and transform files, in pure numpy (Open3D is not needed).

Formats, chosen by the file extension:

- ``.ply``: ``ascii``, ``binary_little_endian`` and ``binary_big_endian``. The ``vertex`` element's
  ``x y z`` are the points, ``nx ny nz`` the normals and ``red green blue`` the colours; every other
  property (and every other element, e.g. ``face`` lists) is skipped by its declared type.
- ``.pcd``: ``DATA ascii``, ``binary`` and ``binary_compressed`` (LZF). Fields ``x y z``, optional
  ``normal_x normal_y normal_z`` and ``rgb``/``rgba``; other fields (``curvature``, histograms
  with ``COUNT`` > 1, ...) are skipped by their ``SIZE``/``TYPE``/``COUNT``.
- ``.xyz``, ``.xyzn``, ``.txt``: whitespace-separated columns, 3 (points) or 6 (points + normals).
  Lines starting with ``#`` are comments.
- ``.npy``: an ``(N, 3)`` or ``(N, 6)`` array.

Transforms are 4x4 homogeneous matrices stored as 4 lines of 4 whitespace-separated numbers
(:func:`read_transform` / :func:`write_transform`), mapping source points into the target frame.

Every problem with a file (unknown extension, malformed header, wrong column count, truncated
data) raises a ``ValueError`` whose message names the file and the problem. Files are written
atomically (a temporary file, synced, then renamed): a failed write leaves no partial file.

Modules: ``cloud`` (:class:`PointCloudData`, shared helpers), ``ply``, ``pcd`` (with ``lzf``),
``text`` (columns and ``.npy``), ``transform``; this one chooses by extension.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from difficp._atomic import atomic_open
from difficp.io import pcd, ply, text
from difficp.io.cloud import (
    POINT_CLOUD_EXTENSIONS,
    PathLike,
    PointCloudData,
    check_readable,
    extension,
)
from difficp.io.depth import DEPTH_EXTENSIONS, read_depth, read_intrinsics
from difficp.io.transform import read_transform, write_transform
from difficp.io.transform import transform_writer as transform_writer  # for the CLI

__all__ = [
    "DEPTH_EXTENSIONS",
    "POINT_CLOUD_EXTENSIONS",
    "PointCloudData",
    "read_depth",
    "read_intrinsics",
    "read_point_cloud",
    "read_transform",
    "write_point_cloud",
    "write_transform",
]


def read_point_cloud(path: PathLike, *, remove_non_finite: bool = False) -> PointCloudData:
    """Read a point cloud (points, and normals/colours when the file has them).

    Args:
        path: a ``.ply``, ``.pcd``, ``.xyz``/``.xyzn``/``.txt`` or ``.npy`` file.
        remove_non_finite: drop points whose position or normal is NaN/inf (organised PCDs
            mark missing pixels that way).
    Returns:
        :class:`PointCloudData` with ``points`` ``(N, 3)`` float64, ``normals`` ``(N, 3)`` or
        None, ``colors`` ``(N, 3)`` in [0, 1] or None.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, malformed header, wrong column count, truncated data.
    """
    path = Path(path)
    ext = extension(path)
    check_readable(path)
    if ext == ".ply":
        cloud = ply.read_ply(path)
    elif ext == ".pcd":
        cloud = pcd.read_pcd(path)
    elif ext == ".npy":
        cloud = text.read_npy(path)
    else:
        cloud = text.read_text(path)
    return cloud.finite() if remove_non_finite else cloud


def write_point_cloud(
    path: PathLike,
    points: Any,
    normals: Any = None,
    colors: Any = None,
    *,
    ascii: bool = False,
    double: bool | None = None,
) -> None:
    """Write a point cloud; the format follows the extension of ``path``.

    Args:
        path: ``.ply``, ``.pcd``, ``.xyz``/``.xyzn``/``.txt`` or ``.npy``.
        points: ``(N, 3)`` numpy array or torch tensor.
        normals: optional ``(N, 3)``.
        colors: optional ``(N, 3)`` in [0, 1]; kept by PLY (uchar) and PCD (packed rgb) only.
        ascii: PLY/PCD as text instead of binary (text formats are always text).
        double: store PLY/PCD coordinates and normals as float64 (True) or float32 (False).
            None picks each format's custom: float64 for PLY (as Open3D writes it), float32 for
            PCD (PCL's convention; Open3D's binary PCD reader does not read 8-byte floats).
            ``.xyz``/``.txt``/``.npy`` always keep float64.
    """
    path = Path(path)
    extension(path)  # an unknown extension is named before a bad array
    cloud = PointCloudData.checked(points, normals, colors)
    write = point_cloud_writer(path, cloud, ascii=ascii, double=double)
    with atomic_open(path) as f:
        write(f)


def point_cloud_writer(
    path: PathLike, cloud: PointCloudData, *, ascii: bool = False, double: bool | None = None
) -> Callable[[IO[bytes]], None]:
    """The function that writes ``cloud`` (from :meth:`PointCloudData.checked`) as
    :func:`write_point_cloud` does, in ``path``'s format, to a binary file object (for writing
    several files at once with :class:`difficp._atomic.AtomicFiles`)."""
    ext = extension(Path(path))
    pts, nrm, col = cloud.points, cloud.normals, cloud.colors

    def write(f: IO[bytes]) -> None:
        if ext == ".ply":
            ply.write_ply(f, pts, nrm, col, ascii, "<f4" if double is False else "<f8")
        elif ext == ".pcd":
            pcd.write_pcd(f, pts, nrm, col, ascii, "<f8" if double else "<f4")
        else:
            table = pts if nrm is None else np.concatenate([pts, nrm], axis=1)
            if ext == ".npy":
                np.save(f, table)
            else:
                np.savetxt(f, table, fmt="%.17g", delimiter=" ")

    return write
