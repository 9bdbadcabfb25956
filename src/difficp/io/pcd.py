"""PCD files: ``DATA ascii``, ``binary`` and ``binary_compressed`` (LZF).

Fields ``x y z``, optional ``normal_x normal_y normal_z`` and ``rgb``/``rgba``; other fields
(``curvature``, histograms with ``COUNT`` > 1, ...) are skipped by their ``SIZE``/``TYPE``/
``COUNT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from difficp.io.cloud import PointCloudData, pack_rgb, record_table, unpack_rgb, write_records
from difficp.io.lzf import lzf_decompress

_PCD_KINDS = {"F": "f", "I": "i", "U": "u"}


@dataclass
class _PcdField:
    name: str
    size: int
    kind: str  # 'F', 'I', 'U'
    count: int

    def dtype(self) -> np.dtype:
        return np.dtype(f"<{_PCD_KINDS[self.kind]}{self.size}")


def _parse_pcd_header(path: Path, data: bytes) -> tuple[list[_PcdField], int, str, int]:
    """(fields, number of points, data kind, offset of the body) of a PCD file's bytes."""
    keys: dict[str, list[str]] = {}
    pos = 0
    while True:
        newline = data.find(b"\n", pos)
        if newline < 0:
            raise ValueError(f"{path}: malformed PCD header: no 'DATA' line")
        line = data[pos:newline].decode("ascii", errors="replace").strip()
        pos = newline + 1
        if not line or line.startswith("#"):
            continue
        words = line.split()
        keys[words[0].upper()] = words[1:]
        if words[0].upper() == "DATA":
            break
    for required in ("FIELDS", "SIZE", "TYPE", "POINTS"):
        if required not in keys:
            raise ValueError(f"{path}: malformed PCD header: no {required} line")
    names = keys["FIELDS"]
    counts = keys.get("COUNT", ["1"] * len(names))
    if not (len(names) == len(keys["SIZE"]) == len(keys["TYPE"]) == len(counts)):
        raise ValueError(
            f"{path}: malformed PCD header: FIELDS, SIZE, TYPE and COUNT have different lengths"
        )
    fields = []
    for name, size, kind, count in zip(names, keys["SIZE"], keys["TYPE"], counts, strict=True):
        kind = kind.upper()
        if kind not in _PCD_KINDS or size not in ("1", "2", "4", "8") or not count.isdigit():
            raise ValueError(
                f"{path}: malformed PCD header: field {name!r} has SIZE {size}, TYPE {kind}, "
                f"COUNT {count}"
            )
        if kind == "F" and size not in ("4", "8"):
            raise ValueError(f"{path}: malformed PCD header: float field {name!r} of SIZE {size}")
        fields.append(_PcdField(name, int(size), kind, int(count)))
    try:
        n = int(keys["POINTS"][0])
    except (ValueError, IndexError):
        raise ValueError(f"{path}: malformed PCD header: bad POINTS line") from None
    if n < 0:
        raise ValueError(f"{path}: malformed PCD header: POINTS {n} is negative")
    kind = keys["DATA"][0].lower() if keys["DATA"] else ""
    if kind not in ("ascii", "binary", "binary_compressed"):
        raise ValueError(
            f"{path}: unsupported PCD DATA {kind!r} (ascii, binary, binary_compressed)"
        )
    return fields, n, kind, pos


def _ascii_columns(
    path: Path, fields: list[_PcdField], n: int, body: bytes
) -> dict[str, np.ndarray]:
    """Field name -> ``(n, count)`` values of a ``DATA ascii`` body."""
    text = body.decode("ascii", errors="replace")
    rows = [ln for ln in text.splitlines() if ln.strip()][:n]
    width = sum(f.count for f in fields)
    tokens = " ".join(rows).split()
    if len(rows) < n or len(tokens) != width * n:
        raise ValueError(f"{path}: PCD ascii data must have {n} lines of {width} values each")
    try:
        table = np.array(tokens, dtype=np.float64).reshape(n, width)
    except ValueError as err:
        raise ValueError(f"{path}: bad number in PCD ascii data ({err})") from None
    columns: dict[str, np.ndarray] = {}
    col = 0
    for f in fields:
        # Values are parsed as float64 and float fields stay so (the text may hold more
        # digits than SIZE 4 keeps; Open3D reads them that way too). Integer fields may be
        # written as floats (4.2e+06), so they also go through float64. A packed float rgb
        # is cast to float32 later, which restores its bits when printed with enough digits.
        raw = table[:, col : col + f.count]
        columns[f.name] = raw if f.kind == "F" else raw.astype(f.dtype())
        col += f.count
    return columns


