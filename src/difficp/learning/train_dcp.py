"""Training DCP-v2 on ModelNet pairs, on a CPU budget, and end-to-end fine-tuning through difficp.

CPU-feasible schedule (what ``difficp train dcp`` does by default):
    * DCP-v2 starts from DCP-v1: its DGCNN takes the official DCP-v1 weights and is kept frozen
      (BatchNorm in eval mode, no gradients), and the transformer is new, with a zero-initialised
      output gain so that training starts exactly at DCP-v1. Only the transformer (~5 M
      parameters) is trained, so no backward pass runs through the expensive k-NN graph network.
    * Pairs follow the ``clean`` protocol (``unseen``: the first half of the classes only) on the
      ModelNet10 *train* split, with a fresh seed per epoch, at the test resolution (1024 points,
      because the frozen BatchNorm statistics belong to that density).
    * Loss: DCP's ``|R^T R_gt - I|^2 + |t - t_gt|^2``; Adam.
    * ``--mode e2e``: start from a DCP-v2 checkpoint and put difficp's ICP behind it, with soft
      correspondences (``temperature``), a fixed number of iterations and unrolled gradients; the
      loss is taken on the *refined* pose. The saved model includes that refinement layer.
Checkpoints (model + optimiser + progress) are written every ``save_every`` steps and at the end;
``--resume`` continues from one. The saved model weights are float16 to keep files small.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from difficp import _atomic
from difficp.learning.dcp import DCP, RefinedDCP, dcp_loss, load_dcp_checkpoint, load_dcp_v1
from difficp.learning.modelnet import NUM_CLASSES, load_modelnet, make_pair, unseen_class_split


@dataclass
class TrainConfig:
    """Options of a training run (saved into the checkpoint)."""

    data_dir: str
    out: str
    dataset: str = "modelnet10"
    protocol: str = "clean"
    mode: str = "v2"  # "v2": train DCP-v2's transformer; "e2e": fine-tune through difficp ICP
    init: str | None = None  # e2e: the DCP-v2 checkpoint to start from
    epochs: int = 1
    max_minutes: float | None = None
    batch_size: int = 8
    num_points: int = 1024
    lr: float = 1e-4
    weight_decay: float = 1e-4
    freeze_embedding: bool = True
    e2e_iterations: int = 3
    e2e_temperature: float = 1e-3
    seed: int = 1
    save_every: int = 50
    threads: int = 1
    limit_shapes: int | None = None


def _model_config(model: nn.Module) -> dict:
    dcp = model.dcp if isinstance(model, RefinedDCP) else model
    cfg: dict = {"pointer": "transformer" if dcp.pointer is not None else "identity"}
    if dcp.pointer is not None:  # the transformer's sizes, so the checkpoint outlives defaults
        tr = dcp.pointer
        block = tr.encoder[0]
        cfg.update(
            n_blocks=len(tr.encoder),
            n_heads=block.self_attn.num_heads,
            ff_dims=block.ff[0].out_features,
            model_dims=tr.proj_in.out_features,
        )
    if isinstance(model, RefinedDCP):
        cfg["icp"] = {"iterations": model.iterations, "temperature": model.temperature}
    return cfg


def build_model(cfg: TrainConfig) -> nn.Module:
    """DCP-v2 from DCP-v1 weights (mode v2), or a refined DCP-v2 from ``cfg.init`` (mode e2e)."""
    if cfg.mode == "v2":
        v1 = load_dcp_v1(Path(cfg.data_dir, "weights", "dcp_v1.t7"))
        model = DCP(pointer="transformer")
        missing, unexpected = model.load_state_dict(v1.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pointer.") for k in missing):
            raise RuntimeError(f"DCP-v1 -> v2 transfer failed: {missing}, {unexpected}")
        return model
    if cfg.mode == "e2e":
        if not cfg.init:
            raise ValueError("--mode e2e needs --init, a DCP-v2 checkpoint")
        dcp = load_dcp_checkpoint(cfg.init)
        if isinstance(dcp, RefinedDCP):
            dcp = dcp.dcp
        return RefinedDCP(dcp, cfg.e2e_iterations, cfg.e2e_temperature)
    raise ValueError(f"mode must be 'v2' or 'e2e', got {cfg.mode!r}")


def trainable(model: nn.Module, freeze_embedding: bool) -> list[nn.Parameter]:
    dcp = model.dcp if isinstance(model, RefinedDCP) else model
    for p in dcp.emb_nn.parameters():
        p.requires_grad_(not freeze_embedding)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, freeze_embedding: bool) -> None:
    model.train()
    dcp = model.dcp if isinstance(model, RefinedDCP) else model
    if freeze_embedding:
        dcp.emb_nn.eval()  # frozen BatchNorm statistics


def epoch_batches(
    points: np.ndarray, labels: np.ndarray, cfg: TrainConfig, epoch: int
) -> list[dict[str, Tensor]]:
    """The epoch's training pairs in batches; shapes shuffled and subsampled per epoch."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(points))
    out = []
    for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        items = []
        for idx in order[start : start + cfg.batch_size]:
            pair_rng = np.random.default_rng([cfg.seed, epoch, int(idx)])
            shape = points[idx][pair_rng.permutation(points.shape[1])[: cfg.num_points]]
            items.append(make_pair(shape, "clean", pair_rng, int(labels[idx]), cfg.num_points))
        out.append(
            {
                "source": torch.from_numpy(np.stack([p.source for p in items])),
                "target": torch.from_numpy(np.stack([p.target for p in items])),
                "rotation": torch.from_numpy(np.stack([p.rotation for p in items])),
                "translation": torch.from_numpy(np.stack([p.translation for p in items])),
            }
        )
    return out


