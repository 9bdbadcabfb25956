"""The in-memory point cloud of :mod:`difficp.io` and the helpers its formats share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike

POINT_CLOUD_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".txt", ".npy")


@dataclass
class PointCloudData:
    """A point cloud read from a file.

    Attributes:
        points: ``(N, 3)`` float64 positions.
        normals: ``(N, 3)`` float64 normals as stored in the file (not re-normalised), or None.
        colors: ``(N, 3)`` float64 RGB in ``[0, 1]``, or None.
    """

    points: np.ndarray
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None

    @classmethod
    def checked(cls, points: Any, normals: Any = None, colors: Any = None) -> PointCloudData:
        """The cloud of ``(N, 3)`` arrays (numpy, torch or nested lists) to be written, as
        float64; ``ValueError`` naming the argument for a wrong shape or row count."""
        pts = as_array("points", points)
        nrm = None if normals is None else as_array("normals", normals, pts.shape[0])
        col = None if colors is None else as_array("colors", colors, pts.shape[0])
        return cls(pts, nrm, col)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def finite(self) -> PointCloudData:
        """A copy without the points whose position or normal is NaN/inf (e.g. organised PCDs)."""
        keep = np.isfinite(self.points).all(axis=1)
        if self.normals is not None:
            keep &= np.isfinite(self.normals).all(axis=1)
        return PointCloudData(
            self.points[keep],
            None if self.normals is None else self.normals[keep],
            None if self.colors is None else self.colors[keep],
        )

    def to_torch(self, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
        """``(points, normals)`` as torch tensors ``(N, 3)`` (normals None when absent)."""
        import torch  # here: difficp.io reads and writes files without loading PyTorch

        dtype = torch.get_default_dtype() if dtype is None else dtype
        pts = torch.as_tensor(self.points, dtype=dtype, device=device)
        nrm = None
        if self.normals is not None:
            nrm = torch.as_tensor(self.normals, dtype=dtype, device=device)
        return pts, nrm


def check_readable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")


def extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in POINT_CLOUD_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown point-cloud extension {path.suffix!r}; "
            f"use one of {', '.join(POINT_CLOUD_EXTENSIONS)}"
        )
    return ext


def as_array(name: str, value: Any, n: int | None = None) -> np.ndarray:
    """``value`` (numpy array, torch tensor or nested list) as ``(N, 3)`` float64."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows but points has {n}")
    return arr


def split_columns(path: Path, table: np.ndarray, what: str) -> PointCloudData:
    """``(N, 3)`` or ``(N, 6)`` table -> points (+ normals)."""
    if table.ndim == 1 and table.size in (3, 6):
        table = table[None]  # a single point
    if table.ndim != 2 or table.shape[1] not in (3, 6):
        raise ValueError(
            f"{path}: expected {what} with 3 columns (x y z) or 6 (x y z nx ny nz), "
            f"got shape {table.shape}"
        )
    table = table.astype(np.float64, copy=False)
    normals = table[:, 3:6].copy() if table.shape[1] == 6 else None
    return PointCloudData(np.ascontiguousarray(table[:, :3]), normals)


def text_format(numpy_type: str) -> str:
    """printf format that writes a value of ``numpy_type`` exactly (integers as integers)."""
    # 17 significant digits round-trip any float64, and float32 values are printed as the
    # float64 they widen to, so a reader that keeps text as float64 gets them back bit-exact.
    return "%.17g" if numpy_type.startswith("<f") else "%d"


def record_table(
    points: np.ndarray,
    normals: np.ndarray | None,
    normal_names: tuple[str, str, str],
    color_columns: list[tuple[str, str, np.ndarray]],
    ftype: str,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The ``(N,)`` structured array a PLY / PCD writer stores, and its ``[(name, type)]``
    fields: ``x y z``, the normals under ``normal_names`` (both as ``ftype``), then the colour
    columns ``[(name, type, (N,) values)]`` in each format's own layout."""
    fields = [(c, ftype) for c in ("x", "y", "z")]
    if normals is not None:
        fields += [(c, ftype) for c in normal_names]
    fields += [(name, t) for name, t, _ in color_columns]
    table = np.empty(points.shape[0], dtype=fields)
    for i, c in enumerate("xyz"):
        table[c] = points[:, i]
    if normals is not None:
        for i, c in enumerate(normal_names):
            table[c] = normals[:, i]
    for name, _, values in color_columns:
        table[name] = values
    return table, fields


def write_records(
    f: IO[bytes], header: list[str], table: np.ndarray, fields: list[tuple[str, str]], ascii: bool
) -> None:
    """The header lines, then the records as text (each type exactly) or little-endian binary."""
    f.write(("\n".join(header) + "\n").encode("ascii"))
    if ascii:
        cols = [table[name].astype(np.float64) for name, _ in fields]
        fmts = [text_format(t) for _, t in fields]
        np.savetxt(f, np.stack(cols, axis=1), fmt=fmts, delimiter=" ")
    else:
        f.write(table.tobytes())


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """PCL's packed colour (uint32 0x00RRGGBB, often stored as float bits) -> (N, 3) in [0,1]."""
    v = packed.astype(np.uint32, copy=False)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=1)
    return rgb.astype(np.float64) / 255.0


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """``(N, 3)`` colours in [0,1] -> uint32 0x00RRGGBB."""
    c = np.clip(np.rint(colors * 255.0), 0, 255).astype(np.uint32)
    return (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
