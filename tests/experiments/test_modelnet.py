"""ModelNet loader, protocols, metrics, models and benchmark harness (fast; no data needed)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from difficp_experiments.modelnet import metrics as M
from difficp_experiments.modelnet.data import (
    ModelNetPairs,
    crop_by_plane,
    dataset_files,
    euler_xyz_to_matrix,
    load_modelnet,
    normalize_unit_sphere,
)
from difficp_experiments.modelnet.dcp import DCP, procrustes
from difficp_experiments.modelnet.pointnetlk import PointNetLK, hat, se3_exp


def _write_h5(path, data: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data.astype(np.float32))
        f.create_dataset("label", data=labels.reshape(-1, 1).astype(np.int64))


def _blobs(n: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random anisotropic shapes inside the unit sphere (no symmetry: ICP-friendly)."""
    x = rng.standard_normal((n, points, 3)) * np.array([0.6, 0.35, 0.2])
    x[..., 0] += 0.3 * x[..., 1] ** 2  # bend them so that no reflection maps one onto itself
    return normalize_unit_sphere(x)


@pytest.fixture
def tiny_root(tmp_path):
    """A standard ``modelnet40_ply_hdf5_2048`` folder (two train files, one test) and a
    raw-units ModelNet10 file, all written here."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    _write_h5(folder / "ply_data_train0.h5", _blobs(3, 1100, rng), np.array([0, 1, 2]))
    _write_h5(folder / "ply_data_train1.h5", _blobs(2, 1100, rng), np.array([3, 4]))
    _write_h5(folder / "ply_data_test0.h5", _blobs(6, 1100, rng), np.array([0, 5, 10, 20, 30, 39]))
    raw = rng.uniform(-50, 200, (4, 1024, 3)) * np.array([1.0, 2.0, 0.5]) + 1000.0
    _write_h5(tmp_path / "modelnet10" / "modelnet10_poisson1024_test.h5", raw, np.arange(4))
    return tmp_path


def test_loader_reads_standard_folder_and_concatenates(tiny_root):
    files = dataset_files(tiny_root, "modelnet40", "train")
    assert [f.name for f in files] == ["ply_data_train0.h5", "ply_data_train1.h5"]
    pts, labels = load_modelnet(tiny_root, "modelnet40", "train")
    assert pts.shape == (5, 1100, 3) and pts.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4])
    # the folder itself can be given too
    pts2, _ = load_modelnet(tiny_root / "modelnet40_ply_hdf5_2048", "modelnet40", "train")
    np.testing.assert_array_equal(pts, pts2)
    with pytest.raises(FileNotFoundError):
        load_modelnet(tiny_root, "modelnet40_airplane", "test")


def test_modelnet10_is_centred_and_scaled_into_unit_sphere(tiny_root):
    pts, _ = load_modelnet(tiny_root, "modelnet10", "test")
    assert pts.shape == (4, 1024, 3)
    radius = np.linalg.norm(pts, axis=-1).max(axis=1)
    np.testing.assert_allclose(radius, 1.0, rtol=1e-5)
    centre = 0.5 * (pts.max(axis=1) + pts.min(axis=1))
    np.testing.assert_allclose(centre, 0.0, atol=1e-5)


def _pairs(protocol: str, seed: int = 0, **kw) -> ModelNetPairs:
    rng = np.random.default_rng(1)
    return ModelNetPairs(
        _blobs(6, 1024, rng), np.array([0, 1, 2, 3, 4, 5]), protocol, seed=seed, num_classes=6, **kw
    )


@pytest.mark.parametrize("protocol", ["clean", "noise", "noise_independent", "partial"])
def test_protocols_are_deterministic_per_seed_and_index(protocol):
    a, b, c = _pairs(protocol).pair(3), _pairs(protocol).pair(3), _pairs(protocol, seed=7).pair(3)
    for field in ("source", "target", "rotation", "translation"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.allclose(a.rotation, c.rotation)
    assert not np.allclose(a.rotation, _pairs(protocol).pair(2).rotation)


def test_clean_pair_is_an_exact_permuted_rigid_copy_within_dcp_ranges():
    ds = _pairs("clean")
    for i in range(len(ds)):
        p = ds.pair(i)
        moved = p.source @ p.rotation.T + p.translation
        dist, idx = cKDTree(p.target).query(moved)
        assert dist.max() < 1e-5 and len(set(idx)) == len(idx)  # a permutation
        assert not np.allclose(moved, p.target)  # ...and really permuted
        z, y, x = M.euler_zyx_deg(p.rotation[None])[0]  # R = Rx Ry Rz
        assert all(-1e-4 <= a <= 45 + 1e-4 for a in (x, y, z))
        assert np.all(np.abs(p.translation) <= 0.5)
        np.testing.assert_allclose(
            p.rotation, euler_xyz_to_matrix(np.radians([x, y, z])), atol=1e-5
        )


def test_noise_protocols():
    shared, indep = _pairs("noise").pair(0), _pairs("noise_independent").pair(0)
    # DCP's noise: the target is an exact rigid copy of the noisy source
    moved = shared.source @ shared.rotation.T + shared.translation
    assert cKDTree(shared.target).query(moved)[0].max() < 1e-5
    # independent noise: residuals of about sigma * sqrt(2) per coordinate, clipped
    moved = indep.source @ indep.rotation.T + indep.translation
    d = cKDTree(indep.target).query(moved)[0]
    assert 0.005 < np.median(d) < 0.05 and d.max() < 2 * math.sqrt(3) * 0.05


def test_partial_keeps_70_percent_on_one_side_of_a_plane():
    p = _pairs("partial").pair(1)
    assert p.source.shape == (717, 3) and p.target.shape == (717, 3)
    pts = np.random.default_rng(0).standard_normal((1000, 3))
    kept = crop_by_plane(pts, np.random.default_rng(5))
    assert len(kept) == 700
    # a half-space: along the plane's normal (the rng's first draw) every kept point lies
    # above every dropped one
    dropped = np.array(sorted(set(map(tuple, pts)) - set(map(tuple, kept))))
    rng = np.random.default_rng(5)
    n = rng.standard_normal(3)
    n /= np.linalg.norm(n)
    assert (kept @ n).min() >= (dropped @ n).max() - 1e-9


def test_unseen_splits_classes_in_halves():
    rng = np.random.default_rng(2)
    pts, labels = _blobs(10, 1024, rng), np.arange(10) % 10
    test = ModelNetPairs(pts, labels, "unseen", split="test", num_classes=10)
    train = ModelNetPairs(pts, labels, "unseen", split="train", num_classes=10)
    assert sorted(test.labels) == [5, 6, 7, 8, 9] and sorted(train.labels) == [0, 1, 2, 3, 4]


def _rz(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_metrics_match_hand_computed_values():
    R_gt = np.stack([np.eye(3), np.eye(3)])
    R_est = np.stack([_rz(10.0), np.eye(3)])
    t_gt = np.zeros((2, 3))
    t_est = np.array([[0.03, 0.04, 0.0], [0.0, 0.0, 0.001]])
    m = M.dcp_metrics(R_est, t_est, R_gt, t_gt)
    # Euler errors: (10, 0, 0) and (0, 0, 0) -> six entries, one of 10 degrees
    assert m["MSE_R"] == pytest.approx(100 / 6)
    assert m["RMSE_R"] == pytest.approx(math.sqrt(100 / 6))
    assert m["MAE_R"] == pytest.approx(10 / 6)
    assert m["MSE_t"] == pytest.approx((0.03**2 + 0.04**2 + 0.001**2) / 6)
    assert m["MAE_t"] == pytest.approx((0.03 + 0.04 + 0.001) / 6)
    rot, trans = M.isotropic_errors(R_est, t_est, R_gt, t_gt)
    np.testing.assert_allclose(rot, [10.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(trans, [0.05, 0.001])
    assert M.success_rate(rot, trans) == 0.5
    assert M.all_metrics(R_est, t_est, R_gt, t_gt)["success_rate"] == 0.5


def test_euler_zyx_reads_dcp_composition():
    angles = np.radians([10.0, 20.0, 30.0])  # (x, y, z)
    z, y, x = M.euler_zyx_deg(euler_xyz_to_matrix(angles)[None])[0]
    np.testing.assert_allclose([x, y, z], [10.0, 20.0, 30.0], atol=1e-9)


def test_procrustes_recovers_rigid_motion():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 50, 3, generator=g, dtype=torch.float64)
    R = torch.from_numpy(np.stack([_rz(a) for a in (5.0, 60.0, 170.0)]))
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)
    R_est, t_est = procrustes(src, src @ R.transpose(1, 2) + t[:, None])
    torch.testing.assert_close(R_est, R)
    torch.testing.assert_close(t_est, t)


def test_dcp_forward_shapes_and_compact_v2_starts_as_v1():
    torch.manual_seed(0)
    v1 = DCP(pointer="identity").eval()
    v2 = DCP(pointer="compact_transformer", ff_dims=256).eval()
    v2.load_state_dict(v1.state_dict(), strict=False)
    src, tgt = torch.randn(2, 40, 3), torch.randn(2, 48, 3)
    with torch.no_grad():
        R1, t1 = v1(src, tgt)
        R2, t2 = v2(src, tgt)
    assert R1.shape == (2, 3, 3) and t1.shape == (2, 3)
    torch.testing.assert_close(
        R1 @ R1.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0
    )
    assert torch.allclose(torch.linalg.det(R1), torch.ones(2), atol=1e-5)
    # the legacy compact transformer's zero-initialised output: it starts as DCP-v1
    torch.testing.assert_close(R2, R1)
    torch.testing.assert_close(t2, t1)
    keys = set(v1.state_dict())
    assert {"emb_nn.conv1.weight", "emb_nn.bn5.running_var", "head.reflect"} <= keys


def test_dcp_v2_transformer_has_the_papers_sizes_and_official_names():
    model = DCP(pointer="transformer")
    pointer = {k: v.shape for k, v in model.state_dict().items() if k.startswith("pointer.")}
    # width 512, 4 heads, feed-forward 1024, one encoder and one decoder layer:
    # 3 attentions (4 linears 512x512 + bias), 2 feed-forwards, 7 layer norms
    attn, ff, norm = 4 * (512 * 512 + 512), 512 * 1024 + 1024 + 1024 * 512 + 512, 2 * 512
    assert sum(s.numel() for s in pointer.values()) == 3 * attn + 2 * ff + 7 * norm == 5_259_264
    enc, dec = "pointer.model.encoder.", "pointer.model.decoder."
    assert pointer[enc + "layers.0.self_attn.linears.3.weight"] == (512, 512)
    assert pointer[enc + "layers.0.feed_forward.w_1.weight"] == (1024, 512)
    assert enc + "layers.0.sublayer.1.norm.a_2" in pointer and enc + "norm.b_2" in pointer
    assert dec + "layers.0.src_attn.linears.0.bias" in pointer
    assert dec + "layers.0.sublayer.2.norm.b_2" in pointer and dec + "norm.a_2" in pointer
    assert not any("sublayer.3" in k or "layers.1" in k or "dropout" in k for k in pointer)


def _reference_pointer(sd: dict, x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """DCP's encoder-decoder written out from the paper/official layout: encode ``x``, decode
    ``y``; pre-norm residuals, layer norm ``a (v - mean) / (unbiased std + 1e-6) + b``."""

    def ln(v, p):
        return (
            sd[p + "a_2"] * (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-6)
            + sd[p + "b_2"]
        )

    def lin(v, p):
        return v @ sd[p + "weight"].T + sd[p + "bias"]

    def attn(q, kv, p):
        B, L, C = q.shape
        d = C // heads
        Q = lin(q, p + "linears.0.").view(B, L, heads, d).transpose(1, 2)
        K = lin(kv, p + "linears.1.").view(B, -1, heads, d).transpose(1, 2)
        V = lin(kv, p + "linears.2.").view(B, -1, heads, d).transpose(1, 2)
        w = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return lin((w @ V).transpose(1, 2).reshape(B, L, C), p + "linears.3.")

    def ff(v, p):
        return lin(torch.relu(lin(v, p + "w_1.")), p + "w_2.")

    e, dd = "model.encoder.layers.0.", "model.decoder.layers.0."
    h = ln(x, e + "sublayer.0.norm.")
    m = x + attn(h, h, e + "self_attn.")
    m = m + ff(ln(m, e + "sublayer.1.norm."), e + "feed_forward.")
    m = ln(m, "model.encoder.norm.")
    h = ln(y, dd + "sublayer.0.norm.")
    z = y + attn(h, h, dd + "self_attn.")
    z = z + attn(ln(z, dd + "sublayer.1.norm."), m, dd + "src_attn.")
    z = z + ff(ln(z, dd + "sublayer.2.norm."), dd + "feed_forward.")
    return ln(z, "model.decoder.norm.")


def test_dcp_v2_transformer_matches_the_written_out_layout():
    from difficp_experiments.modelnet.dcp import Transformer

    torch.manual_seed(0)
    tr = Transformer(emb_dims=16, n_blocks=1, n_heads=4, ff_dims=24).double()
    with torch.no_grad():  # non-trivial norms, so that gain/bias placement matters
        for name, p in tr.named_parameters():
            if name.endswith(("a_2", "b_2")):
                p.add_(0.3 * torch.randn_like(p))
    sd = {k: v for k, v in tr.state_dict().items()}
    src, tgt = (
        torch.randn(2, 16, 7, dtype=torch.float64),
        torch.randn(2, 16, 9, dtype=torch.float64),
    )
    src_p, tgt_p = tr(src, tgt)
    ref_tgt = _reference_pointer(sd, src.transpose(1, 2), tgt.transpose(1, 2), 4)
    ref_src = _reference_pointer(sd, tgt.transpose(1, 2), src.transpose(1, 2), 4)
    torch.testing.assert_close(tgt_p, ref_tgt.transpose(1, 2))
    torch.testing.assert_close(src_p, ref_src.transpose(1, 2))


def test_dcp_loss_is_the_official_mean_squared_error_and_cycle_term():
    from difficp_experiments.modelnet.dcp import cycle_loss, dcp_loss

    R_gt = torch.from_numpy(euler_xyz_to_matrix(np.array([0.3, -0.2, 0.5])))[None]
    R = torch.from_numpy(euler_xyz_to_matrix(np.array([0.25, -0.1, 0.55])))[None]
    t, t_gt = torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[0.0, 0.25, 0.1]])
    by_hand = ((R[0].T @ R_gt[0] - torch.eye(3, dtype=R.dtype)) ** 2).sum() / 9 + (
        (t - t_gt) ** 2
    ).sum() / 3
    torch.testing.assert_close(dcp_loss(R, t.double(), R_gt, t_gt.double()), by_hand.double())
    # the cycle term vanishes for R_ba = R_ab^T with the official translation term
    R_ba = R.transpose(1, 2)
    t_ba = -(R @ t.double()[..., None])[..., 0]
    assert float(cycle_loss(R, t.double(), R_ba, t_ba)) < 1e-24
    assert float(cycle_loss(R, t.double(), R_ba, -t_ba)) > 0.01


def test_legacy_compact_checkpoint_still_loads():
    from pathlib import Path

    from difficp_experiments.modelnet.dcp import CompactTransformer, load_dcp_checkpoint

    path = Path(__file__).resolve().parents[2] / "results" / "modelnet" / "dcp_v2.pt"
    if not path.is_file():
        pytest.skip("no committed legacy checkpoint")
    model = load_dcp_checkpoint(path)
    assert isinstance(model.pointer, CompactTransformer)


def test_se3_exp_matches_matrix_exponential():
    xi = torch.randn(6, 6, dtype=torch.float64)
    xi[0] *= 1e-6  # the small-angle branch
    A = torch.zeros(6, 4, 4, dtype=torch.float64)
    A[:, :3, :3], A[:, :3, 3] = hat(xi[:, :3]), xi[:, 3:]
    torch.testing.assert_close(se3_exp(xi), torch.linalg.matrix_exp(A))


def test_pointnetlk_forward_shapes_and_keys():
    model = PointNetLK(max_iterations=2).eval()
    assert set(model.state_dict()) >= {"dt", "feature_model.conv5.bias", "feature_model.bn1.weight"}
    with torch.no_grad():
        R, t = model(torch.randn(2, 64, 3), torch.randn(2, 64, 3))
    assert R.shape == (2, 3, 3) and t.shape == (2, 3)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2), atol=1e-4)


def test_benchmark_harness_writes_results_and_caches(tiny_root, capsys):
    from difficp.cli import main

    out = tiny_root / "out"
    args = [
        "benchmark",
        "modelnet",
        "--data-dir",
        str(tiny_root),
        "--dataset",
        "modelnet40",
        "--protocol",
        "clean",
        "--methods",
        "icp,open3d_icp,icp+icp",
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "modelnet40" and res["protocol"] == "clean" and res["pairs"] == 4
    assert list(res["methods"]) == ["icp", "open3d_icp", "icp+icp"]
    for m in res["methods"].values():
        assert set(
            M.dcp_metrics(np.eye(3)[None], np.zeros((1, 3)), np.eye(3)[None], np.zeros((1, 3)))
        ) <= set(m)
        assert all(np.isfinite(v) for v in m.values())
    # difficp ICP and Open3D's agree on these clean pairs
    assert res["methods"]["icp"]["MAE_R"] == pytest.approx(
        res["methods"]["open3d_icp"]["MAE_R"], rel=0.05, abs=1e-3
    )
    assert "| `icp` |" in (out / "results.md").read_text()
    (chunk,) = (out / "raw" / "icp").glob("*/000000.npz")
    cached = np.load(chunk)
    assert cached["R"].shape == (4, 3, 3)
    # the refinement's time includes its base method's
    (chunk,) = (out / "raw" / "icp_plus_icp").glob("*/000000.npz")
    refined = np.load(chunk)
    assert np.all(refined["seconds"] >= cached["seconds"])
    with pytest.raises(ValueError, match="unknown method"):
        main([*args[:-2], "--methods", "dcp_v3", "--out", str(out)])


def _bench(root, out, *extra: str) -> dict:
    from difficp.cli import main

    args = [
        "benchmark",
        "modelnet",
        "--data-dir",
        str(root),
        "--dataset",
        "modelnet40",
        "--methods",
        "icp",
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    for m in res["methods"].values():
        m.pop("seconds_per_pair")  # timings differ between runs
    return res


@pytest.mark.parametrize(
    "change", [["--seed", "1"], ["--protocol", "noise"], ["--icp-max-iterations", "2"]]
)
def test_benchmark_cache_is_keyed_by_what_changes_the_numbers(tiny_root, change, capsys):
    shared = tiny_root / "shared"
    first = _bench(tiny_root, shared)
    again = _bench(tiny_root, shared, *change)  # into the folder that holds the first run
    fresh = _bench(tiny_root, tiny_root / "fresh", *change)
    assert again["methods"] == fresh["methods"]
    assert again["methods"]["icp"]["MAE_R"] != first["methods"]["icp"]["MAE_R"]
    assert again["seed"] == fresh["seed"] and again["protocol"] == fresh["protocol"]


def test_benchmark_cache_resumes_by_chunk_and_recomputes_a_truncated_file(
    tiny_root, monkeypatch, capsys
):
    from difficp_experiments.modelnet import benchmark

    monkeypatch.setattr(benchmark, "CACHE_CHUNK", 2)
    computed = []
    estimate = benchmark.MethodRunner.estimate

    def counting(self, name, batch):
        computed.append(len(batch["source"]))
        return estimate(self, name, batch)

    monkeypatch.setattr(benchmark.MethodRunner, "estimate", counting)
    out = tiny_root / "out"
    first = _bench(tiny_root, out)
    assert sum(computed) == 4
    chunks = sorted((out / "raw" / "icp").glob("*/*.npz"))
    assert [c.name for c in chunks] == ["000000.npz", "000002.npz"]
    assert not list(out.rglob("*.tmp"))
    chunks[1].write_bytes(chunks[1].read_bytes()[:50])  # a file cut short
    computed.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        again = _bench(tiny_root, out)
    assert sum(computed) == 2  # only the damaged chunk's pairs
    assert again["methods"] == first["methods"]
    computed.clear()
    assert _bench(tiny_root, out, "--limit", "6")["pairs"] == 6
    assert sum(computed) == 2  # pairs 4 and 5 only
