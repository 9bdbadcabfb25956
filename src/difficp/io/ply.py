"""PLY files: ``ascii``, ``binary_little_endian`` and ``binary_big_endian``.

The ``vertex`` element's ``x y z`` are the points, ``nx ny nz`` the normals and ``red green blue``
the colours; every other property (and every other element, e.g. ``face`` lists) is skipped by
its declared type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from difficp.io.cloud import PointCloudData, record_table, write_records

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
            return {name: table[name] for name in rec.names or ()}
        if el.has_lists:
            pos = _ply_skip_list_records(path, el, data, pos, order)
        else:
            pos += _ply_record_dtype(el, order).itemsize * el.count
    raise ValueError(f"{path}: PLY file has no 'vertex' element")


def read_ply(path: Path) -> PointCloudData:
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


def write_ply(
    f: IO[bytes], points: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None,
    ascii: bool, ftype: str,
) -> None:  # fmt: skip
    colors_columns = []
    if colors is not None:
        c8 = np.clip(np.rint(colors * 255.0), 0, 255).astype(np.uint8)
        colors_columns = [(c, "u1", c8[:, i]) for i, c in enumerate(("red", "green", "blue"))]
    table, fields = record_table(points, normals, ("nx", "ny", "nz"), colors_columns, ftype)
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
    write_records(f, header, table, fields, ascii)
