"""4x4 rigid transforms as text: 4 lines of 4 whitespace-separated numbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from difficp._atomic import atomic_open
from difficp.io.cloud import PathLike, check_readable


def read_transform(path: PathLike) -> np.ndarray:
    """Read a 4x4 rigid transform written as 4 lines of 4 numbers (``#`` comments allowed).

    Returns:
        ``(4, 4)`` float64 as written. Raises ``ValueError`` unless it is 4x4, finite, with
        last row ``[0, 0, 0, 1]`` and a rotation block of determinant +1 that is orthonormal to
        :data:`ROTATION_TOLERANCE` (a matrix printed with few decimals is off by ~1e-3: it is
        accepted here and :func:`difficp.icp` projects it onto SO(3) with a warning).
    """
    path = Path(path)
    check_readable(path)
    try:
        T = np.loadtxt(path, dtype=np.float64, comments="#", ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: not a 4x4 matrix of numbers ({err})") from None
    if T.shape != (4, 4):
        raise ValueError(f"{path}: a transform must be 4 lines of 4 numbers, got shape {T.shape}")
    _check_rigid(str(path), T)
    return T


# Same tolerance as difficp.inputs.ROTATION_TOLERANCE (this package stays free of torch).
ROTATION_TOLERANCE = 1e-2


def _check_rigid(name: str, T: np.ndarray) -> None:
    if not np.isfinite(T).all():
        raise ValueError(f"{name}: transform has NaN or inf entries")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-6):
        raise ValueError(f"{name}: transform's last row must be [0 0 0 1], got {T[3].tolist()}")
    R = T[:3, :3]
    off = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if off > ROTATION_TOLERANCE or det <= 0:
        raise ValueError(
            f"{name}: the 3x3 block is not a rotation: max |R^T R - I| = {off:.2g} (tolerance "
            f"{ROTATION_TOLERANCE:g}), determinant {det:.6g} (must be +1); write the matrix with "
            "more digits or project it onto SO(3) (e.g. roma.special_procrustes)"
        )


def write_transform(path: PathLike, transform: Any) -> None:
    """Write a ``(4, 4)`` transform (numpy or torch; a leading batch of 1 is dropped) as text."""
    write = transform_writer(transform)
    with atomic_open(path) as f:
        write(f)


def transform_writer(transform: Any) -> Callable[[IO[bytes]], None]:
    """Check ``transform`` and return the function that writes it, as :func:`write_transform`
    does, to a binary file object."""
    if hasattr(transform, "detach"):
        transform = transform.detach().cpu().numpy()
    T = np.asarray(transform, dtype=np.float64)
    if T.shape == (1, 4, 4):
        T = T[0]
    if T.shape != (4, 4):
        raise ValueError(f"transform must have shape (4, 4), got {T.shape}")
    return lambda f: np.savetxt(f, T, fmt="%.17g", delimiter=" ")
