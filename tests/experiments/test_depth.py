"""Depth experiment: renderer, back-projection, samples, pose CNN, training through ICP, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

open3d = pytest.importorskip("open3d")

from difficp.geometry import depth_to_points, points_to_pixels  # noqa: E402
from difficp_experiments.depth.data import (  # noqa: E402
    TEST,
    TRAIN,
    DepthPairs,
    SceneConfig,
    collate,
    depth_to_clouds,
    load_or_build,
    rmse_between,
)
from difficp_experiments.depth.render import DepthRenderer, look_at, pinhole_intrinsics  # noqa: E402

# A body stand-in without external data: an asymmetric box, 2 m tall, feet at y = 0 like the body.
BOX = open3d.geometry.TriangleMesh.create_box(0.6, 2.0, 0.3)
BOX.translate((-0.3, 0.0, -0.1))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models only lose time to thread hand-offs on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def box_renderer() -> DepthRenderer:
    return DepthRenderer(np.asarray(BOX.vertices), np.asarray(BOX.triangles))


def _quad(z: float, half: float = 50.0) -> DepthRenderer:
    v = np.array([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return DepthRenderer(v, np.array([[0, 1, 2], [0, 2, 3]]))


def test_render_plane_at_known_distance() -> None:
    K = pinhole_intrinsics(32, 24, 60.0)
    depth = _quad(2.5).render(np.eye(4), K, 32, 24)
    assert depth.shape == (24, 32)
    # A fronto-parallel plane at z = 2.5 has z-depth 2.5 at every pixel (not ray length).
    np.testing.assert_allclose(depth, 2.5, atol=1e-5)


def test_render_tilted_plane_matches_ray_plane_intersection() -> None:
    # Plane through (0, 0, 3) with normal n; camera at the origin looking along +z.
    n = np.array([0.3, -0.2, -1.0])
    n /= np.linalg.norm(n)
    p0 = np.array([0.0, 0.0, 3.0])
    a = np.cross(n, [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    signs = ((-1, -1), (1, -1), (1, 1), (-1, 1))
    corners = np.array([p0 + 20 * (sa * a + sb * b) for sa, sb in signs])
    r = DepthRenderer(corners, np.array([[0, 1, 2], [0, 2, 3]]))
    K = pinhole_intrinsics(16, 16, 50.0)
    depth = r.render(np.eye(4), K, 16, 16)
    v, u = np.mgrid[0:16, 0:16].astype(float)
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    expected = (p0 @ n) / (d @ n)  # z of the intersection (d has unit z)
    np.testing.assert_allclose(depth, expected, rtol=1e-5)


def test_render_sphere_silhouette_and_nearest_point() -> None:
    radius, dist = 0.5, 3.0
    sphere = open3d.geometry.TriangleMesh.create_sphere(radius, resolution=60)
    r = DepthRenderer(np.asarray(sphere.vertices), np.asarray(sphere.triangles))
    res = 65  # odd, so the centre pixel looks straight at the sphere's centre
    K = pinhole_intrinsics(res, res, 40.0)
    T_cw = look_at(np.array([0.0, 0.0, dist]), np.zeros(3))
    depth = r.render(T_cw, K, res, res)
    c = res // 2
    assert depth[c, c] == pytest.approx(dist - radius, abs=2e-3)
    # The silhouette is the cone of half-angle asin(r / d): compare the pixel counts.
    half_angle = math.asin(radius / dist)
    v, u = np.mgrid[0:res, 0:res].astype(float)
    ang = np.arctan(np.hypot(u - K[0, 2], v - K[1, 2]) / K[0, 0])
    inside = ang < half_angle
    mismatch = ((depth > 0) != inside).sum()
    assert mismatch <= 0.05 * inside.sum()


def test_backprojection_round_trip() -> None:
    K = pinhole_intrinsics(20, 20, 50.0)
    n = np.array([0.2, 0.1, -1.0])
    n /= np.linalg.norm(n)
    a = np.cross(n, [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    p0 = np.array([0.1, 0.0, 2.0])
    signs = ((-1, -1), (1, -1), (1, 1), (-1, 1))
    corners = np.array([p0 + 0.6 * (sa * a + sb * b) for sa, sb in signs])
    depth = DepthRenderer(corners, np.array([[0, 1, 2], [0, 2, 3]])).render(np.eye(4), K, 20, 20)
    assert 0 < (depth > 0).sum() < depth.size  # the plane is partially in view
    d = torch.from_numpy(depth)
    Kt = torch.from_numpy(K).float()
    pts = depth_to_points(d, Kt)[d > 0]
    # Back-projected points lie on the rendered plane ...
    np.testing.assert_allclose((pts.double().numpy() - p0) @ n, 0.0, atol=1e-4)
    # ... and project back onto their own pixels.
    uv, z = points_to_pixels(pts[None], Kt)
    rows, cols = torch.nonzero(d > 0, as_tuple=True)
    torch.testing.assert_close(uv[0], torch.stack([cols, rows], -1).float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(z[0], d[d > 0])
    # The padded clouds keep interior pixels only, with the plane's normal facing the camera.
    _, normals, lengths = depth_to_clouds(d[None], Kt)
    assert 0 < lengths[0] <= (depth > 0).sum()
    got = normals[0, : lengths[0]].double().numpy()
    np.testing.assert_allclose(got, np.broadcast_to(n, got.shape), atol=1e-3)


def test_samples_reproducible_and_consistent(box_renderer: DepthRenderer) -> None:
    scene = SceneConfig(cnn_res=32, icp_res=48, n_body_points=8)
    a = DepthPairs(box_renderer, scene, seed=3, split=TRAIN, n=6)
    b = DepthPairs(box_renderer, scene, seed=3, split=TRAIN, n=3, offset=3)
    t = DepthPairs(box_renderer, scene, seed=3, split=TEST, n=6)
    for k in ("depth", "transform", "init_rmse"):
        torch.testing.assert_close(a[4][k], b[1][k], rtol=0, atol=0)  # same (seed, split, index)
    assert not torch.equal(a[0]["transform"], t[0]["transform"])  # splits never coincide
    item = a[2]
    assert item["depth"].shape == (2, 32, 32) and item["icp_depth"].shape == (2, 48, 48)
    M = item["transform"]
    assert torch.allclose(M[:3, :3] @ M[:3, :3].T, torch.eye(3), atol=1e-5)
    # Re-render independently: move the mesh itself into the camera frame (and by M) and look
    # from the identity pose; source and target must match the sample's depth maps.
    T_cw, M_np, _ = a.views(2)
    torch.testing.assert_close(torch.from_numpy(M_np).float(), M)
    verts = np.asarray(BOX.vertices)
    cam = (verts - T_cw[:3, 3]) @ T_cw[:3, :3]
    K = pinhole_intrinsics(48, 48, scene.fov_deg)
    tris = np.asarray(BOX.triangles)
    src = DepthRenderer(cam, tris).render(np.eye(4), K, 48, 48)
    tgt = DepthRenderer(cam @ M_np[:3, :3].T + M_np[:3, 3], tris).render(np.eye(4), K, 48, 48)
    np.testing.assert_allclose(item["icp_depth"][0].numpy(), src, atol=1e-4)
    np.testing.assert_allclose(item["icp_depth"][1].numpy(), tgt, atol=1e-4)
    assert (src > 0).sum() > 20 and (tgt > 0).sum() > 20
    batch = collate([a[i] for i in range(6)])
    # init_rmse is the body RMSE between identity and the motion.
    eye = torch.eye(4).expand(6, 4, 4)
    torch.testing.assert_close(
        rmse_between(batch["body"], eye, batch["transform"]),
        batch["init_rmse"],
        atol=1e-4,
        rtol=1e-4,
    )


def test_test_set_cache(tmp_path, box_renderer: DepthRenderer) -> None:
    data = DepthPairs(box_renderer, SceneConfig(cnn_res=16, n_body_points=4), 0, TEST, 3)
    first = load_or_build(tmp_path / "t.pt", data, progress=False)
    assert (tmp_path / "t.pt").is_file()
    again = load_or_build(tmp_path / "t.pt", data, progress=False)
    torch.testing.assert_close(first["depth"], again["depth"])


def _tiny(box_renderer: DepthRenderer):
    from difficp_experiments.depth.train import make_model

    torch.manual_seed(0)
    scene = SceneConfig(cnn_res=32, icp_res=32, n_body_points=64)
    batch = collate([DepthPairs(box_renderer, scene, 0, TRAIN, 8)[i] for i in range(8)])
    return scene, make_model(scene, width=8), batch


def test_tiny_training_loss_falls(box_renderer: DepthRenderer) -> None:
    from difficp_experiments.depth.train import nn_loss

    _, model, batch = _tiny(box_renderer)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = nn_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gradients_reach_cnn_through_icp(box_renderer: DepthRenderer) -> None:
    pytest.importorskip("difficp.registration")
    from difficp_experiments.depth.methods import nn_icp_forward, train_schedule

    scene, model, batch = _tiny(box_renderer)
    with torch.no_grad():  # move off the zero-initialised head so every layer gets a gradient
        model.head[-1].weight.normal_(0, 1e-2)
    T = nn_icp_forward(model, batch, scene, train_schedule(), max_points=128)
    loss = rmse_between(batch["body"], T, batch["transform"]).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    conv = model.features[0][0].weight.grad
    assert conv.abs().sum() > 0
    # The gradient is that of the ICP output, not of the network alone.
    model.zero_grad()
    rmse_between(batch["body"], model(batch["depth"]), batch["transform"]).mean().backward()
    assert not torch.allclose(conv, model.features[0][0].weight.grad)


def test_resume_matches_uninterrupted(tmp_path, box_renderer: DepthRenderer) -> None:
    from difficp_experiments.depth.train import Stage, StageConfig, make_model, nn_loss, run_stage

    scene = SceneConfig(cnn_res=16, icp_res=16, n_body_points=16)
    cfg = StageConfig(epochs=2, steps=2, batch=4, val_size=4)

    def params(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(0)
    model = make_model(scene, width=8)
    run_stage(
        Stage("nn", model, nn_loss, cfg),
        box_renderer,
        scene,
        tmp_path / "a",
        0,
        progress=False,
        log=lambda s: None,
    )
    full = params(model)

    class InterruptError(Exception):
        pass

    def crash(_: str) -> None:  # called after each epoch's checkpoint: die after the first
        raise InterruptError

    torch.manual_seed(0)
    model = make_model(scene, width=8)
    with pytest.raises(InterruptError):
        run_stage(
            Stage("nn", model, nn_loss, cfg),
            box_renderer,
            scene,
            tmp_path / "b",
            0,
            progress=False,
            log=crash,
        )
    torch.manual_seed(99)  # a fresh process would start from other weights: resume must fix it
    model = make_model(scene, width=8)
    history = run_stage(
        Stage("nn", model, nn_loss, cfg),
        box_renderer,
        scene,
        tmp_path / "b",
        0,
        resume=True,
        progress=False,
        log=lambda s: None,
    )
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    torch.testing.assert_close(params(model), full)
    assert not torch.equal(full, params(make_model(scene, width=8)))


def test_summary_and_plot(tmp_path) -> None:
    from difficp_experiments.depth.evaluate import BIN_EDGES, METHODS, summarize
    from difficp_experiments.depth.plot import plot_metrics

    g = torch.Generator().manual_seed(0)
    init = torch.rand(40, generator=g) * 1.4
    errors = {
        k: torch.rand(40, generator=g) * 0.5
        for k in ("nn", "nn_icp", "nn_then_icp", "icp_projective", "icp_nearest", "icp_schedule")
    }
    errors["icp_nearest"][:20] = 0.0  # clearly the better variant
    m = summarize(errors, init)
    assert list(m["methods"]) == list(METHODS)
    # the icp row is the stronger schedule from identity; the weaker point-to-plane is kept
    assert m["methods"]["icp"]["variant"] == "schedule"
    assert m["methods"]["icp_point_to_plane"]["variant"] == "nearest"
    source = {"icp": "icp_schedule", "icp_point_to_plane": "icp_nearest"}
    for name, d in m["methods"].items():
        e = errors[source.get(name, name)]
        assert d["success_3cm"] == pytest.approx((e < 0.03).float().mean().item())
        assert d["success_30cm"] == pytest.approx((e < 0.30).float().mean().item())
        assert len(d["bins"]) == len(BIN_EDGES) - 1
        assert sum(b["n"] for b in d["bins"]) == 40
    plot_metrics(json.loads(json.dumps(m)), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_cli_eval_committed_checkpoint(tmp_path, data_dir) -> None:
    """`difficp experiment depth eval` on a few fresh samples writes the promised JSON."""
    pytest.importorskip("difficp.registration")
    from difficp.cli import main
    from difficp_experiments.commands.experiment import committed_checkpoint

    if not committed_checkpoint().is_file():
        pytest.skip("no committed results/depth/pose_cnn.pt in this checkout")
    out = tmp_path / "eval"
    args = [
        "experiment",
        "depth",
        "eval",
        "--data-dir",
        str(data_dir),
        "--n",
        "6",
        "--seed",
        "7",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"nn", "icp", "icp_point_to_plane", "nn_icp", "nn_then_icp"}
    for m in metrics["methods"].values():
        assert 0.0 <= m["success_3cm"] <= m["success_30cm"] <= 1.0
        assert sum(b["n"] for b in m["bins"]) == 6
    assert (out / "success_vs_initial_distance.png").is_file()
    assert main(["experiment", "depth", "plot", "--out", str(out)]) == 0


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint could do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_runs_code(tmp_path, box_renderer) -> None:
    from difficp._atomic import CheckpointError
    from difficp_experiments.depth.train import Stage, StageConfig, make_model, nn_loss, run_stage

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "nn.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": _RunsCode(marker), "epoch": 0}, ckpt)
    scene = SceneConfig(cnn_res=16, icp_res=16, n_body_points=16)
    stage = Stage(
        "nn",
        make_model(scene, width=8),
        nn_loss,
        StageConfig(epochs=1, steps=1, batch=2, val_size=2),
    )
    with pytest.raises(CheckpointError, match=r"nn\.pt.*Weights only load failed"):
        run_stage(
            stage,
            box_renderer,
            scene,
            tmp_path / "run",
            0,
            resume=True,
            progress=False,
            log=lambda s: None,
        )
    assert not marker.exists()


def test_resume_falls_back_to_previous_checkpoint_when_latest_is_truncated(
    tmp_path, box_renderer
) -> None:
    from difficp_experiments.depth.train import Stage, StageConfig, make_model, nn_loss, run_stage

    scene = SceneConfig(cnn_res=16, icp_res=16, n_body_points=16)
    cfg = StageConfig(epochs=2, steps=2, batch=4, val_size=4)

    def params(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(0)
    model = make_model(scene, width=8)
    run_stage(
        Stage("nn", model, nn_loss, cfg),
        box_renderer,
        scene,
        tmp_path,
        0,
        progress=False,
        log=lambda s: None,
    )
    full = params(model)
    ckpt = tmp_path / "checkpoints" / "nn.pt"
    assert (tmp_path / "checkpoints" / "nn.pt.prev").is_file()  # epoch 1's, kept
    assert not list(ckpt.parent.glob("*.tmp"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # the latest (epoch 2) is cut short
    torch.manual_seed(99)
    model = make_model(scene, width=8)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        history = run_stage(
            Stage("nn", model, nn_loss, cfg),
            box_renderer,
            scene,
            tmp_path,
            0,
            resume=True,
            progress=False,
            log=lambda s: None,
        )
    # Resumed after epoch 1 and re-ran epoch 2: the same weights as the uninterrupted run.
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    torch.testing.assert_close(params(model), full)


def test_final_checkpoint_written_atomically_and_loaded_safely(tmp_path, monkeypatch) -> None:
    from difficp_experiments.depth.train import load_final, make_model, save_final

    scene = SceneConfig(cnn_res=16, icp_res=16, n_body_points=16)
    path = tmp_path / "pose_cnn.pt"
    save_final(path, {"nn": make_model(scene, width=8)}, scene, {"seed": 1})
    good = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        if isinstance(f, (str, Path)):
            f = open(f, "wb")  # noqa: SIM115
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_final(path, {"nn": make_model(scene, width=8)}, scene, {"seed": 2})
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    nets, _, info = load_final(path)
    assert info == {"seed": 1} and set(nets) == {"nn"}
