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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from difficp._atomic import atomic_open

__all__ = [
    "POINT_CLOUD_EXTENSIONS",
    "PointCloudData",
    "read_point_cloud",
    "read_transform",
    "write_point_cloud",
    "write_transform",
]

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
        import torch

        dtype = torch.get_default_dtype() if dtype is None else dtype
        pts = torch.as_tensor(self.points, dtype=dtype, device=device)
        nrm = None
        if self.normals is not None:
            nrm = torch.as_tensor(self.normals, dtype=dtype, device=device)
        return pts, nrm


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in POINT_CLOUD_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown point-cloud extension {path.suffix!r}; "
            f"use one of {', '.join(POINT_CLOUD_EXTENSIONS)}"
        )
    return ext


def _as_array(name: str, value: Any, n: int | None = None) -> np.ndarray:
    """``value`` (numpy array, torch tensor or nested list) as ``(N, 3)`` float64."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows but points has {n}")
    return arr


def _split_columns(path: Path, table: np.ndarray, what: str) -> PointCloudData:
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


def _text_format(numpy_type: str) -> str:
    """printf format that writes a value of ``numpy_type`` exactly (integers as integers)."""
    # 17 significant digits round-trip any float64, and float32 values are printed as the
    # float64 they widen to, so a reader that keeps text as float64 gets them back bit-exact.
    return "%.17g" if numpy_type.startswith("<f") else "%d"


def _unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """PCL's packed colour (uint32 0x00RRGGBB, often stored as float bits) -> (N, 3) in [0,1]."""
    v = packed.astype(np.uint32, copy=False)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=1)
    return rgb.astype(np.float64) / 255.0


def _pack_rgb(colors: np.ndarray) -> np.ndarray:
    """``(N, 3)`` colours in [0,1] -> uint32 0x00RRGGBB."""
    c = np.clip(np.rint(colors * 255.0), 0, 255).astype(np.uint32)
    return (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]


# --------------------------------------------------------------------------------------------
# PLY
# --------------------------------------------------------------------------------------------

