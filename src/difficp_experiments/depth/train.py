"""Training of the pose CNN: ``nn`` (pose loss) then ``nn_icp`` (fine-tuned through difficp).

Each stage runs ``epochs`` epochs of ``steps`` batches. Every epoch draws *fresh* samples
(``split=TRAIN``, indices continuing where the previous epoch stopped), so there is no
over-fitting to a finite set and no render cache to keep; rendering a 64x64 pair costs ~1 ms.
A checkpoint (model, optimiser, scheduler, RNG, history) is written after every epoch;
``resume=True`` continues from the last one, giving the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from difficp._atomic import (
    atomic_write_text,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
)
from difficp_experiments.depth.data import (
    TRAIN,
    VAL,
    DepthPairs,
    SceneConfig,
    collate,
    rmse_between,
)
from difficp_experiments.depth.model import PoseCNN, PoseCNNConfig

STAGE_OFFSET = {"nn": 0, "nn_icp": 10_000_000}  # the two stages see disjoint training samples


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage."""

    epochs: int = 8
    steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    grad_clip: float = 1.0
    val_size: int = 256


LossFn = Callable[[PoseCNN, dict[str, Tensor]], Tensor]


@dataclass
class Stage:
    """What a stage trains and how it scores a batch: ``loss_fn(model, batch) -> (B,)`` errors.

    ``offset``: index of the stage's first training sample; epoch ``e``, step ``s`` uses samples
    ``offset + (e * steps + s) * batch + [0, batch)``. Stages with the same offset, seed and
    config therefore see the same samples in the same order, whatever their ``loss_fn``.
    ``val_fn``: the per-epoch validation error (default: ``loss_fn``), e.g. the network's own pose
    error so that stages trained with different losses are validated alike.
    """

    name: str
    model: PoseCNN
    loss_fn: LossFn
    config: StageConfig
    offset: int = 0
    val_fn: LossFn | None = None


def nn_loss(model: PoseCNN, batch: dict[str, Tensor]) -> Tensor:
    """Pose loss of the network alone: ``(B,)`` RMSE of the body under estimate vs truth."""
    return rmse_between(batch["body"], model(batch["depth"]), batch["transform"])


def make_icp_loss(
    scene: SceneConfig, schedule: list, pose_weight: float = 1.0, max_points: int | None = 512
) -> LossFn:
    """Loss through the differentiable ICP ``schedule``: ``(B,)`` body RMSE of the post-ICP
    estimate, plus ``pose_weight`` times :func:`nn_loss` (none when 0)."""
    from difficp_experiments.depth.methods import nn_icp_forward

    def icp_loss(model: PoseCNN, batch: dict[str, Tensor]) -> Tensor:
        T = nn_icp_forward(model, batch, scene, schedule, max_points=max_points)
        loss = rmse_between(batch["body"], T, batch["transform"])
        if pose_weight:
            loss = loss + pose_weight * nn_loss(model, batch)
        return loss

    return icp_loss


def _checkpoint_path(out: Path, name: str) -> Path:
    return out / "checkpoints" / f"{name}.pt"