def state_path(out: Path) -> Path:
    """Where the resumable training state of ``out`` lives (large: not meant to be committed)."""
    return out.with_name(out.name + ".state")


def save_checkpoint(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress: dict
) -> None:
    """Write the model to ``out`` (float16 weights + config: small, loadable by
    :func:`~difficp.learning.dcp.load_dcp_checkpoint`) and, next to it, the resumable state
    (float32 weights, optimiser, progress)."""
    dcp = model.dcp if isinstance(model, RefinedDCP) else model
    meta = {"config": _model_config(model), "train": asdict(cfg), "progress": dict(progress)}
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in dcp.state_dict().items()}
    full = {"model": dcp.state_dict(), "optimizer": optimizer.state_dict(), **meta}
    # Atomic writes; the previous state is kept so that a corrupt latest one can be resumed from.
    _atomic.save_checkpoint({"model": half, **meta}, out, keep_previous=False)
    _atomic.save_checkpoint(full, state_path(out))


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training; returns the checkpoint path. Logs to ``<out>.log.jsonl``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points, labels = load_modelnet(cfg.data_dir, cfg.dataset, "train")
    if cfg.protocol == "unseen":
        keep, _ = unseen_class_split(labels, NUM_CLASSES[cfg.dataset])
        points, labels = points[keep], labels[keep]
    if cfg.limit_shapes:
        points, labels = points[: cfg.limit_shapes], labels[: cfg.limit_shapes]
    model = build_model(cfg)
    params = trainable(model, cfg.freeze_embedding)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    progress = {"epoch": 0, "step_in_epoch": 0, "steps": 0, "seconds": 0.0}
    state = state_path(out)
    if resume and (state.is_file() or _atomic.previous_checkpoint(state).is_file()):
        ckpt = _atomic.load_checkpoint(state_path(out))
        dcp = model.dcp if isinstance(model, RefinedDCP) else model
        dcp.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        progress = ckpt["progress"]
    log = out.with_suffix(".log.jsonl").open("a")
    start_time = time.perf_counter() - progress["seconds"]
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    stop = False
    while progress["epoch"] < cfg.epochs and not stop:
        batches = epoch_batches(points, labels, cfg, progress["epoch"])
        set_train_mode(model, cfg.freeze_embedding)
        bar = tqdm(
            batches[progress["step_in_epoch"] :],
            desc=f"epoch {progress['epoch']}",
            unit="batch",
            initial=progress["step_in_epoch"],
            total=len(batches),
        )
        running = []
        for batch in bar:
            R, t = model(batch["source"], batch["target"])
            loss = dcp_loss(R, t, batch["rotation"], batch["translation"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running.append(loss.item())
            progress["step_in_epoch"] += 1
            progress["steps"] += 1
            progress["seconds"] = time.perf_counter() - start_time
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4g}")
            if progress["steps"] % 10 == 0:
                log.write(
                    json.dumps(
                        {
                            "step": progress["steps"],
                            "epoch": progress["epoch"],
                            "loss": float(np.mean(running[-10:])),
                            "seconds": round(progress["seconds"], 1),
                        }
                    )
                    + "\n"
                )
                log.flush()
            if progress["steps"] % cfg.save_every == 0:
                save_checkpoint(out, model, optimizer, cfg, progress)
            if budget is not None and progress["seconds"] > budget:
                stop = True
                break
        if not stop:
            progress["epoch"] += 1
            progress["step_in_epoch"] = 0
    save_checkpoint(out, model, optimizer, cfg, progress)
    log.close()
    return out