# PLY scalar type names (both the classic and the sized spellings) -> numpy base type.
_PLY_TYPES = {
    "char": "i1", "int8": "i1",
    "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4",
    "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip


@dataclass
class _PlyProperty:
    name: str
    dtype: str  # numpy base type ('f4', ...) of the value (of the items, for a list)
    count_dtype: str | None = None  # numpy base type of a list's length; None for a scalar


@dataclass
class _PlyElement:
    name: str
    count: int
    properties: list[_PlyProperty]

    @property
    def has_lists(self) -> bool:
        return any(p.count_dtype is not None for p in self.properties)


def _ply_type(path: Path, name: str) -> str:
    if name not in _PLY_TYPES:
        raise ValueError(f"{path}: malformed PLY header: unknown property type {name!r}")
    return _PLY_TYPES[name]


def _parse_ply_header(path: Path, data: bytes) -> tuple[str, list[_PlyElement], int]:
    """(format, elements, offset of the body) of a PLY file's bytes."""
    if not data.startswith(b"ply"):
        raise ValueError(f"{path}: not a PLY file (it does not start with 'ply')")
    end = data.find(b"end_header")
    if end < 0:
        raise ValueError(f"{path}: malformed PLY header: no 'end_header' line")
    newline = data.find(b"\n", end)
    body = len(data) if newline < 0 else newline + 1
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[_PlyElement] = []
    for raw in lines[1:]:
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        key = words[0]
        if key == "format":
            if len(words) < 2 or words[1] not in (
                "ascii",
                "binary_little_endian",
                "binary_big_endian",
            ):
                raise ValueError(f"{path}: malformed PLY header: unsupported format line {raw!r}")
            fmt = words[1]
        elif key == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise ValueError(f"{path}: malformed PLY header: bad element line {raw!r}")
            elements.append(_PlyElement(words[1], int(words[2]), []))
        elif key == "property":
            if not elements:
                raise ValueError(f"{path}: malformed PLY header: property before any element")
            if len(words) == 3:
                prop = _PlyProperty(words[2], _ply_type(path, words[1]))
            elif len(words) == 5 and words[1] == "list":
                prop = _PlyProperty(words[4], _ply_type(path, words[3]), _ply_type(path, words[2]))
            else:
                raise ValueError(f"{path}: malformed PLY header: bad property line {raw!r}")
            elements[-1].properties.append(prop)
        else:
            raise ValueError(f"{path}: malformed PLY header: unexpected line {raw!r}")
    if fmt is None:
        raise ValueError(f"{path}: malformed PLY header: no 'format' line")
    return fmt, elements, body


def _ply_read_ascii(path: Path, elements: list[_PlyElement], body: bytes) -> dict[str, np.ndarray]:
    """Vertex properties of an ascii PLY body (one record per line)."""
    lines = body.decode("ascii", errors="replace").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    line = 0
    for el in elements:
        if el.name != "vertex":
            line += el.count  # any other element: one line per record, skip it
            continue
        rows = lines[line : line + el.count]
        if len(rows) < el.count:
            raise ValueError(
                f"{path}: truncated PLY: {el.count} vertices declared, {len(rows)} lines found"
            )
        if not el.has_lists:
            width = len(el.properties)
            # Row by row: a short row next to a long one must not pass as the right total.
            bad = next((k for k, row in enumerate(rows) if len(row.split()) != width), None)
            if bad is not None:
                raise ValueError(
                    f"{path}: PLY vertex {bad} has {len(rows[bad].split())} values; every vertex "
                    f"line must have {width} ({' '.join(p.name for p in el.properties)})"
                )
            try:
                table = np.array(" ".join(rows).split(), dtype=np.float64)
            except ValueError as err:
                raise ValueError(f"{path}: bad number in PLY vertex data ({err})") from None
            table = table.reshape(el.count, width)
            return {p.name: table[:, i] for i, p in enumerate(el.properties)}
        # Slow path: a list property in the vertex element makes the line length vary.
        cols: dict[str, list[float]] = {p.name: [] for p in el.properties}
        for k, row in enumerate(rows):
            tokens = row.split()
            pos = 0
            try:
                for p in el.properties:
                    if p.count_dtype is None:
                        cols[p.name].append(float(tokens[pos]))
                        pos += 1
                    else:
                        pos += 1 + int(tokens[pos])
            except (ValueError, IndexError):
                raise ValueError(f"{path}: PLY vertex {k} is malformed: {row.strip()!r}") from None
            if pos != len(tokens):
                raise ValueError(
                    f"{path}: PLY vertex {k} has {len(tokens)} values where its properties "
                    f"take {pos}: {row.strip()!r}"
                )
        return {k: np.asarray(v) for k, v in cols.items()}
    raise ValueError(f"{path}: PLY file has no 'vertex' element")


def _ply_record_dtype(el: _PlyElement, order: str) -> np.dtype:
    return np.dtype([(p.name, order + p.dtype) for p in el.properties])


def _ply_skip_list_records(path: Path, el: _PlyElement, data: bytes, pos: int, order: str) -> int:
    """Offset past ``el``'s binary records when some of its properties are lists."""
    for _ in range(el.count):
        for p in el.properties:
            size = np.dtype(p.dtype).itemsize
            if p.count_dtype is None:
                pos += size
                continue
            csize = np.dtype(p.count_dtype).itemsize
            if pos + csize > len(data):
                raise ValueError(f"{path}: truncated PLY element {el.name!r}")
            n = int(np.frombuffer(data, order + p.count_dtype, count=1, offset=pos)[0])
            pos += csize + n * size
    return pos


def _ply_read_binary(
    path: Path, elements: list[_PlyElement], data: bytes, pos: int, order: str
) -> dict[str, np.ndarray]:
    for el in elements:
        if el.name == "vertex":
            if el.has_lists:
                raise ValueError(
                    f"{path}: list properties in a binary PLY vertex are not supported"
                )
            rec = _ply_record_dtype(el, order)
            need = rec.itemsize * el.count
            if pos + need > len(data):
                raise ValueError(
                    f"{path}: truncated PLY: {el.count} vertices of {rec.itemsize} bytes need "
                    f"{need} bytes, {len(data) - pos} found"
                )
            table = np.frombuffer(data, rec, count=el.count, offset=pos)
            return {name: table[name] for name in rec.names}
        if el.has_lists:
            pos = _ply_skip_list_records(path, el, data, pos, order)
        else:
            pos += _ply_record_dtype(el, order).itemsize * el.count
    raise ValueError(f"{path}: PLY file has no 'vertex' element")


def _read_ply(path: Path) -> PointCloudData:
    data = path.read_bytes()
    fmt, elements, body = _parse_ply_header(path, data)
    if fmt == "ascii":
        cols = _ply_read_ascii(path, elements, data[body:])
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        cols = _ply_read_binary(path, elements, data, body, order)
    missing = [c for c in "xyz" if c not in cols]
    if missing:
        raise ValueError(f"{path}: PLY vertex element lacks properties {missing}")
    points = np.stack([cols[c] for c in "xyz"], axis=1).astype(np.float64)
    normals = None
    if all(c in cols for c in ("nx", "ny", "nz")):
        normals = np.stack([cols[c] for c in ("nx", "ny", "nz")], axis=1).astype(np.float64)
    colors = None
    if all(c in cols for c in ("red", "green", "blue")):
        rgb = np.stack([cols[c] for c in ("red", "green", "blue")], axis=1)
        vertex = next(e for e in elements if e.name == "vertex")
        kind = {p.name: p.dtype for p in vertex.properties}["red"]
        # Integer colours are 0..255 (or 0..65535); float colours are already in [0, 1].
        scale = 1.0 if kind.startswith("f") else float(np.iinfo(np.dtype(kind)).max)
        colors = rgb.astype(np.float64) / scale
    return PointCloudData(points, normals, colors)


def _write_ply(
    f: IO[bytes], points: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None,
    ascii: bool, ftype: str,
) -> None:  # fmt: skip
    fields = [(c, ftype) for c in ("x", "y", "z")]
    if normals is not None:
        fields += [(c, ftype) for c in ("nx", "ny", "nz")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    table = np.empty(points.shape[0], dtype=fields)
    for i, c in enumerate("xyz"):
        table[c] = points[:, i]
    if normals is not None:
        for i, c in enumerate(("nx", "ny", "nz")):
            table[c] = normals[:, i]
    if colors is not None:
        c8 = np.clip(np.rint(colors * 255.0), 0, 255).astype(np.uint8)
        for i, c in enumerate(("red", "green", "blue")):
            table[c] = c8[:, i]
    fmt = "ascii" if ascii else "binary_little_endian"
    types = {"<f8": "double", "<f4": "float", "u1": "uchar"}
    header = [
        "ply",
        f"format {fmt} 1.0",
        "comment written by difficp",
        f"element vertex {points.shape[0]}",
    ]
    header += [f"property {types[t]} {name}" for name, t in fields]
    header.append("end_header")
    f.write(("\n".join(header) + "\n").encode("ascii"))
    if ascii:
        cols = [table[name].astype(np.float64) for name, _ in fields]
        fmts = [_text_format(t) for _, t in fields]
        np.savetxt(f, np.stack(cols, axis=1), fmt=fmts, delimiter=" ")
    else:
        f.write(table.tobytes())


# --------------------------------------------------------------------------------------------
# PCD
# --------------------------------------------------------------------------------------------

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


def _lzf_decompress(src: bytes, out_size: int) -> bytes:
    """Decompress LZF (the codec of PCD's binary_compressed) into exactly ``out_size`` bytes."""
    out = bytearray(out_size)
    i = o = 0
    n = len(src)
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:  # literal run of ctrl + 1 bytes
            run = ctrl + 1
            if i + run > n or o + run > out_size:
                raise ValueError("corrupt LZF data (literal run overflows)")
            out[o : o + run] = src[i : i + run]
            i += run
            o += run
        else:  # back reference: length in the top 3 bits (7 = extended), 13-bit offset
            length = ctrl >> 5
            if i + (length == 7) >= n:
                raise ValueError("corrupt LZF data (truncated back reference)")
            if length == 7:
                length += src[i]
                i += 1
            ref = o - ((ctrl & 0x1F) << 8) - src[i] - 1
            i += 1
            length += 2
            if ref < 0 or o + length > out_size:
                raise ValueError("corrupt LZF data (back reference out of range)")
            # Byte by byte when the ranges overlap (a repeated pattern), else one slice.
            if ref + length <= o:
                out[o : o + length] = out[ref : ref + length]
            else:
                for k in range(length):
                    out[o + k] = out[ref + k]
            o += length
    if o != out_size:
        raise ValueError(f"corrupt LZF data ({o} bytes decoded, {out_size} expected)")
    return bytes(out)


def _read_pcd(path: Path) -> PointCloudData:
    data = path.read_bytes()
    fields, n, kind, pos = _parse_pcd_header(path, data)
    columns: dict[str, np.ndarray] = {}  # name -> (n, count) values
    if kind == "ascii":
        text = data[pos:].decode("ascii", errors="replace")
        rows = [ln for ln in text.splitlines() if ln.strip()][:n]
        width = sum(f.count for f in fields)
        tokens = " ".join(rows).split()
        if len(rows) < n or len(tokens) != width * n:
            raise ValueError(f"{path}: PCD ascii data must have {n} lines of {width} values each")
        try:
            table = np.array(tokens, dtype=np.float64).reshape(n, width)
        except ValueError as err:
            raise ValueError(f"{path}: bad number in PCD ascii data ({err})") from None
        col = 0
        for f in fields:
            # Values are parsed as float64 and float fields stay so (the text may hold more
            # digits than SIZE 4 keeps; Open3D reads them that way too). Integer fields may be
            # written as floats (4.2e+06), so they also go through float64. A packed float rgb
            # is cast to float32 later, which restores its bits when printed with enough digits.
            raw = table[:, col : col + f.count]
            columns[f.name] = raw if f.kind == "F" else raw.astype(f.dtype())
            col += f.count
    else:
        rec = np.dtype(
            [
                (f.name, f.dtype(), (f.count,)) if f.count != 1 else (f.name, f.dtype())
                for f in fields
            ]
        )
        if kind == "binary":
            need = rec.itemsize * n
            if pos + need > len(data):
                raise ValueError(
                    f"{path}: truncated PCD: {n} points of {rec.itemsize} bytes need {need} "
                    f"bytes, {len(data) - pos} found"
                )
            table = np.frombuffer(data, rec, count=n, offset=pos)
            for f in fields:
                columns[f.name] = table[f.name].reshape(n, f.count)
        else:  # binary_compressed: sizes, then LZF of the fields stored one after another
            if pos + 8 > len(data):
                raise ValueError(f"{path}: truncated PCD binary_compressed header")
            csize, usize = (int(v) for v in np.frombuffer(data, "<u4", count=2, offset=pos))
            if usize != rec.itemsize * n:
                raise ValueError(
                    f"{path}: PCD binary_compressed size {usize} does not match {n} points of "
                    f"{rec.itemsize} bytes"
                )
            try:
                raw = _lzf_decompress(data[pos + 8 : pos + 8 + csize], usize)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            off = 0
            for f in fields:
                size = f.size * f.count * n
                columns[f.name] = np.frombuffer(raw, f.dtype(), count=f.count * n, offset=off)
                columns[f.name] = columns[f.name].reshape(n, f.count)
                off += size
    missing = [c for c in "xyz" if c not in columns]
    if missing:
        raise ValueError(f"{path}: PCD file lacks fields {missing}")
    points = np.concatenate([columns[c][:, :1] for c in "xyz"], axis=1).astype(np.float64)
    normals = None
    nnames = ("normal_x", "normal_y", "normal_z")
    if all(c in columns for c in nnames):
        normals = np.concatenate([columns[c][:, :1] for c in nnames], axis=1).astype(np.float64)
    colors = None
    for name in ("rgb", "rgba"):
        f = next((f for f in fields if f.name == name), None)
        if f is not None and f.size == 4:
            # The packed 0x00RRGGBB integer is stored in the field's 4 bytes whatever its TYPE.
            packed = np.ascontiguousarray(columns[name][:, 0]).astype(f.dtype(), copy=False)
            colors = _unpack_rgb(packed.view(np.uint32))
            break
    return PointCloudData(points, normals, colors)


def _write_pcd(
    f: IO[bytes], points: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None,
    ascii: bool, ftype: str,
) -> None:  # fmt: skip
    fields = [(c, ftype) for c in ("x", "y", "z")]
    if normals is not None:
        fields += [(c, ftype) for c in ("normal_x", "normal_y", "normal_z")]
    if colors is not None:
        fields.append(("rgb", "<u4"))
    table = np.empty(points.shape[0], dtype=fields)
    for i, c in enumerate("xyz"):
        table[c] = points[:, i]
    if normals is not None:
        for i, c in enumerate(("normal_x", "normal_y", "normal_z")):
            table[c] = normals[:, i]
    if colors is not None:
        table["rgb"] = _pack_rgb(colors)
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
    f.write(("\n".join(header) + "\n").encode("ascii"))
    if ascii:
        cols = [table[name].astype(np.float64) for name, _ in fields]
        fmts = [_text_format(t) for _, t in fields]
        np.savetxt(f, np.stack(cols, axis=1), fmt=fmts, delimiter=" ")
    else:
        f.write(table.tobytes())


# --------------------------------------------------------------------------------------------
# XYZ / TXT / NPY
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> PointCloudData:
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
    return _split_columns(path, table, "text columns")


def _read_npy(path: Path) -> PointCloudData:
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
    return _split_columns(path, table, "an array")


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


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
    ext = _extension(path)
    _check_readable(path)
    if ext == ".ply":
        cloud = _read_ply(path)
    elif ext == ".pcd":
        cloud = _read_pcd(path)
    elif ext == ".npy":
        cloud = _read_npy(path)
    else:
        cloud = _read_text(path)
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
    write = point_cloud_writer(path, points, normals, colors, ascii=ascii, double=double)
    with atomic_open(path) as f:
        write(f)


def point_cloud_writer(
    path: PathLike,
    points: Any,
    normals: Any = None,
    colors: Any = None,
    *,
    ascii: bool = False,
    double: bool | None = None,
) -> Callable[[IO[bytes]], None]:
    """Check the arguments of :func:`write_point_cloud` and return the function that writes
    them, in ``path``'s format, to a binary file object (for writing several files at once with
    :class:`difficp._atomic.AtomicFiles`)."""
    ext = _extension(Path(path))
    pts = _as_array("points", points)
    nrm = None if normals is None else _as_array("normals", normals, pts.shape[0])
    col = None if colors is None else _as_array("colors", colors, pts.shape[0])

    def write(f: IO[bytes]) -> None:
        if ext == ".ply":
            _write_ply(f, pts, nrm, col, ascii, "<f4" if double is False else "<f8")
        elif ext == ".pcd":
            _write_pcd(f, pts, nrm, col, ascii, "<f8" if double else "<f4")
        else:
            table = pts if nrm is None else np.concatenate([pts, nrm], axis=1)
            if ext == ".npy":
                np.save(f, table)
            else:
                np.savetxt(f, table, fmt="%.17g", delimiter=" ")

    return write


def read_transform(path: PathLike) -> np.ndarray:
    """Read a 4x4 rigid transform written as 4 lines of 4 numbers (``#`` comments allowed).

    Returns:
        ``(4, 4)`` float64. Raises ``ValueError`` unless it is 4x4, finite, with last row
        ``[0, 0, 0, 1]`` and an orthonormal rotation block of determinant +1 (to 1e-4).
    """
    path = Path(path)
    _check_readable(path)
    try:
        T = np.loadtxt(path, dtype=np.float64, comments="#", ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: not a 4x4 matrix of numbers ({err})") from None
    if T.shape != (4, 4):
        raise ValueError(f"{path}: a transform must be 4 lines of 4 numbers, got shape {T.shape}")
    _check_rigid(str(path), T)
    return T


def _check_rigid(name: str, T: np.ndarray) -> None:
    if not np.isfinite(T).all():
        raise ValueError(f"{name}: transform has NaN or inf entries")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-6):
        raise ValueError(f"{name}: transform's last row must be [0 0 0 1], got {T[3].tolist()}")
    R = T[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise ValueError(f"{name}: transform's 3x3 block is not a rotation (orthonormal, det +1)")


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