def _record_dtype(fields: list[_PcdField]) -> np.dtype:
    """One point's record: the fields one after another, ``COUNT`` > 1 as sub-arrays."""
    return np.dtype(
        [(f.name, f.dtype(), (f.count,)) if f.count != 1 else (f.name, f.dtype()) for f in fields]
    )


def _binary_columns(
    path: Path, fields: list[_PcdField], n: int, data: bytes, pos: int
) -> dict[str, np.ndarray]:
    """Field name -> ``(n, count)`` values of a ``DATA binary`` body (records of all fields)."""
    rec = _record_dtype(fields)
    need = rec.itemsize * n
    if pos + need > len(data):
        raise ValueError(
            f"{path}: truncated PCD: {n} points of {rec.itemsize} bytes need {need} "
            f"bytes, {len(data) - pos} found"
        )
    table = np.frombuffer(data, rec, count=n, offset=pos)
    return {f.name: table[f.name].reshape(n, f.count) for f in fields}


def _compressed_columns(
    path: Path, fields: list[_PcdField], n: int, data: bytes, pos: int
) -> dict[str, np.ndarray]:
    """Field name -> ``(n, count)`` values of a ``DATA binary_compressed`` body: the compressed
    and uncompressed sizes, then LZF of the fields stored one after another."""
    rec = _record_dtype(fields)
    if pos + 8 > len(data):
        raise ValueError(f"{path}: truncated PCD binary_compressed header")
    csize, usize = (int(v) for v in np.frombuffer(data, "<u4", count=2, offset=pos))
    if usize != rec.itemsize * n:
        raise ValueError(
            f"{path}: PCD binary_compressed size {usize} does not match {n} points of "
            f"{rec.itemsize} bytes"
        )
    try:
        raw = lzf_decompress(data[pos + 8 : pos + 8 + csize], usize)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    columns: dict[str, np.ndarray] = {}
    off = 0
    for f in fields:
        values = np.frombuffer(raw, f.dtype(), count=f.count * n, offset=off)
        columns[f.name] = values.reshape(n, f.count)
        off += f.size * f.count * n
    return columns


def _colors(fields: list[_PcdField], columns: dict[str, np.ndarray]) -> np.ndarray | None:
    """``(N, 3)`` colours in [0, 1] from a packed ``rgb``/``rgba`` field, or None."""
    for name in ("rgb", "rgba"):
        f = next((f for f in fields if f.name == name), None)
        if f is not None and f.size == 4:
            # The packed 0x00RRGGBB integer is stored in the field's 4 bytes whatever its TYPE.
            packed = np.ascontiguousarray(columns[name][:, 0]).astype(f.dtype(), copy=False)
            return unpack_rgb(packed.view(np.uint32))
    return None


def read_pcd(path: Path) -> PointCloudData:
    """The points, normals and colours of a PCD file (see the module docstring)."""
    data = path.read_bytes()
    fields, n, kind, pos = _parse_pcd_header(path, data)
    if kind == "ascii":
        columns = _ascii_columns(path, fields, n, data[pos:])
    elif kind == "binary":
        columns = _binary_columns(path, fields, n, data, pos)
    else:
        columns = _compressed_columns(path, fields, n, data, pos)
    missing = [c for c in "xyz" if c not in columns]
    if missing:
        raise ValueError(f"{path}: PCD file lacks fields {missing}")
    points = np.concatenate([columns[c][:, :1] for c in "xyz"], axis=1).astype(np.float64)
    normals = None
    nnames = ("normal_x", "normal_y", "normal_z")
    if all(c in columns for c in nnames):
        normals = np.concatenate([columns[c][:, :1] for c in nnames], axis=1).astype(np.float64)
    return PointCloudData(points, normals, _colors(fields, columns))


def write_pcd(
    f: IO[bytes], points: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None,
    ascii: bool, ftype: str,
) -> None:  # fmt: skip
    colors_column = [] if colors is None else [("rgb", "<u4", pack_rgb(colors))]
    normal_names = ("normal_x", "normal_y", "normal_z")
    table, fields = record_table(points, normals, normal_names, colors_column, ftype)
    n = points.shape[0]
    header = [
        "# .PCD v0.7 - Point Cloud Data file format (written by difficp)",
        "VERSION 0.7",
        "FIELDS " + " ".join(name for name, _ in fields),
        "SIZE " + " ".join(str(np.dtype(t).itemsize) for _, t in fields),
        "TYPE " + " ".join("U" if t == "<u4" else "F" for _, t in fields),
        "COUNT " + " ".join("1" for _ in fields),
        f"WIDTH {n}",
        "HEIGHT 1",
        "VIEWPOINT 0 0 0 1 0 0 0",
        f"POINTS {n}",
        f"DATA {'ascii' if ascii else 'binary'}",
    ]
    write_records(f, header, table, fields, ascii)
