"""Real data and weights: loading with strict keys and trained behaviour (skips without data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from difficp_experiments.modelnet.metrics import isotropic_errors


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("DIFFICP_DATA")
    if not value or not Path(value, "weights", "dcp_v1.t7").is_file():
        pytest.skip("needs $DIFFICP_DATA with ModelNet10 and the shared weights")
    return Path(value)


@pytest.fixture(scope="module")
def clean_batch(data_dir):
    from difficp_experiments.modelnet.data import ModelNetPairs, load_modelnet

    pts, labels = load_modelnet(data_dir, "modelnet10", "test")
    assert pts.shape == (908, 1024, 3)
    ds = ModelNetPairs(pts, labels, "clean")
    items = [ds[i] for i in range(6)]
    return {
        k: torch.stack([it[k] for it in items])
        for k in ("source", "target", "rotation", "translation")
    }


def _errors(R, t, batch):
    return isotropic_errors(
        R.double().numpy(),
        t.double().numpy(),
        batch["rotation"].double().numpy(),
        batch["translation"].double().numpy(),
    )


def test_dcp_v1_official_weights_load_strictly_and_register(data_dir, clean_batch):
    from difficp_experiments.modelnet.dcp import load_dcp_v1

    model = load_dcp_v1(data_dir / "weights" / "dcp_v1.t7")  # strict=True inside
    assert sum(v.numel() for v in model.state_dict().values()) == 311_694  # as published
    with torch.no_grad():
        R, t = model(clean_batch["source"], clean_batch["target"])
    rot, trans = _errors(R, t, clean_batch)
    # trained behaviour: a few degrees, where the identity is ~40 degrees / ~0.5 off
    assert np.mean(rot) < 10.0 and np.mean(trans) < 0.02


def test_pointnetlk_weights_load_strictly_and_register(data_dir, clean_batch):
    from difficp_experiments.modelnet.pointnetlk import load_pointnetlk

    model = load_pointnetlk(data_dir / "weights" / "pointnetlk" / "pointnetlk_modelnet40.t7")
    torch.testing.assert_close(model.dt, torch.full((1, 6), 0.01))
    with torch.no_grad():
        R, t = model(clean_batch["source"], clean_batch["target"])
    rot, _ = _errors(R, t, clean_batch)
    assert np.median(rot) < 5.0


def test_dcp_v2_training_from_v1_weights_checkpoint_and_resume(data_dir, tmp_path):
    from difficp_experiments.modelnet.dcp import DCP, Transformer, load_dcp_checkpoint, load_dcp_v1
    from difficp_experiments.modelnet.train_dcp import TrainConfig, best_path, state_path, train

    out = tmp_path / "v2.pt"
    # 6 shapes: 1 for validation, 5 for training = 2 steps of 2 per epoch
    cfg = TrainConfig(
        data_dir=str(data_dir),
        out=str(out),
        epochs=1,
        batch_size=2,
        num_points=64,
        limit_shapes=6,
        val_pairs=1,
        save_every=1,
    )
    assert train(cfg) == out
    model = load_dcp_checkpoint(out)
    assert isinstance(model, DCP) and isinstance(model.pointer, Transformer)
    assert isinstance(load_dcp_checkpoint(best_path(out)), DCP)
    progress = torch.load(state_path(out), weights_only=True)["progress"]
    assert progress["steps"] == 2 and progress["epoch"] == 1
    assert progress["best_val_rmse_r"] is not None
    # the DGCNN started from DCP-v1 and was trained (weights and BatchNorm statistics moved)
    v1 = load_dcp_v1(data_dir / "weights" / "dcp_v1.t7").state_dict()
    state = torch.load(state_path(out), weights_only=True)["model"]
    for key in ("emb_nn.conv1.weight", "emb_nn.bn5.running_mean"):
        assert not torch.equal(state[key], v1[key])
        assert (state[key] - v1[key]).abs().max() < 0.1 * v1[key].abs().max()
    cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    train(cfg2, resume=True)
    assert torch.load(state_path(out), weights_only=True)["progress"]["steps"] == 4
