"""``difficp register`` and ``difficp demo``, run in-process through :func:`difficp.cli.main`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from difficp.cli import build_parser, main
from difficp.io import read_point_cloud, read_transform, write_point_cloud, write_transform
from difficp_experiments.demos.rigid import sample_terrain


def _true_transform() -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(
        np.deg2rad(8.0) * np.array([0.3, -0.5, 0.8]) / math.sqrt(0.98)
    ).as_matrix()
    T[:3, 3] = [0.08, -0.05, 0.04]
    return T


def _rotation_error_deg(A: np.ndarray, B: np.ndarray) -> float:
    c = (np.trace(A[:3, :3].T @ B[:3, :3]) - 1) / 2
    return math.degrees(math.acos(float(np.clip(c, -1.0, 1.0))))


@pytest.fixture
def pair(tmp_path):
    """(source path, target path, true source->target transform): a terrain patch and the same
    patch, independently resampled, seen from a frame moved by the inverse of the truth."""
    rng = np.random.default_rng(3)
    target, _ = sample_terrain(4000, rng)
    other, _ = sample_terrain(4000, rng)
    T = _true_transform()
    source = (other - T[:3, 3]) @ T[:3, :3]  # T^-1 applied to another sampling
    src, tgt = tmp_path / "source.ply", tmp_path / "target.pcd"
    write_point_cloud(src, source)
    write_point_cloud(tgt, target, double=True)
    return src, tgt, T


def _printed_transform(out: str) -> np.ndarray:
    lines = out.splitlines()
    i = lines.index("transform (source -> target):")
    T = np.array([[float(v) for v in ln.split()] for ln in lines[i + 1 : i + 5]])
    assert T.shape == (4, 4)
    return T


def _printed(out: str, key: str) -> str:
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith(key + ":"))


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------


def test_register_recovers_known_transform(pair, tmp_path, capsys):
    src, tgt, T_true = pair
    out_T, aligned = tmp_path / "T.txt", tmp_path / "aligned.xyz"
    code = main(
        ["register", str(src), str(tgt), "--max-distance", "0.2", "--threads", "1",
         "--out", str(out_T), "--aligned", str(aligned)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = _printed_transform(captured.out)
    written = read_transform(out_T)
    np.testing.assert_allclose(printed, written, atol=1e-8)  # printed with 9 decimals
    assert _rotation_error_deg(written, T_true) < 0.5
    assert np.linalg.norm(written[:3, 3] - T_true[:3, 3]) < 0.01
    # point_to_plane (the default) needed target normals: the PCD has none, so they were estimated.
    assert "normals estimated for: target" in captured.out
    assert float(_printed(captured.out, "fitness")) > 0.95
    assert float(_printed(captured.out, "inlier_rmse")) < 0.02
    assert int(_printed(captured.out, "iterations")) >= 1
    assert _printed(captured.out, "converged") in ("true", "false")
    # The aligned source (with its estimated-or-absent normals) lies on the target.
    moved = read_point_cloud(aligned).points
    source = read_point_cloud(src).points
    np.testing.assert_allclose(moved, source @ written[:3, :3].T + written[:3, 3], atol=1e-9)


@pytest.mark.parametrize("metric", ["point_to_point", "symmetric", "gicp"])
def test_register_other_metrics_and_init(pair, tmp_path, capsys, metric):
    src, tgt, T_true = pair
    # Start from a perturbed truth so that point_to_point converges within its basin quickly.
    init = T_true.copy()
    init[:3, 3] += [0.02, 0.0, -0.01]
    write_transform(tmp_path / "init.txt", init)
    code = main(
        ["register", str(src), str(tgt), "--metric", metric, "--init", str(tmp_path / "init.txt"),
         "--max-distance", "0.1", "--max-iterations", "60", "--dtype", "float32",
         "--threads", "1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    T = _printed_transform(captured.out)
    assert _rotation_error_deg(T, T_true) < 1.0
    assert np.linalg.norm(T[:3, 3] - T_true[:3, 3]) < 0.02
    if metric == "symmetric":  # needs both normals; neither file has them
        assert "normals estimated for: source, target" in captured.out
    else:
        assert "normals estimated" not in captured.out


def test_register_uses_normals_from_the_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pts, nrm = sample_terrain(3000, rng)
    write_point_cloud(tmp_path / "t.ply", pts, nrm)
    write_point_cloud(tmp_path / "s.npy", pts + np.array([0.01, 0.0, 0.0]))
    code = main(["register", str(tmp_path / "s.npy"), str(tmp_path / "t.ply"), "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "normals estimated" not in captured.out
    T = _printed_transform(captured.out)
    np.testing.assert_allclose(T[:3, 3], [-0.01, 0.0, 0.0], atol=1e-3)


def _bad_inputs(tmp_path):
    good = tmp_path / "good.xyz"
    write_point_cloud(good, np.random.default_rng(0).normal(size=(50, 3)))
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\n")
    (tmp_path / "cols.txt").write_text("1 2 3 4\n")
    (tmp_path / "two.xyz").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "init.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    g = str(good)
    return [
        (["register", str(tmp_path / "missing.ply"), g], "no such file"),
        (["register", str(tmp_path / "bad.ply"), g], "end_header"),
        (["register", g, str(tmp_path / "cols.txt")], "3 columns"),
        (["register", g, str(tmp_path / "cloud.obj")], "unknown point-cloud extension"),
        (["register", g, str(tmp_path / "two.xyz")], "at least 3"),
        (["register", g, g, "--init", str(tmp_path / "init.txt")], "4 lines of 4"),
        (["register", g, g, "--max-distance", "-1"], "--max-distance"),
        (["register", g, g, "--max-iterations", "0"], "max-iterations"),
        (["register", g, g, "--metric", "point_to_plane", "--solver", "svd"], "svd"),
        (["register", g, g, "--out", str(tmp_path / "no" / "such" / "dir" / "T.txt")], "write"),
    ]


def test_register_bad_input_exits_2_with_one_line(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 2, (argv, captured.err)
        err = captured.err.strip()
        assert "Traceback" not in err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("difficp register: error:")
        assert message in err, (argv, err)


def _lzf_pcd(body: bytes, points: int = 2) -> bytes:
    header = (
        "VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
        f"WIDTH {points}\nHEIGHT 1\nPOINTS {points}\nDATA binary_compressed\n"
    )
    sizes = np.array([len(body), 12 * points], dtype="<u4").tobytes()
    return header.encode() + sizes + body


def _broken_files(tmp_path):
    """(file, expected message): files that used to crash or pass silently."""
    f = tmp_path
    (f / "empty.npy").write_bytes(b"")
    # A literal run of 2 bytes, then a back reference whose offset byte is missing.
    (f / "lzf.pcd").write_bytes(_lzf_pcd(b"\x01ab\xe0"))
    np.save(f / "huge.npy", np.random.default_rng(0).normal(size=(50, 3)) * 1e200)
    (f / "short.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
        "property float z\nend_header\n0 0 0\n1 1\n2 2 2 2\n3 1 2\n"
    )
    (f / "neg.pcd").write_bytes(
        b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 4\nHEIGHT 1\n"
        b"POINTS -1\nDATA binary\n"
        + np.random.default_rng(1).random((4, 3)).astype("<f4").tobytes()
    )
    np.save(f / "complex.npy", np.random.default_rng(2).normal(size=(50, 3)) * (1 + 1j))
    (f / "folder.ply").mkdir()
    return [
        ("empty.npy", "not a readable .npy array"),
        ("lzf.pcd", "corrupt LZF data"),
        ("huge.npy", "too large for float64 arithmetic"),
        ("short.ply", "vertex 1 has 2 values"),
        ("neg.pcd", "POINTS -1 is negative"),
        ("complex.npy", "real numbers"),
        ("folder.ply", "is a directory"),
    ]


def test_register_broken_files_exit_2_with_one_line(tmp_path, capsys):
    good = tmp_path / "good.xyz"
    write_point_cloud(good, np.random.default_rng(0).normal(size=(50, 3)))
    for name, message in _broken_files(tmp_path):
        code = main(["register", str(good), str(tmp_path / name), "--threads", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(
            f"difficp register: error: cannot read target {tmp_path / name}"
        ) or err.startswith(f"difficp register: error: target {tmp_path / name}"), err
        assert message in err, (name, err)


def test_register_names_the_flag_and_prints_floats_as_given(tmp_path, capsys):
    good = tmp_path / "good.xyz"
    write_point_cloud(good, np.random.default_rng(0).normal(size=(50, 3)))
    for flag, value in [
        ("--max-distance", "-0.1"),
        ("--temperature", "1e-300"),
        ("--kernel-scale", "nan"),
    ]:
        assert main(["register", str(good), str(good), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be" in err and f"got {value}" in err, err
        assert "ICPConfig" not in err


def test_register_warns_about_dropped_non_finite_points(pair, tmp_path, capsys):
    src, tgt, _ = pair
    points = read_point_cloud(src).points
    points[[3, 10, 20]] = np.nan
    write_point_cloud(tmp_path / "nan.ply", points)
    assert (
        main(
            [
                "register",
                str(tmp_path / "nan.ply"),
                str(tgt),
                "--max-distance",
                "0.2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"warning: dropped 3 of {len(points)} points of source" in captured.err
    assert f"source: {len(points) - 3} points" in captured.out


def test_register_checks_output_paths_before_running_icp(pair, tmp_path, capsys, monkeypatch):
    import difficp

    def no_icp(*args, **kwargs):
        raise AssertionError("ICP ran although an output cannot be written")

    monkeypatch.setattr(difficp, "icp", no_icp)
    src, tgt, _ = pair
    (tmp_path / "taken").mkdir()
    cases = [
        (["--aligned", str(tmp_path / "missing" / "a.ply")], "does not exist"),
        (["--out", str(tmp_path / "taken")], "is a directory"),
        (["--aligned", str(tmp_path / "a.obj")], "unknown point-cloud extension"),
    ]
    for extra, message in cases:
        code = main(["register", str(src), str(tgt), "--out", str(tmp_path / "T.txt"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.ply", "taken", "target.pcd"]


def test_register_failed_write_prints_result_and_writes_nothing(
    pair, tmp_path, capsys, monkeypatch
):
    import difficp.io

    src, tgt, _ = pair
    (tmp_path / "T.txt").write_text("old\n")

    def disk_full(f, *args, **kwargs):
        f.write(b"ply\npartial")
        raise OSError("No space left on device")

    monkeypatch.setattr(difficp.io.ply, "write_ply", disk_full)
    code = main(
        [
            "register",
            str(src),
            str(tgt),
            "--max-distance",
            "0.2",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "T.txt"),
            "--aligned",
            str(tmp_path / "aligned.ply"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "transform (source -> target):" in captured.out  # the result is not lost
    assert captured.err.strip().splitlines() == [
        "difficp register: error: cannot write outputs (none written): No space left on device"
    ]
    # All or nothing: the transform file keeps its old content, and no partial file is left.
    assert (tmp_path / "T.txt").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.txt", "source.ply", "target.pcd"]


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def test_demo_parser_defaults():
    args = build_parser("demo").parse_args(["demo"])
    assert args.kind == "rigid" and args.out is None and args.metric == "point_to_plane"
    args = build_parser("demo").parse_args(["demo", "nonrigid", "--seed", "3"])
    assert args.kind == "nonrigid" and args.seed == 3
    with pytest.raises(SystemExit):
        build_parser("demo").parse_args(["demo", "wobbly"])


def test_demo_rigid_writes_png_and_small_errors(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "rigid", "--out", str(out), "--seed", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "rotation error" in captured.out
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas
    m = json.loads((out / "metrics.json").read_text())
    assert m["true_rotation_deg"] == 20.0
    assert m["rotation_error_deg"] < 2.0
    assert m["translation_error_relative"] < 0.01
    assert m["fitness_after"] > m["fitness_before"] + 0.2
    assert m["rmse_after"] < m["rmse_before"]
    # The estimate explains the data as well as the truth does.
    assert m["fitness_after"] > 0.95 * m["fitness_true_pose"]
    T = np.array(m["transform"])
    assert T.shape == (4, 4) and np.allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-6)


def test_demo_nonrigid_missing_module_message(tmp_path, capsys, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the module were not installed.
    monkeypatch.setitem(sys.modules, "difficp_experiments.demos.nonrigid", None)
    code = main(["demo", "nonrigid", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert "non-rigid demo" in captured.err and "Traceback" not in captured.err


def test_demo_nonrigid_dispatches_to_run_demo(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("difficp_experiments.demos.nonrigid")
    fake.run_demo = lambda args: calls.append(args) or 0
    monkeypatch.setitem(sys.modules, "difficp_experiments.demos.nonrigid", fake)
    assert main(["demo", "nonrigid", "--out", str(tmp_path), "--seed", "7"]) == 0
    assert len(calls) == 1 and calls[0].seed == 7 and calls[0].out == str(tmp_path)


# --------------------------------------------------------------------------------------------
# Real data: the 3DMatch pair, against Open3D
# --------------------------------------------------------------------------------------------


@pytest.fixture
def scan_pair():
    import os
    from pathlib import Path

    value = os.environ.get("DIFFICP_DATA")
    if not value:
        pytest.skip("DIFFICP_DATA is not set")
    folder = Path(value) / "scans" / "open3d_3dmatch_pair"
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing")
    return folder / "feature_cloud_bin_0.pcd", folder / "feature_cloud_bin_1.pcd"


@pytest.mark.parametrize(
    ("metric", "estimation"),
    [("point_to_plane", "TransformationEstimationPointToPlane"),
     ("point_to_point", "TransformationEstimationPointToPoint")],
)  # fmt: skip
def test_register_matches_open3d_on_3dmatch(scan_pair, tmp_path, capsys, metric, estimation):
    o3d = pytest.importorskip("open3d")
    src, tgt = scan_pair
    code = main(
        ["register", str(src), str(tgt), "--metric", metric, "--max-distance", "0.05",
         "--threads", "1", "--out", str(tmp_path / "T.txt")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ref = o3d.pipelines.registration.registration_icp(
        o3d.io.read_point_cloud(str(src)),
        o3d.io.read_point_cloud(str(tgt)),
        0.05,
        np.eye(4),
        getattr(o3d.pipelines.registration, estimation)(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=30),
    )
    T = read_transform(tmp_path / "T.txt")
    np.testing.assert_allclose(T, ref.transformation, atol=1e-6)
    assert abs(float(_printed(captured.out, "fitness")) - ref.fitness) < 1e-4
    assert abs(float(_printed(captured.out, "inlier_rmse")) - ref.inlier_rmse) < 1e-5


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import difficp

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"difficp {difficp.__version__}"


def test_misspelt_option_suggests_the_right_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["register", "a.ply", "b.ply", "--maxdistance", "0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "difficp register" in err  # the sub-command's usage, not the top-level one
    assert "--maxdistance (did you mean --max-distance?)" in err


def test_misspelt_command_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["regster", "a.ply", "b.ply"])
    assert "did you mean register?" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Commands are plugins: the difficp.commands entry-point group
# --------------------------------------------------------------------------------------------


def _entry_points(**modules: str) -> list:
    from importlib.metadata import EntryPoint

    return [EntryPoint(name, value, "difficp.commands") for name, value in modules.items()]


def test_commands_are_discovered_from_the_entry_point_group(monkeypatch, capsys):
    import difficp.cli as cli

    calls = []
    plugin = types.ModuleType("some_plugin.hello")

    def add_parser(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: calls.append(args.name) or 0)

    plugin.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "some_plugin.hello", plugin)
    eps = _entry_points(register="difficp.commands.register", hello="some_plugin.hello")
    monkeypatch.setattr(cli, "entry_points", lambda: eps)
    assert main(["hello", "--name", "you"]) == 0
    assert calls == ["you"]
    assert main([]) == 0  # the top-level help lists both, without importing either
    out = capsys.readouterr().out
    assert "register" in out and "hello" in out and "demo" not in out
    with pytest.raises(SystemExit):
        main(["helo"])
    assert "did you mean hello?" in capsys.readouterr().err


def test_pyproject_registers_every_command_the_readme_names():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    import difficp.cli as cli

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    group = pyproject["project"]["entry-points"]["difficp.commands"]
    assert group == {
        "register": "difficp.commands.register",
        "warmup": "difficp.commands.warmup",
        "demo": "difficp_experiments.commands.demo",
        "experiment": "difficp_experiments.commands.experiment",
        "benchmark": "difficp_experiments.commands.benchmark",
        "train": "difficp_experiments.commands.train",
    }
    assert set(group) == set(cli.HELP)


def test_missing_extra_is_one_line_naming_the_extra(monkeypatch, capsys):
    import difficp.cli as cli

    monkeypatch.setattr(cli, "_extras_providing", lambda module: ["experiments"])
    # The demo's module imports again, and finds matplotlib missing (a None entry in
    # sys.modules makes it look uninstalled).
    monkeypatch.delitem(sys.modules, "difficp_experiments.commands.demo", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    eps = _entry_points(demo="difficp_experiments.commands.demo")
    monkeypatch.setattr(cli, "entry_points", lambda: eps)
    assert main(["demo", "--seed", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "difficp demo: error: needs matplotlib, part of the experiments extra: "
        'pip install "difficp[experiments]"'
    ]
    # Without the experiments package at all (not in the extras' requirements: it is ours).
    monkeypatch.setattr(cli, "_extras_providing", lambda module: [])
    monkeypatch.setitem(sys.modules, "difficp_experiments.commands.demo", None)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "difficp demo: error: needs difficp_experiments, part of the experiments extra: "
        'pip install "difficp[experiments]"'
    ]


def test_missing_extra_while_running_and_real_bugs(monkeypatch, capsys):
    import difficp.cli as cli

    def add_parser(subparsers):
        p = subparsers.add_parser("job")
        p.add_argument("--missing")
        p.set_defaults(func=lambda args: importlib.import_module(args.missing))

    import importlib

    plugin = types.ModuleType("some_plugin.job")
    plugin.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "some_plugin.job", plugin)
    monkeypatch.setattr(cli, "entry_points", lambda: _entry_points(job="some_plugin.job"))
    monkeypatch.setattr(cli, "_extras_providing", lambda m: ["open3d", "experiments"])
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert main(["job", "--missing", "h5py"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'difficp job: error: needs h5py, part of the experiments extra: pip install "difficp[experiments]"'
    ]
    # A module no extra provides is a bug (or the plugin's own business): a traceback, as before.
    monkeypatch.setattr(cli, "_extras_providing", lambda m: [])
    with pytest.raises(ModuleNotFoundError):
        main(["job", "--missing", "no_such_module_xyz"])


def test_extras_are_read_from_the_distribution_metadata(monkeypatch):
    import importlib.metadata

    import difficp.cli as cli

    requires = [
        "torch>=2.3",
        'open3d>=0.18; extra == "open3d"',
        'matplotlib>=3.7; extra == "experiments"',
        'open3d>=0.18; extra == "experiments"',
        'difficp[experiments]; extra == "test"',
    ]
    monkeypatch.setattr(importlib.metadata, "requires", lambda dist: requires)
    assert cli._extras_providing("open3d") == ["open3d", "experiments"]
    assert cli._extras_providing("matplotlib") == ["experiments"]
    assert cli._extras_providing("torch") == []
    err = ModuleNotFoundError("No module named 'open3d.core'", name="open3d.core")
    assert "the experiments extra" in cli.missing_extra_message(err)


def test_help_and_version_import_no_command_module():
    import subprocess

    code = (
        "import sys\n"
        "from difficp.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "loaded = [m for m in sys.modules if '.commands.' in m or m.startswith('difficp_experiments')]\n"
        "print('LOADED', loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_missing_max_distance_warns_with_a_suggested_value(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20), indexing="ij"), -1).reshape(-1, 2)
    points = np.c_[grid * 0.01, rng.normal(scale=1e-4, size=len(grid))]  # 1 cm spacing
    path = str(tmp_path / "cloud.xyz")
    write_point_cloud(path, points)
    assert main(["register", path, path, "--metric", "point_to_point"]) == 0
    err = capsys.readouterr().err
    assert "no --max-distance" in err
    suggested = float(err.split("here about ")[1].split(")")[0])
    assert 0.02 <= suggested <= 0.03  # 2.5x the 1 cm spacing
    assert main(["register", path, path, "--max-distance", "0.03"]) == 0
    assert "no --max-distance" not in capsys.readouterr().err


def test_init_printed_with_three_decimals_is_projected_not_refused(tmp_path, capsys) -> None:
    angle = math.radians(10)
    c, s = round(math.cos(angle), 3), round(math.sin(angle), 3)  # off SO(3) by ~1e-4..1e-3
    (tmp_path / "T0.txt").write_text(f"{c} {-s} 0 0\n{s} {c} 0 0\n0 0 1 0\n0 0 0 1\n")
    cloud = str(tmp_path / "cloud.xyz")
    write_point_cloud(cloud, np.random.default_rng(1).uniform(size=(200, 3)))
    args = ["register", cloud, cloud, "--max-distance", "0.5", "--init", str(tmp_path / "T0.txt")]
    assert main(args) == 0
    (tmp_path / "T1.txt").write_text("1 0.2 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    args[-1] = str(tmp_path / "T1.txt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "max |R^T R - I| = 0.2" in err and "tolerance 0.01" in err


def test_help_imports_no_command_module_nor_torch() -> None:
    code = (
        "import sys; from difficp.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'difficp.commands.register') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout


def _write_depth_png(path, depth_m: np.ndarray, scale: float = 1000.0) -> None:
    from PIL import Image

    Image.fromarray(np.round(depth_m * scale).astype(np.uint16)).save(path)


def test_register_depth_images_projective_and_nearest(tmp_path, capsys) -> None:
    pytest.importorskip("PIL")
    H, W = 60, 80
    v, u = np.mgrid[0:H, 0:W]
    bumps = 0.05 * np.sin(u / 6.0) * np.cos(v / 5.0)
    target = 1.5 + 0.004 * u + bumps
    source = np.roll(target, shift=(1, 2), axis=(0, 1))  # the camera moved a little
    _write_depth_png(tmp_path / "a.png", source)
    _write_depth_png(tmp_path / "b.png", target)
    (tmp_path / "cam.json").write_text(json.dumps({"fx": 70, "fy": 70, "cx": 39.5, "cy": 29.5}))
    base = ["register", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--max-distance", "0.1"]
    for extra in (["--correspondence", "projective"], ["--correspondence", "nearest"]):
        out = str(tmp_path / "T.txt")
        assert main([*base, "--intrinsics", str(tmp_path / "cam.json"), *extra, "--out", out]) == 0
        T = read_transform(out)
        # shifting the image by (1, 2) pixels at ~1.6 m is a translation of ~(2, 1) * z / f
        assert abs(T[0, 3] + 2 * 1.6 / 70) < 0.02 and abs(T[1, 3] + 1.6 / 70) < 0.02
        assert "fitness" in capsys.readouterr().out
    assert main([*base, "--intrinsics", "70", "70", "39.5", "29.5"]) == 0


def test_register_depth_images_need_intrinsics_and_projective_needs_depth(tmp_path, capsys):
    pytest.importorskip("PIL")
    _write_depth_png(tmp_path / "a.png", np.ones((8, 8)))
    cloud = str(tmp_path / "cloud.xyz")
    write_point_cloud(cloud, np.random.default_rng(0).uniform(size=(50, 3)))
    assert main(["register", str(tmp_path / "a.png"), cloud]) == 2
    assert "need --intrinsics" in capsys.readouterr().err
    assert main(["register", cloud, cloud, "--correspondence", "projective"]) == 2
    assert "needs a depth-image target" in capsys.readouterr().err
    assert main(["register", str(tmp_path / "a.png"), cloud, "--intrinsics", "1", "2", "3"]) == 2
    assert "4 numbers" in capsys.readouterr().err


def test_register_multiscale_and_voxel_size(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, size=(3000, 2))
    target = np.c_[xy, 0.3 * np.sin(2 * xy[:, 0]) * np.cos(3 * xy[:, 1])]
    angle = math.radians(15)
    R = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    source = (target - np.array([0.15, -0.1, 0.05])) @ R  # the inverse of p -> R p + t
    src, tgt = str(tmp_path / "s.xyz"), str(tmp_path / "t.xyz")
    write_point_cloud(src, source)
    write_point_cloud(tgt, target)
    out = str(tmp_path / "T.txt")
    scales = "0.2:0.5:30,0.1:0.2:30,none:0.05:30"
    assert main(["register", src, tgt, "--scales", scales, "--out", out]) == 0
    T = read_transform(out)
    np.testing.assert_allclose(T[:3, :3], R, atol=1e-3)
    assert "no --max-distance" not in capsys.readouterr().err  # the stages set the distances
    assert main(["register", src, tgt, "--voxel-size", "0.05", "--max-distance", "0.5"]) == 0
    capsys.readouterr()
    for bad, message in (
        (["--scales", "0.1:0.2"], "voxel_size:max_distance:max_iterations"),
        (["--voxel-size", "-1"], "--voxel-size must be a positive number"),
        (["--voxel-size", "0.1", "--scales", scales], "exclude each other"),
    ):
        assert main(["register", src, tgt, *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "torch_first", "expected"),
    [(None, False, "30000"), ("5", False, "5"), (None, True, None)],
)
def test_cli_shortens_openmp_spinning_only_before_torch_loads_and_keeps_the_users_value(
    preset: str | None, torch_first: bool, expected: str | None
) -> None:
    # A fresh interpreter: this one has PyTorch loaded already.
    code = (
        ("import torch\n" if torch_first else "")
        + "import os, sys\n"
        + "from difficp.cli import main\n"
        + "main([])\n"
        + "print(os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stderr.strip().splitlines()[-1] == str(expected)


def test_register_stops_on_small_steps_when_asked(pair, capsys):
    src, tgt, T_true = pair
    runs = {}
    for name, extra in (
        ("default", []),
        ("coarse", ["--translation-tolerance", "0.01", "--rotation-tolerance", "0.5"]),
    ):
        code = main(["register", str(src), str(tgt), "--max-distance", "0.2", "--threads", "1",
                     "--max-iterations", "60", *extra])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        runs[name] = (int(_printed(captured.out, "iterations")), _printed_transform(captured.out))
    # the coarse small-step rule stops earlier, still near the truth
    assert runs["coarse"][0] < runs["default"][0]
    assert _rotation_error_deg(runs["coarse"][1], T_true) < 1.0
    code = main(["register", str(src), str(tgt), "--rotation-tolerance", "-1"])
    assert code == 2
    assert "--rotation-tolerance must be >= 0" in capsys.readouterr().err
