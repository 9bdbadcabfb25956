"""Column files: ``.xyz``/``.xyzn``/``.txt`` (whitespace-separated, ``#`` comments) and ``.npy``,
each with 3 columns (points) or 6 (points + normals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difficp.io.cloud import PointCloudData, split_columns


def read_text(path: Path) -> PointCloudData:
    rows = []
    width = None
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.replace(",", " ").split()
            if not tokens or tokens[0].startswith("#"):
                continue
            if width is None:
                width = len(tokens)
                if width not in (3, 6):
                    raise ValueError(
                        f"{path}:{lineno}: expected 3 columns (x y z) or 6 (x y z nx ny nz), "
                        f"got {width}"
                    )
            elif len(tokens) != width:
                raise ValueError(
                    f"{path}:{lineno}: {len(tokens)} columns where the first line has {width}"
                )
            rows.append(tokens)
    if not rows:
        return PointCloudData(np.zeros((0, 3)))
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: bad number ({err})") from None
    return split_columns(path, table, "text columns")


def read_npy(path: Path) -> PointCloudData:
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # EOFError: an empty or cut-short file
        raise ValueError(f"{path}: not a readable .npy array ({err or 'empty file'})") from None
    if not isinstance(table, np.ndarray):
        raise ValueError(f"{path}: expected a .npy array, got an .npz archive")
    # Real numbers only: complex values would lose their imaginary part without a word.
    if not (np.issubdtype(table.dtype, np.floating) or np.issubdtype(table.dtype, np.integer)):
        raise ValueError(
            f"{path}: .npy array must hold real numbers (float or int), got dtype {table.dtype}"
        )
    return split_columns(path, table, "an array")
