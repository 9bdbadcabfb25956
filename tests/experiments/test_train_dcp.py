"""DCP training's data split, per-rank sharding, schedule, crash-safe files and resume (fast,
single process, no data needed: tiny shapes and tiny models)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from difficp_experiments.modelnet.train_dcp import (
    TrainConfig,
    best_path,
    learning_rate,
    load_state,
    log_path,
    model_path,
    rank_batches,
    run_training,
    split_train_val,
    state_path,
)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 40, 3)) * np.array([0.6, 0.35, 0.2])
    x /= np.linalg.norm(x, axis=-1).max(axis=1)[:, None, None]
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    with h5py.File(folder / "ply_data_train0.h5", "w") as f:
        f.create_dataset("data", data=x.astype(np.float32))
        f.create_dataset("label", data=(np.arange(12) // 3).reshape(-1, 1).astype(np.int64))
    return tmp_path


def _tiny(data_root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data_dir=str(data_root),
        out=str(out),
        dataset="modelnet40",
        init_weights=None,
        epochs=2,
        batch_size=2,
        num_points=24,
        emb_dims=16,
        k=4,
        n_heads=2,
        ff_dims=16,
        val_fraction=0.25,
        val_pairs=3,
        val_every=2,
        log_every=1,
        lr=1e-3,
    )
    return TrainConfig(**{**base, **kw})


def test_validation_split_is_fixed_disjoint_and_class_mixed():
    train, val = split_train_val(100, 0.1, seed=0)
    again_train, again_val = split_train_val(100, 0.1, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert len(val) == 10 and len(train) == 90
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(100))
    assert not np.all(np.diff(val) > 0)  # drawn order: the first few are not one class


def test_ranks_share_out_the_global_batch(data_root):
    from difficp_experiments.modelnet.data import load_modelnet

    pts, labels = load_modelnet(data_root, "modelnet40", "train")
    cfg = _tiny(data_root, data_root / "x")
    one = list(rank_batches(pts, labels, replace(cfg, batch_size=4), 3, rank=0, world=1))
    two = [list(rank_batches(pts, labels, cfg, 3, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for step in range(3):  # 2 processes x 2 pairs = the same pairs as 1 process x 4
        for key in ("source", "target", "rotation"):
            torch.testing.assert_close(
                torch.cat([two[0][step][key], two[1][step][key]]), one[step][key]
            )
    later = list(rank_batches(pts, labels, cfg, 3, rank=1, world=2, start_step=2))
    torch.testing.assert_close(later[0]["source"], two[1][2]["source"])


def test_a_run_is_a_directory_or_a_model_file_with_siblings(tmp_path):
    run = tmp_path / "run"
    assert [f(run) for f in (model_path, best_path, state_path, log_path)] == [
        run / "model.pt",
        run / "best.pt",
        run / "state.pt",
        run / "log.jsonl",
    ]
    file = tmp_path / "dcp.pt"
    assert [f(file) for f in (model_path, best_path, state_path, log_path)] == [
        file,
        tmp_path / "dcp.best.pt",
        tmp_path / "dcp.pt.state",
        tmp_path / "dcp.log.jsonl",
    ]


def test_step_schedule():
    cfg = TrainConfig(data_dir="", out="", lr=1e-3, milestones=(2, 4), lr_gamma=0.1)
    lrs = [learning_rate(cfg, e) for e in range(6)]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_states_keep_the_previous_one_and_a_torn_state_falls_back(data_root, tmp_path):
    out = tmp_path / "run"
    assert load_state(out) is None
    run_training(_tiny(data_root, out, max_steps=1, val_pairs=0))
    run_training(_tiny(data_root, out, max_steps=2, val_pairs=0), resume=True)
    path = state_path(out)
    assert load_state(out)["progress"]["steps"] == 2
    prev = path.with_name(path.name + ".prev")
    assert torch.load(prev, weights_only=True)["progress"]["steps"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    path.write_bytes(path.read_bytes()[:20])  # a torn write: fall back to the previous state
    with pytest.warns(RuntimeWarning, match="previous"):
        assert load_state(out)["progress"]["steps"] == 1


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(data_root, tmp_path):
    straight = run_training(_tiny(data_root, tmp_path / "a", max_steps=5))
    cfg = _tiny(data_root, tmp_path / "b", max_steps=2)
    run_training(cfg)
    torch.manual_seed(123)  # a new process would start from other weights: resume must fix it
    resumed = run_training(replace(cfg, max_steps=5), resume=True)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    records = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4] and all(r["val_pairs"] == 3 for r in vals)
    with pytest.raises(ValueError, match="differ"):
        run_training(replace(cfg, ff_dims=32), resume=True)


def test_a_run_continues_on_another_machine_from_its_model_file_alone(data_root, tmp_path):
    # Only model.pt travels (float16 weights + progress): the step count, schedule and data
    # order continue; the weights start from the file's; Adam starts afresh.
    first = _tiny(data_root, tmp_path / "here", max_steps=2, val_pairs=0)
    trained = run_training(first)
    carried = tmp_path / "carried.pt"
    carried.write_bytes((tmp_path / "here" / "model.pt").read_bytes())
    there = replace(first, out=str(tmp_path / "there"), resume_weights=str(carried), max_steps=2)
    torch.manual_seed(7)  # another process: other initial weights, which the file replaces
    same = run_training(there, resume=True)  # already at step 2: loads and stops
    for (name, a), b in zip(trained.state_dict().items(), same.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)
    run_training(replace(there, max_steps=4), resume=True)
    assert load_state(tmp_path / "there")["progress"]["steps"] == 4
    records = [json.loads(x) for x in (tmp_path / "there" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [3, 4]
    with pytest.raises(ValueError, match="differ"):
        run_training(replace(there, out=str(tmp_path / "elsewhere"), ff_dims=32), resume=True)
    (tmp_path / "not_a_model.pt").write_bytes(b"")
    torch.save({"model": {}}, tmp_path / "not_a_model.pt")
    with pytest.raises(ValueError, match="not a model file"):
        run_training(
            replace(
                there, out=str(tmp_path / "x"), resume_weights=str(tmp_path / "not_a_model.pt")
            ),
            resume=True,
        )
