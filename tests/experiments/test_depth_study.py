"""Matched-budget depth study: same data order per seed, determinism, gradients, resume, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

open3d = pytest.importorskip("open3d")
pytest.importorskip("difficp.registration")

from difficp_experiments.depth import data as depth_data  # noqa: E402
from difficp_experiments.depth.data import (  # noqa: E402
    TEST,
    TRAIN,
    DepthPairs,
    SceneConfig,
    collate,
)
from difficp_experiments.depth.methods import train_schedule  # noqa: E402
from difficp_experiments.depth.render import DepthRenderer  # noqa: E402
from difficp_experiments.depth.study import (  # noqa: E402
    arm_loss,
    outcome_flips,
    reevaluate,
    run_study,
    summarize_study,
    train_arm,
    weight_change,
)
from difficp_experiments.depth.train import StageConfig, make_model, nn_loss  # noqa: E402

SCENE = SceneConfig(cnn_res=32, icp_res=32, n_body_points=32)
CONFIG = StageConfig(epochs=2, steps=1, batch=2, val_size=2)
SCHEDULE = train_schedule(1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def renderer() -> DepthRenderer:
    # An asymmetric 2 m box standing in for the body (no external data).
    box = open3d.geometry.TriangleMesh.create_box(0.6, 2.0, 0.3)
    box.translate((-0.3, 0.0, -0.1))
    return DepthRenderer(np.asarray(box.vertices), np.asarray(box.triangles))


def _start() -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model(SCENE, width=8)
    with torch.no_grad():  # off the zero-initialised head, so every layer gets a gradient
        model.head[-1].weight.normal_(0, 1e-2)
    return model


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(renderer, arm: str, seed: int, out, **kwargs):
    return train_arm(
        _start(), arm, seed, CONFIG, renderer, SCENE, out, SCHEDULE, progress=False, **kwargs
    )


def test_arms_see_the_same_samples_in_the_same_order(tmp_path, renderer, monkeypatch) -> None:
    seen: dict[tuple[str, int], list[tuple[int, int]]] = {}
    current: list = []
    original = DepthPairs.__getitem__

    def spy(self, i):
        if self.split == TRAIN:
            current.append((self.seed, self.offset + i))
        return original(self, i)

    monkeypatch.setattr(depth_data.DepthPairs, "__getitem__", spy)
    for arm, seed in (("pose", 0), ("icp", 0), ("both", 0), ("pose", 1)):
        current.clear()
        _train(renderer, arm, seed, tmp_path / arm, log=lambda s: None)
        seen[(arm, seed)] = list(current)
    n = CONFIG.epochs * CONFIG.steps * CONFIG.batch
    assert len(seen[("pose", 0)]) == n
    assert len(set(seen[("pose", 0)])) == n  # fresh samples at every step
    assert seen[("icp", 0)] == seen[("pose", 0)] == seen[("both", 0)]
    # Another seed: the same positions, but other samples (the seed is part of each sample's key).
    assert [i for _, i in seen[("pose", 1)]] == [i for _, i in seen[("pose", 0)]]
    assert {s for s, _ in seen[("pose", 1)]} == {1}


def test_same_arm_same_seed_gives_identical_weights(tmp_path, renderer) -> None:
    log = lambda s: None  # noqa: E731
    a, _ = _train(renderer, "both", 0, tmp_path / "a", log=log)
    b, _ = _train(renderer, "both", 0, tmp_path / "b", log=log)
    c, _ = _train(renderer, "both", 1, tmp_path / "c", log=log)
    assert torch.equal(_params(a), _params(b))
    assert not torch.equal(_params(a), _params(c))
    assert not torch.equal(_params(a), _params(_start()))


def test_icp_arm_gradient_reaches_the_cnn_and_has_no_pose_term(renderer) -> None:
    batch = collate([DepthPairs(renderer, SCENE, 0, TRAIN, 4)[i] for i in range(4)])
    model = _start()
    torch.manual_seed(3)
    icp = arm_loss("icp", SCENE, SCHEDULE)(model, batch)
    torch.manual_seed(3)  # the same cloud subsample
    both = arm_loss("both", SCENE, SCHEDULE)(model, batch)
    torch.testing.assert_close(both, icp + nn_loss(model, batch))
    model.zero_grad()
    icp.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    conv = model.features[0][0].weight.grad.clone()
    assert conv.abs().sum() > 0
    model.zero_grad()
    nn_loss(model, batch).mean().backward()
    assert not torch.allclose(conv, model.features[0][0].weight.grad)
    with pytest.raises(ValueError, match="unknown arm"):
        arm_loss("icp_only", SCENE, SCHEDULE)


def test_resumed_study_matches_uninterrupted(tmp_path, renderer) -> None:
    test = collate([DepthPairs(renderer, SCENE, 1, TEST, 3)[i] for i in range(3)])

    def study(out, resume=False, log=lambda s: None):
        return run_study(
            _start(),
            renderer,
            SCENE,
            test,
            out,
            CONFIG,
            seeds=(0,),
            arms=("pose", "icp"),
            icp_iterations=(1, 1),
            resume=resume,
            progress=False,
            log=log,
        )

    full = study(tmp_path / "a")

    class InterruptError(Exception):
        pass

    def crash(message: str) -> None:  # the icp arm dies after its first epoch's checkpoint
        if message.startswith("[icp]"):
            raise InterruptError

    with pytest.raises(InterruptError):
        study(tmp_path / "b", log=crash)
    assert (tmp_path / "b" / "seed0" / "pose.json").is_file()
    assert not (tmp_path / "b" / "seed0" / "icp.json").is_file()
    resumed = study(tmp_path / "b", resume=True)
    for arm in ("pose", "icp"):
        a = json.loads((tmp_path / "a" / "seed0" / f"{arm}.json").read_text())
        b = json.loads((tmp_path / "b" / "seed0" / f"{arm}.json").read_text())
        assert a["errors"] == b["errors"] and a["weight_change"] == b["weight_change"]
    assert [(r["seed"], r["arm"]) for r in resumed["runs"]] == [(0, "pose"), (0, "icp")]
    assert [r["raw"] for r in resumed["runs"]] == [r["raw"] for r in full["runs"]]
    # Re-evaluating from the final checkpoints (same code) reproduces the records.
    again = reevaluate(_start(), test, SCENE, tmp_path / "b", progress=False, log=lambda s: None)
    assert [(r["raw"], r["icp"]) for r in again["runs"]] == [
        (r["raw"], r["icp"]) for r in full["runs"]
    ]
    # Two invocations recorded; the tables exist.
    assert len(resumed["study"]["invocations"]) == 2
    assert "| icp vs pose | +ICP | 3cm |" in (tmp_path / "b" / "tables.md").read_text()


def test_weight_change_and_outcome_flips_on_a_toy_case() -> None:
    start = torch.nn.Linear(2, 1)
    with torch.no_grad():
        start.weight.copy_(torch.tensor([[3.0, 0.0]]))
        start.bias.fill_(4.0)  # ||theta0|| = 5
    moved = torch.nn.Linear(2, 1)
    with torch.no_grad():
        moved.weight.copy_(torch.tensor([[3.0, 0.3]]))
        moved.bias.fill_(3.6)  # ||delta|| = 0.5
    assert weight_change(moved, start) == pytest.approx(0.1)
    assert weight_change(start, start) == 0.0
    before = np.array([True, True, False, False, True])
    after = np.array([True, False, True, True, True])
    assert outcome_flips(before, after) == {"gained": 2, "lost": 1}


def test_summary_counts_flips_and_pairs_arms_on_a_toy_case() -> None:
    # Errors in m of 6 samples: the start succeeds at 3 cm on samples 0-2.
    start = {"raw": [0.01, 0.02, 0.02, 0.1, 0.5, 0.5], "icp": [0.01] * 3 + [0.05] * 3}
    history = {"epochs": [{}, {}], "config": {"steps": 3}}

    def record(seed: int, arm: str, raw: list[float], icp: list[float]) -> dict:
        return {
            "seed": seed,
            "arm": arm,
            "weight_change": 0.01 * (seed + 1),
            "history": history,
            "train_seconds": 1.0,
            "eval_seconds": 1.0,
            "errors": {"raw": raw, "icp": icp},
        }

    runs = {
        (0, "pose"): record(0, "pose", start["raw"], start["icp"]),
        # icp arm, seed 0: loses sample 0 and gains samples 3 and 4 at 3 cm (raw).
        (0, "icp"): record(0, "icp", [0.04, 0.02, 0.02, 0.01, 0.02, 0.5], [0.01] * 6),
        (1, "icp"): record(1, "icp", start["raw"], start["icp"]),
    }
    m = summarize_study({"errors": start}, runs)
    assert [(r["seed"], r["arm"]) for r in m["runs"]] == [(0, "pose"), (0, "icp"), (1, "icp")]
    r = m["runs"][1]
    assert r["raw"]["flips"]["3cm"] == {"gained": 2, "lost": 1}
    assert r["raw"]["flips"]["30cm"] == {"gained": 1, "lost": 0}
    assert r["icp"]["flips"]["3cm"] == {"gained": 3, "lost": 0}
    assert r["raw"]["success_3cm"] == pytest.approx(4 / 6) and r["steps"] == 6
    icp = m["arms"]["icp"]
    assert icp["seeds"] == [0, 1]
    assert icp["raw"]["success_3cm"]["mean"] == pytest.approx((4 / 6 + 3 / 6) / 2)
    assert icp["raw"]["success_3cm"]["std"] == pytest.approx(math.sqrt(2) * (1 / 12))
    assert icp["weight_change"]["mean"] == pytest.approx(0.015)
    assert icp["raw"]["flips_3cm"]["gained"]["mean"] == pytest.approx(1.0)
    assert "both" not in m["arms"]
    # icp vs pose is paired on seed 0 only (pose has no seed 1); both vs pose has no data.
    (c,) = [c for c in m["comparisons"] if c["kind"] == "raw" and c["threshold"] == "3cm"]
    assert (c["a"], c["b"], c["seeds"]) == ("icp", "pose", [0])
    assert c["success_difference"] == pytest.approx(1 / 6)
    assert c["mcnemar"]["0"]["a_only"] == 2 and c["mcnemar"]["0"]["b_only"] == 1
    lo, hi = c["success_difference_ci"]
    assert lo <= 1 / 6 <= hi


def test_cli_report_only_tabulates_partial_results(tmp_path) -> None:
    from difficp.cli import main

    errors = {"raw": [0.01, 0.2, 0.5], "icp": [0.01, 0.01, 0.5]}
    (tmp_path / "start.json").write_text(json.dumps({"errors": errors, "eval_seconds": 1.0}))
    (tmp_path / "seed0").mkdir()
    history = {"epochs": [{}], "config": {"steps": 2}, "seconds": 3.0}
    rec = {"seed": 0, "arm": "icp", "weight_change": 0.02, "history": history}
    rec.update(train_seconds=3.0, eval_seconds=1.0, errors=errors)
    (tmp_path / "seed0" / "icp.json").write_text(json.dumps(rec))
    args = ["experiment", "depth", "study", "--out", str(tmp_path), "--report-only"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["arms"]) == ["icp"] and metrics["comparisons"] == []
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_a_scratch_start_is_a_fresh_network_of_the_checkpoint_architecture() -> None:
    from difficp_experiments.depth.study import start_network

    trained = _start()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    nets = {"nn": trained}
    assert start_network(nets, SCENE, "nn") is trained
    fresh = start_network(nets, SCENE, "scratch", scratch_seed=3)
    again = start_network(nets, SCENE, "scratch", scratch_seed=3)
    other = start_network(nets, SCENE, "scratch", scratch_seed=4)
    assert fresh.config == trained.config
    assert torch.equal(_params(fresh), _params(again))  # the same start for every arm and seed
    assert not torch.equal(_params(fresh), _params(other))
    assert not torch.allclose(_params(fresh), _params(trained))
    with pytest.raises(ValueError, match="no network 'nn_x'"):
        start_network(nets, SCENE, "nn_x")