def run_stage(
    stage: Stage,
    renderer,
    scene: SceneConfig,
    out: Path,
    seed: int,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``stage.model`` in place; returns its history (per-epoch loss, val error, time).

    Checkpoints go to ``out/checkpoints/<name>.pt`` after every epoch, atomically, with the
    previous epoch's kept as ``<name>.pt.prev``. With ``resume`` the run continues from that
    file if it exists (a finished stage is not re-run); a corrupt latest checkpoint falls back
    to the previous one with a warning. Checkpoints are loaded with ``weights_only=True``.
    """
    cfg = stage.config
    model = stage.model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total = cfg.epochs * cfg.steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.min_lr)
    history: dict = {"epochs": [], "seconds": 0.0, "config": asdict(cfg)}
    start_epoch = 0
    ckpt = _checkpoint_path(out, stage.name)
    if resume and (ckpt.is_file() or previous_checkpoint(ckpt).is_file()):
        # weights_only: a checkpoint is data and must never run code; a corrupt latest file
        # falls back to the previous epoch's.
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        log(f"[{stage.name}] resumed after epoch {start_epoch} from {ckpt}")
    val_fn = stage.val_fn or stage.loss_fn
    val = collate(
        [DepthPairs(renderer, scene, seed, VAL, cfg.val_size)[i] for i in range(cfg.val_size)]
    )
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        data = DepthPairs(
            renderer,
            scene,
            seed,
            TRAIN,
            cfg.steps * cfg.batch,
            offset=stage.offset + epoch * cfg.steps * cfg.batch,
        )
        model.train()
        losses = []
        bar = tqdm(
            range(cfg.steps),
            desc=f"{stage.name} epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            dynamic_ncols=True,
        )
        for step in bar:
            batch = collate([data[step * cfg.batch + j] for j in range(cfg.batch)])
            loss = stage.loss_fn(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        model.eval()
        with torch.no_grad():
            err = torch.cat(
                [
                    val_fn(model, {k: v[i : i + 64] for k, v in val.items()})
                    for i in range(0, cfg.val_size, 64)
                ]
            )
        row = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "val_rmse_mean": err.mean().item(),
            "val_rmse_median": err.median().item(),
            "val_success_3cm": (err < 0.03).float().mean().item(),
            "val_success_30cm": (err < 0.30).float().mean().item(),
            "seconds": time.time() - t0,
        }
        history["epochs"].append(row)
        history["seconds"] += row["seconds"]
        # Atomic (tmp + fsync + rename), keeping the previous epoch's file as a fallback.
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "epoch": epoch,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt,
        )
        log(f"[{stage.name}] " + json.dumps({k: round(v, 4) for k, v in row.items()}))
    return history


def make_model(scene: SceneConfig, width: int = 32) -> PoseCNN:
    return PoseCNN(scene.intrinsics(scene.cnn_res), PoseCNNConfig(res=scene.cnn_res, width=width))


def save_final(path: Path, nets: dict[str, PoseCNN], scene: SceneConfig, extra: dict) -> None:
    """The deliverable checkpoint: every stage's weights + the configs needed to rebuild them."""
    save_checkpoint(
        {
            "scene": scene.to_dict(),
            "model_config": asdict(next(iter(nets.values())).config),
            "nets": {k: v.state_dict() for k, v in nets.items()},
            "info": extra,
        },
        path,
    )


def load_final(path: Path) -> tuple[dict[str, PoseCNN], SceneConfig, dict]:
    """Inverse of :func:`save_final`: ``({stage: PoseCNN in eval mode}, scene, info)``."""
    blob = load_checkpoint(path)
    scene = SceneConfig.from_dict(blob["scene"])
    nets = {}
    for name, state in blob["nets"].items():
        net = PoseCNN(scene.intrinsics(scene.cnn_res), PoseCNNConfig(**blob["model_config"]))
        net.load_state_dict(state)
        nets[name] = net.eval()
    return nets, scene, blob["info"]


def copy_model(model: PoseCNN) -> PoseCNN:
    return copy.deepcopy(model)


def train_depth(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    resume: bool = False,
    nn_config: StageConfig | None = None,
    icp_config: StageConfig | None = None,
    scene: SceneConfig | None = None,
    width: int = 32,
    progress: bool = True,
    icp_iterations: tuple[int, int] = (3, 2),
    pose_weight: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole recipe; writes ``out/pose_cnn.pt`` and ``out/train_log.json``.

    1. ``nn``: train the CNN from scratch with the pose loss (body RMSE of its estimate).
    2. ``nn_icp``: fine-tune a copy end to end through the soft, unrolled ICP of
       :func:`~difficp_experiments.depth.methods.train_schedule`, loss = body RMSE of the *final*
       (post-ICP) estimate, plus ``pose_weight`` times the network's own pose loss.
       ``icp_iterations`` = (point-to-point, symmetric) unrolled soft iterations.
    """
    from difficp_experiments.depth.data import open_renderer
    from difficp_experiments.depth.methods import train_schedule

    torch.manual_seed(seed)
    scene = scene or SceneConfig()
    nn_config = nn_config or StageConfig()
    icp_config = icp_config or StageConfig(epochs=3, steps=150, lr=2e-4, min_lr=1e-5)
    renderer = open_renderer(data_dir)
    out = Path(out)
    t0 = time.time()
    net = make_model(scene, width)

    def train(stage: Stage) -> dict:
        return run_stage(
            stage, renderer, scene, out, seed, resume=resume, progress=progress, log=log
        )

    hist_nn = train(Stage("nn", net, nn_loss, nn_config, offset=STAGE_OFFSET["nn"]))
    fine = copy_model(net)
    icp_loss = make_icp_loss(scene, train_schedule(*icp_iterations), pose_weight)
    hist_icp = train(Stage("nn_icp", fine, icp_loss, icp_config, offset=STAGE_OFFSET["nn_icp"]))
    info = {
        "seed": seed,
        "icp_iterations": list(icp_iterations),
        "pose_weight": pose_weight,
        "nn": hist_nn,
        "nn_icp": hist_icp,
        "train_seconds": hist_nn["seconds"] + hist_icp["seconds"],
        "wall_seconds_this_run": time.time() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    save_final(out / "pose_cnn.pt", {"nn": net, "nn_icp": fine}, scene, info)
    atomic_write_text(out / "train_log.json", json.dumps(info, indent=1))
    log(
        f"training time {info['train_seconds'] / 60:.1f} min (sum of epoch times); "
        f"wrote {out / 'pose_cnn.pt'}"
    )
    return info
