"""Point-cloud and transform files: round trips, hand-written headers, and parity with Open3D."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import difficp
from difficp.io import (
    PointCloudData,
    read_point_cloud,
    read_transform,
    write_point_cloud,
    write_transform,
)


@pytest.fixture
def cloud() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(57, 3)) * 3.0
    normals = rng.normal(size=(57, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    colors = rng.integers(0, 256, size=(57, 3)) / 255.0
    return points, normals, colors


@pytest.fixture
def data_dir() -> Path:
    value = os.environ.get("DIFFICP_DATA")
    if not value or not Path(value).is_dir():
        pytest.skip("DIFFICP_DATA is not set")
    return Path(value)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ascii", "double"),
    [
        ("c.ply", False, None),
        ("c.ply", True, None),
        ("c.pcd", False, True),
        ("c.pcd", True, True),
        ("c.xyz", False, None),
        ("c.txt", False, None),
        ("c.xyzn", False, None),
        ("c.npy", False, None),
    ],
)
@pytest.mark.parametrize("with_normals", [False, True])
def test_round_trip_exact(tmp_path, cloud, name, ascii, double, with_normals):
    points, normals, _ = cloud
    path = tmp_path / name
    write_point_cloud(path, points, normals if with_normals else None, ascii=ascii, double=double)
    back = read_point_cloud(path)
    assert back.points.dtype == np.float64
    # float64 everywhere (%.17g in text), so the trip is exact.
    np.testing.assert_array_equal(back.points, points)
    if with_normals:
        np.testing.assert_array_equal(back.normals, normals)
    else:
        assert back.normals is None
    assert len(back) == len(points)


@pytest.mark.parametrize("name", ["c.ply", "c.pcd"])
@pytest.mark.parametrize("ascii", [False, True])
def test_round_trip_single_precision(tmp_path, cloud, name, ascii):
    """float32 storage (the PCD default) gives back exactly the float32-rounded values."""
    points, normals, _ = cloud
    path = tmp_path / name
    write_point_cloud(path, points, normals, ascii=ascii, double=False)
    back = read_point_cloud(path)
    np.testing.assert_array_equal(back.points, points.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(back.normals, normals.astype(np.float32).astype(np.float64))
    if name.endswith(".pcd"):  # the default for PCD is single precision
        write_point_cloud(path, points, ascii=ascii)
        assert "SIZE 4 4 4" in path.read_bytes()[:300].decode("ascii", "replace")


@pytest.mark.parametrize(("name", "ascii"), [("c.ply", False), ("c.ply", True), ("c.pcd", False),
                                             ("c.pcd", True)])  # fmt: skip
def test_round_trip_colors(tmp_path, cloud, name, ascii):
    points, normals, colors = cloud
    path = tmp_path / name
    write_point_cloud(path, points, normals, colors, ascii=ascii)
    back = read_point_cloud(path)
    np.testing.assert_allclose(back.colors, colors, atol=1e-12)
    np.testing.assert_allclose(back.normals, normals, atol=1e-7)


def test_write_accepts_torch(tmp_path, cloud):
    torch = pytest.importorskip("torch")
    points, normals, _ = cloud
    write_point_cloud(
        tmp_path / "t.ply", torch.from_numpy(points).float(), torch.from_numpy(normals)
    )
    back = read_point_cloud(tmp_path / "t.ply")
    np.testing.assert_allclose(back.points, points.astype(np.float32), rtol=0, atol=0)
    p, n = back.to_torch(torch.float64)
    assert p.shape == (57, 3) and p.dtype == torch.float64 and n.shape == (57, 3)


def test_empty_and_single_point(tmp_path):
    for name in ("e.ply", "e.pcd", "e.npy"):
        write_point_cloud(tmp_path / name, np.zeros((0, 3)))
        assert read_point_cloud(tmp_path / name).points.shape == (0, 3)
    (tmp_path / "one.xyz").write_text("1 2 3\n")
    np.testing.assert_array_equal(read_point_cloud(tmp_path / "one.xyz").points, [[1, 2, 3]])


def test_remove_non_finite(tmp_path):
    pts = np.array([[0.0, 0, 0], [np.nan, np.nan, np.nan], [1, 2, 3]])
    write_point_cloud(tmp_path / "n.pcd", pts)
    assert read_point_cloud(tmp_path / "n.pcd").points.shape == (3, 3)
    kept = read_point_cloud(tmp_path / "n.pcd", remove_non_finite=True)
    np.testing.assert_array_equal(kept.points, pts[[0, 2]])


# --------------------------------------------------------------------------------------------
# Hand-written files: other properties/fields are skipped by their types
# --------------------------------------------------------------------------------------------


def test_ply_binary_skips_other_properties_and_elements(tmp_path):
    """A face element with list properties before the vertices, and odd-sized extra properties."""
    rec = np.dtype([("x", "<f4"), ("flag", "u1"), ("y", "<f4"), ("nx", "<f8"), ("ny", "<f8"),
                    ("nz", "<f8"), ("z", "<f4"), ("intensity", "<i2")])  # fmt: skip
    table = np.zeros(4, rec)
    rng = np.random.default_rng(1)
    for c in ("x", "y", "z", "nx", "ny", "nz"):
        table[c] = rng.normal(size=4)
    table["flag"] = 200
    table["intensity"] = -7
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment hello\n"
        "element face 2\nproperty list uchar int vertex_indices\n"
        "element vertex 4\nproperty float x\nproperty uchar flag\nproperty float y\n"
        "property double nx\nproperty double ny\nproperty double nz\nproperty float z\n"
        "property short intensity\nend_header\n"
    )
    faces = (
        np.array([3], "u1").tobytes() + np.array([0, 1, 2], "<i4").tobytes()
        + np.array([4], "u1").tobytes() + np.array([0, 1, 2, 3], "<i4").tobytes()
    )  # fmt: skip
    path = tmp_path / "h.ply"
    path.write_bytes(header.encode() + faces + table.tobytes())
    back = read_point_cloud(path)
    expected = np.stack([table[c] for c in "xyz"], 1).astype(np.float64)
    np.testing.assert_array_equal(back.points, expected)
    np.testing.assert_array_equal(back.normals, np.stack([table[c] for c in ("nx", "ny", "nz")], 1))


def test_ply_big_endian(tmp_path):
    pts = np.array([[1.5, -2.0, 3.25], [4.0, 5.0, 6.0]])
    header = b"ply\nformat binary_big_endian 1.0\nelement vertex 2\n" + b"".join(
        f"property double {c}\n".encode() for c in "xyz"
    ) + b"end_header\n"  # fmt: skip
    (tmp_path / "b.ply").write_bytes(header + pts.astype(">f8").tobytes())
    np.testing.assert_array_equal(read_point_cloud(tmp_path / "b.ply").points, pts)


def test_ply_ascii_with_faces_after_vertices(tmp_path):
    text = (
        "ply\r\nformat ascii 1.0\r\nelement vertex 3\r\nproperty float x\r\nproperty float y\r\n"
        "property float z\r\nproperty uchar red\r\nproperty uchar green\r\nproperty uchar blue\r\n"
        "element face 1\r\nproperty list uchar int vertex_indices\r\nend_header\r\n"
        "0 0 0 255 0 0\r\n1 0 0 0 255 0\r\n0 1 0.5 0 0 255\r\n3 0 1 2\r\n"
    )
    (tmp_path / "a.ply").write_text(text)
    back = read_point_cloud(tmp_path / "a.ply")
    np.testing.assert_array_equal(back.points, [[0, 0, 0], [1, 0, 0], [0, 1, 0.5]])
    np.testing.assert_array_equal(back.colors, np.eye(3))
    assert back.normals is None


def test_pcd_binary_skips_fields_by_size_type_count(tmp_path):
    """Fields of every size before, between and after x y z, one with COUNT 3."""
    rec = np.dtype([("a", "<u2"), ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("hist", "<f8", (3,)),
                    ("normal_x", "<f4"), ("normal_y", "<f4"), ("normal_z", "<f4"),
                    ("curvature", "<f4"), ("rgb", "<f4"), ("label", "<i1")])  # fmt: skip
    n = 5
    table = np.zeros(n, rec)
    rng = np.random.default_rng(2)
    for c in ("x", "y", "z", "normal_x", "normal_y", "normal_z", "curvature"):
        table[c] = rng.normal(size=n)
    table["hist"] = 9.0
    packed = np.array([0xFF0000, 0x00FF00, 0x0000FF, 0x808080, 0x102030], np.uint32)
    table["rgb"] = packed.view(np.float32)  # PCL stores the packed colour in float bits
    header = (
        "# .PCD v0.7\nVERSION 0.7\n"
        "FIELDS a x y z hist normal_x normal_y normal_z curvature rgb label\n"
        "SIZE 2 4 4 4 8 4 4 4 4 4 1\nTYPE U F F F F F F F F F I\nCOUNT 1 1 1 1 3 1 1 1 1 1 1\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
    )
    (tmp_path / "h.pcd").write_bytes(header.encode() + table.tobytes())
    back = read_point_cloud(tmp_path / "h.pcd")
    np.testing.assert_array_equal(back.points, np.stack([table[c] for c in "xyz"], 1))
    names = ("normal_x", "normal_y", "normal_z")
    np.testing.assert_array_equal(back.normals, np.stack([table[c] for c in names], 1))
    np.testing.assert_allclose(back.colors[:3], np.eye(3))
    np.testing.assert_allclose(back.colors[4], [0x10 / 255, 0x20 / 255, 0x30 / 255])


def test_pcd_ascii_without_count(tmp_path):
    text = (
        "VERSION .7\nFIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\n"
        "WIDTH 2\nHEIGHT 1\nPOINTS 2\nDATA ascii\n1 2 3 0.5\n4 5 6 0.25\n"
    )
    (tmp_path / "a.pcd").write_text(text)
    np.testing.assert_array_equal(
        read_point_cloud(tmp_path / "a.pcd").points, [[1, 2, 3], [4, 5, 6]]
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.stl", b"solid", "unknown point-cloud extension"),
        ("a.ply", b"plx\n", "not a PLY"),
        ("a.ply", b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n", "end_header"),
        ("a.ply", b"ply\nformat binary_weird 1.0\nend_header\n", "unsupported format"),
        (
            "a.ply",
            b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float128 x\nend_header\n",
            "unknown property type",
        ),
        (
            "a.ply",
            b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
            b"property float z\nend_header\n1 2 3\n",
            "truncated",
        ),
        (
            "a.ply",
            b"ply\nformat binary_little_endian 1.0\nelement vertex 2\nproperty float x\n"
            b"property float y\nproperty float z\nend_header\n" + bytes(12),
            "truncated",
        ),
        (
            "a.ply",
            b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
            b"end_header\n1 2\n",
            "lacks properties",
        ),
        (
            "a.pcd",
            b"VERSION .7\nFIELDS x y z\nSIZE 4 4\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3\n",
            "different lengths",
        ),
        ("a.pcd", b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\n", "no 'DATA'"),
        (
            "a.pcd",
            b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F Q\nPOINTS 1\nDATA ascii\n1 2 3\n",
            "malformed PCD header",
        ),
        (
            "a.pcd",
            b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 2\nDATA binary\n" + bytes(12),
            "truncated",
        ),
        ("a.pcd", b"FIELDS x y\nSIZE 4 4\nTYPE F F\nPOINTS 1\nDATA ascii\n1 2\n", "lacks fields"),
        ("a.xyz", b"1 2 3 4\n", "expected 3 columns"),
        ("a.txt", b"1 2 3\n4 5 6 7 8 9\n", "columns where the first line has 3"),
        ("a.xyz", b"1 2 x\n", "bad number"),
    ],
)
def test_malformed_files_raise_value_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_point_cloud(path)


def test_npy_wrong_shape(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 4)))
    with pytest.raises(ValueError, match="3 columns"):
        read_point_cloud(tmp_path / "a.npy")


def test_missing_file_and_bad_write(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_point_cloud(tmp_path / "nope.ply")
    with pytest.raises(ValueError, match="unknown point-cloud extension"):
        write_point_cloud(tmp_path / "a.obj", np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        write_point_cloud(tmp_path / "a.ply", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="rows but points has"):
        write_point_cloud(tmp_path / "a.ply", np.zeros((2, 3)), normals=np.zeros((3, 3)))


_PLY_XYZ = (
    "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
    "property float z\nend_header\n"
)
_PCD_XYZ = (
    "VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 2\n"
    "HEIGHT 1\nPOINTS {n}\nDATA {kind}\n"
)


def test_ascii_ply_row_with_a_missing_value(tmp_path):
    # A short row next to a long one has the right total count of values.
    path = tmp_path / "a.ply"
    path.write_text(_PLY_XYZ + "0 0 0\n1 1\n2 2 2 2\n")
    with pytest.raises(ValueError, match="vertex 1 has 2 values"):
        read_point_cloud(path)


@pytest.mark.parametrize("kind", ["ascii", "binary"])
def test_pcd_negative_point_count(tmp_path, kind):
    path = tmp_path / "a.pcd"
    body = b"1 2 3\n4 5 6\n" if kind == "ascii" else np.arange(6, dtype="<f4").tobytes()
    path.write_bytes(_PCD_XYZ.format(n=-1, kind=kind).encode() + body)
    with pytest.raises(ValueError, match="POINTS -1 is negative"):
        read_point_cloud(path)


def test_npy_empty_complex_or_bool_file(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy: not a readable \.npy array"):
        read_point_cloud(tmp_path / "empty.npy")
    np.save(tmp_path / "c.npy", np.ones((4, 3)) * (1 + 2j))
    with pytest.raises(ValueError, match=r"real numbers.*complex128"):
        read_point_cloud(tmp_path / "c.npy")
    np.save(tmp_path / "b.npy", np.ones((4, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"real numbers.*bool"):
        read_point_cloud(tmp_path / "b.npy")


def test_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "scan.ply").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_point_cloud(tmp_path / "scan.ply")
    (tmp_path / "T.txt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_transform(tmp_path / "T.txt")


@pytest.fixture(scope="module")
def compressed_pcd(tmp_path_factory) -> bytes:
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(1)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(rng.random((60, 3))))
    path = tmp_path_factory.mktemp("lzf") / "c.pcd"
    o3d.io.write_point_cloud(str(path), cloud, compressed=True)
    return path.read_bytes()


@settings(max_examples=40, deadline=None)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_compressed_pcd_raises_value_error(tmp_path_factory, compressed_pcd, cut):
    """A binary_compressed PCD cut anywhere after its header: a ValueError, never a crash."""
    body = compressed_pcd.index(b"DATA binary_compressed\n") + len("DATA binary_compressed\n")
    end = body + int(cut * (len(compressed_pcd) - body))
    path = tmp_path_factory.mktemp("cut") / "t.pcd"
    path.write_bytes(compressed_pcd[:end])
    with pytest.raises(ValueError, match=r"t\.pcd"):
        read_point_cloud(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), size=st.integers(0, 200))
def test_lzf_decoder_on_arbitrary_bytes(data, size):
    """Any byte string either decodes to exactly ``size`` bytes or raises a ValueError."""
    from difficp.io.lzf import lzf_decompress

    try:
        out = lzf_decompress(data, size)
    except ValueError as err:
        assert "corrupt LZF" in str(err)
    else:
        assert len(out) == size


@pytest.mark.parametrize("name", ["a.ply", "a.pcd", "a.xyz", "a.npy"])
def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, cloud, monkeypatch, name):
    import difficp.io as io

    path = tmp_path / name
    write_point_cloud(path, cloud[0])
    good = path.read_bytes()

    def disk_full(*args, **kwargs):  # writes a little, then fails (old or new signature)
        target = args[0]
        f = open(target, "wb") if isinstance(target, (str, Path)) else target  # noqa: SIM115
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(io.ply, "write_ply", disk_full)
    monkeypatch.setattr(io.pcd, "write_pcd", disk_full)
    monkeypatch.setattr(io.np, "save", disk_full)
    monkeypatch.setattr(io.np, "savetxt", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_point_cloud(path, cloud[0] + 1.0)
    with pytest.raises(OSError, match="No space"):
        write_transform(tmp_path / "T.txt", np.eye(4))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def test_transform_round_trip(tmp_path):
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec([0.1, -0.4, 0.3]).as_matrix()
    T[:3, 3] = [1.0, -2.5, 0.125]
    write_transform(tmp_path / "T.txt", T[None])  # a batch of one is accepted
    np.testing.assert_array_equal(read_transform(tmp_path / "T.txt"), T)
    assert len((tmp_path / "T.txt").read_text().strip().splitlines()) == 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1 0 0\n0 1 0\n0 0 1\n", "4 lines of 4"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n1 0 0 1\n", "last row"),
        ("2 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "not a rotation"),
        ("1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "NaN"),
        ("1 0 0 a\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "not a 4x4 matrix"),
    ],
)
def test_bad_transform(tmp_path, text, match):
    (tmp_path / "T.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_transform(tmp_path / "T.txt")


# --------------------------------------------------------------------------------------------
# Parity with Open3D
# --------------------------------------------------------------------------------------------


def test_parity_with_open3d_on_real_pcd(data_dir):
    o3d = pytest.importorskip("open3d")
    path = data_dir / "scans" / "open3d_3dmatch_pair" / "feature_cloud_bin_0.pcd"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    ours = read_point_cloud(path)
    ref = o3d.io.read_point_cloud(str(path))
    assert len(ours) == len(ref.points) == 3903
    np.testing.assert_array_equal(ours.points, np.asarray(ref.points))
    np.testing.assert_array_equal(ours.normals, np.asarray(ref.normals))
    if ref.has_colors():
        np.testing.assert_allclose(ours.colors, np.asarray(ref.colors), atol=1e-12)


@pytest.mark.parametrize("ascii", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
def test_parity_with_open3d_written_files(tmp_path, cloud, ascii, compressed):
    """Files Open3D writes (float PLY, float PCD, LZF-compressed PCD) read back as Open3D does."""
    o3d = pytest.importorskip("open3d")
    points, normals, colors = cloud
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    pcd.normals = o3d.utility.Vector3dVector(normals)
    pcd.colors = o3d.utility.Vector3dVector(colors)
    for name in ("o3d.ply", "o3d.pcd"):
        if name.endswith(".ply") and compressed:
            continue
        if name.endswith(".pcd") and ascii and compressed:
            continue
        path = str(tmp_path / name)
        assert o3d.io.write_point_cloud(path, pcd, write_ascii=ascii, compressed=compressed)
        ref = o3d.io.read_point_cloud(path)
        ours = read_point_cloud(path)
        np.testing.assert_allclose(ours.points, np.asarray(ref.points), rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours.normals, np.asarray(ref.normals), rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours.colors, np.asarray(ref.colors), rtol=0, atol=1e-12)
        # And both agree with the data up to Open3D's storage precision.
        np.testing.assert_allclose(ours.points, points, atol=1e-5)


@pytest.mark.parametrize("name", ["ours.ply", "ours.pcd"])
@pytest.mark.parametrize("ascii", [False, True])
def test_open3d_reads_our_files(tmp_path, cloud, name, ascii):
    o3d = pytest.importorskip("open3d")
    points, normals, colors = cloud
    path = tmp_path / name
    write_point_cloud(path, points, normals, colors, ascii=ascii)
    ref = o3d.io.read_point_cloud(str(path))
    ours = read_point_cloud(path)
    np.testing.assert_array_equal(np.asarray(ref.points), ours.points)
    np.testing.assert_array_equal(np.asarray(ref.normals), ours.normals)
    atol = 1e-12 if name.endswith(".ply") else 1e-6  # PCD is single precision by default
    np.testing.assert_allclose(np.asarray(ref.points), points, atol=atol)
    np.testing.assert_allclose(np.asarray(ref.normals), normals, atol=atol)
    np.testing.assert_allclose(np.asarray(ref.colors), colors, atol=1e-12)


def test_point_cloud_data_finite():
    c = PointCloudData(np.array([[0.0, 0, 0], [1, 1, 1]]), np.array([[0.0, 0, 1], [np.inf, 0, 0]]))
    assert len(c.finite()) == 1


def test_read_depth_png_and_npy_and_intrinsics(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    raw = np.array([[0, 1000], [2500, 65535]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "d.png")
    depth = difficp.io.read_depth(tmp_path / "d.png", depth_scale=1000)
    np.testing.assert_allclose(depth, raw / 1000.0)
    np.save(tmp_path / "d.npy", raw / 5000.0)
    np.testing.assert_allclose(difficp.io.read_depth(tmp_path / "d.npy", 1.0), raw / 5000.0)
    K = difficp.io.read_intrinsics([525, 520, 319.5, 239.5])
    np.testing.assert_array_equal(K, [[525, 0, 319.5], [0, 520, 239.5], [0, 0, 1]])
    (tmp_path / "cam.json").write_text(
        '{"width": 640, "height": 480, "intrinsic_matrix": [525, 0, 0, 0, 520, 0, 319.5, 239.5, 1]}'
    )
    np.testing.assert_array_equal(difficp.io.read_intrinsics(tmp_path / "cam.json"), K)

    class Located:  # any os.PathLike names a file, not only str and pathlib.Path
        def __fspath__(self) -> str:
            return str(tmp_path / "cam.json")

    np.testing.assert_array_equal(difficp.io.read_intrinsics(Located()), K)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.ones((2, 2, 3)), "one channel"),
        (-np.ones((2, 2)), ">= 0"),
        (np.full((2, 2), np.nan), "finite"),
    ],
)
def test_read_depth_refuses_bad_images(tmp_path, array, match) -> None:
    np.save(tmp_path / "d.npy", array)
    with pytest.raises(ValueError, match=match):
        difficp.io.read_depth(tmp_path / "d.npy", 1.0)


def test_read_intrinsics_refuses_bad_values(tmp_path) -> None:
    with pytest.raises(ValueError, match="4 numbers"):
        difficp.io.read_intrinsics([1, 2, 3])
    with pytest.raises(ValueError, match="focal lengths"):
        difficp.io.read_intrinsics([0, 1, 2, 3])
    with pytest.raises(ValueError, match="depth_scale"):
        difficp.io.read_depth(tmp_path / "missing.png", depth_scale=0)
