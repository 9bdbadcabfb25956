"""Training DCP-v2 on ModelNet pairs (one CPU thread up to many GPUs), and end-to-end fine-tuning.

What ``difficp train dcp`` does (mode ``v2``, the defaults):
    * The model is DCP-v2 as published (:class:`~difficp_experiments.modelnet.dcp.Transformer`: width 512,
      4 heads, feed-forward 1024, one encoder and one decoder layer). Its DGCNN starts from the
      official DCP-v1 weights (``--init-weights``; ``none`` for a random start) and is trained
      with the rest, BatchNorm included; the transformer starts at PyTorch's default init.
    * Loss: DCP's ``mse(R^T R_gt, I) + mse(t, t_gt)`` (plus ``0.1 *`` the cycle term with
      ``--cycle``, off by default as in the published runs). Adam, weight decay 1e-4 (DCP's), a
      step decay of the learning rate by ``lr_gamma`` at the epochs of ``milestones`` (DCP:
      lr 1e-3, batch 32, 250 epochs, milestones 75/150/200, gamma 0.1).
    * Pairs follow ``protocol`` (``clean``: DCP's "unseen point clouds"; ``noise``; ``unseen``:
      first half of the classes) on the dataset's *train* split minus a validation part
      (``val_fraction`` of the shapes, drawn with ``split_seed``; the test split is never read).
      Every pair is drawn from ``default_rng([seed, epoch, shape])``, so a run's data depend only
      on the seed and the global batch, not on the number of processes.
    * Validation: DCP's RMSE of the Euler angles (degrees) and of the translation on the first
      ``val_pairs`` pairs of the validation shapes (fixed pairs, ``clean`` unless
      ``val_protocol``), every ``val_every`` steps and at the end. The best model so far on the
      validation rotation RMSE is kept (``best.pt``).
    * ``--mode e2e``: start from a DCP checkpoint (``--init``) and put difficp's ICP behind it,
      with soft correspondences, a fixed number of iterations and unrolled gradients; the loss is
      taken on the *refined* pose. The saved model includes that refinement layer.

Files (``out`` is a directory, or a ``.pt`` path whose stem names the files beside it):
    ``model.pt`` / ``<stem>.pt``      latest model (float16 weights + config; for
                                      :func:`~difficp_experiments.modelnet.dcp.load_dcp_checkpoint`)
    ``best.pt`` / ``<stem>.best.pt``  best model on validation (same format)
    ``state.pt`` / ``<stem>.state``   resumable state: float32 weights, optimiser, progress
    ``... .prev``                     the state before the last one (kept in case of a bad write)
    ``log.jsonl``                     one JSON object per line: ``{"kind": "train", ...}`` every
                                      ``log_every`` steps, ``{"kind": "val", ...}`` per validation
Every file goes through :mod:`difficp._atomic` (temporary name, fsync, rename), so an
interruption at any moment leaves a loadable checkpoint; ``--resume`` continues from the newest
state (or the previous one). Only plain types and tensors are stored, so
``torch.load(weights_only=True)`` reads them. A state is written every ``save_minutes``, at the
end of each epoch, when the time budget runs out and on SIGTERM/SIGINT.

Distributed: run under ``torchrun`` (``torchrun --nproc_per_node 4 -m difficp.cli train dcp ...``).
With ``WORLD_SIZE > 1`` the process group starts with NCCL on CUDA devices, gloo on CPUs; the
model is wrapped in DistributedDataParallel; every global step takes ``world * batch_size`` shapes
of the epoch's permutation and rank ``r`` trains on the ``r``-th slice of ``batch_size``; only
rank 0 writes files (and reads the state on ``--resume``, then hands it to the other ranks);
validation is split across ranks and summed. BatchNorm running statistics are
broadcast from rank 0 before each forward (DDP's default) and explicitly before validation and at
the end, so all ranks end with identical weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from difficp import _atomic
from difficp_experiments.modelnet.data import (
    NUM_CLASSES,
    load_modelnet,
    make_pair,
    unseen_class_split,
)
from difficp_experiments.modelnet.dcp import (
    DCP,
    RefinedDCP,
    cycle_loss,
    dcp_loss,
    load_dcp_checkpoint,
    load_dcp_v1,
)
from difficp_experiments.modelnet.metrics import euler_zyx_deg


@dataclass
class TrainConfig:
    """Options of a training run (saved into the checkpoints as plain types)."""

    data_dir: str
    out: str
    dataset: str = "modelnet10"
    protocol: str = "clean"  # training pairs: clean, noise, unseen (first half of the classes)
    mode: str = "v2"  # "v2": train DCP-v2; "e2e": fine-tune through difficp ICP
    init: str | None = None  # e2e: the DCP checkpoint to start from
    init_weights: str | None = "dcp_v1"  # v2: "dcp_v1" (data dir's weights), a path, or None
    epochs: int = 1
    max_minutes: float | None = None
    max_steps: int | None = None  # stop after this many (global) steps in all
    batch_size: int = 8  # per process
    num_points: int = 1024
    lr: float = 1e-4
    lr_gamma: float = 0.1
    milestones: tuple[int, ...] = ()  # epochs at which lr *= lr_gamma
    weight_decay: float = 1e-4
    cycle: bool = False
    freeze_embedding: bool = False
    emb_dims: int = 512
    k: int = 20
    n_blocks: int = 1
    n_heads: int = 4
    ff_dims: int = 1024
    e2e_iterations: int = 3
    e2e_temperature: float = 1e-3
    seed: int = 1
    split_seed: int = 0
    val_fraction: float = 0.1
    val_pairs: int = 96
    val_every: int = 100
    val_protocol: str = "clean"
    log_every: int = 10
    save_minutes: float = 5.0
    save_every: int | None = None  # also write a state every N steps
    threads: int = 1
    limit_shapes: int | None = None
    # --resume without a state in ``out``: continue from this small model file instead
    resume_weights: str | None = None


# ----------------------------------------------------------------------------- files


def _paths(out: str | os.PathLike) -> dict[str, Path]:
    """File names of a run: a directory ``out``, or a ``.pt`` file and its siblings."""
    out = Path(out)
    if out.suffix == "":
        names = {
            "model": "model.pt",
            "best": "best.pt",
            "state": "state.pt",
            "log": "log.jsonl",
        }
        paths = {k: out / v for k, v in names.items()}
    else:
        paths = {
            "model": out,
            "best": out.with_name(out.stem + ".best.pt"),
            "state": out.with_name(out.name + ".state"),
            "log": out.with_suffix(".log.jsonl"),
        }
    return paths


def state_path(out: str | os.PathLike) -> Path:
    """Where the resumable training state of the run ``out`` lives."""
    return _paths(out)["state"]


def model_path(out: str | os.PathLike) -> Path:
    """The latest model file of the run ``out``."""
    return _paths(out)["model"]


def best_path(out: str | os.PathLike) -> Path:
    """The best-on-validation model file of the run ``out``."""
    return _paths(out)["best"]


def log_path(out: str | os.PathLike) -> Path:
    """The JSONL log of the run ``out``."""
    return _paths(out)["log"]


def load_state(out: str | os.PathLike) -> dict | None:
    """The newest readable resumable state of ``out``: ``state.pt``, or with a warning the
    previous one when the latest is unreadable; None when there is none."""
    path = _paths(out)["state"]
    if not (path.is_file() or _atomic.previous_checkpoint(path).is_file()):
        return None
    return _atomic.load_checkpoint(path)


# ----------------------------------------------------------------------------- models


def _inner(model: nn.Module) -> nn.Module:
    """The model without its DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dcp(model: nn.Module) -> DCP:
    model = _inner(model)
    return model.dcp if isinstance(model, RefinedDCP) else cast(DCP, model)


def _model_config(model: nn.Module) -> dict:
    """The :class:`DCP` constructor arguments (and ``icp`` for a refined model), plain types."""
    dcp = _dcp(model)
    emb = dcp.emb_nn
    cfg: dict = {"emb_dims": emb.conv5.out_channels, "k": emb.k, "pointer": "identity"}
    pointer: Any = dcp.pointer  # one of two transformer layouts, told apart below
    if pointer is not None and hasattr(pointer, "model"):  # DCP's transformer
        layer = pointer.model.encoder.layers[0]
        cfg.update(
            pointer="transformer",
            n_blocks=len(pointer.model.encoder.layers),
            n_heads=layer.self_attn.heads,
            ff_dims=layer.feed_forward.w_1.out_features,
        )
    elif pointer is not None:  # the legacy compact transformer
        block = pointer.encoder[0]
        cfg.update(
            pointer="compact_transformer",
            n_blocks=len(pointer.encoder),
            n_heads=block.self_attn.num_heads,
            ff_dims=block.ff[0].out_features,
            model_dims=pointer.proj_in.out_features,
        )
    inner = _inner(model)
    if isinstance(inner, RefinedDCP):
        cfg["icp"] = {"iterations": inner.iterations, "temperature": inner.temperature}
    return cfg


def build_model(cfg: TrainConfig) -> nn.Module:
    """DCP-v2 (mode v2; DGCNN from ``init_weights``), or a refined DCP from ``cfg.init`` (e2e)."""
    if cfg.mode == "v2":
        model = DCP(
            emb_dims=cfg.emb_dims,
            k=cfg.k,
            pointer="transformer",
            n_blocks=cfg.n_blocks,
            n_heads=cfg.n_heads,
            ff_dims=cfg.ff_dims,
        )
        if cfg.init_weights:
            path = (
                Path(cfg.data_dir, "weights", "dcp_v1.t7")
                if cfg.init_weights == "dcp_v1"
                else Path(cfg.init_weights)
            )
            v1 = load_dcp_v1(path)
            missing, unexpected = model.load_state_dict(v1.state_dict(), strict=False)
            if unexpected or any(not k.startswith("pointer.") for k in missing):
                raise RuntimeError(f"DCP-v1 -> v2 transfer failed: {missing}, {unexpected}")
        return model
    if cfg.mode == "e2e":
        if not cfg.init:
            raise ValueError("--mode e2e needs --init, a DCP checkpoint")
        dcp = load_dcp_checkpoint(cfg.init)
        if isinstance(dcp, RefinedDCP):
            dcp = dcp.dcp
        return RefinedDCP(cast(DCP, dcp), cfg.e2e_iterations, cfg.e2e_temperature)
    raise ValueError(f"mode must be 'v2' or 'e2e', got {cfg.mode!r}")


def trainable(model: nn.Module, freeze_embedding: bool) -> list[nn.Parameter]:
    """Set ``requires_grad`` of the DGCNN and return the parameters to optimise."""
    for p in _dcp(model).emb_nn.parameters():
        p.requires_grad_(not freeze_embedding)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, freeze_embedding: bool) -> None:
    model.train()
    if freeze_embedding:
        _dcp(model).emb_nn.eval()  # frozen BatchNorm statistics


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule: ``lr * lr_gamma ** (number of milestones <= epoch)``."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.milestones)


# ----------------------------------------------------------------------------- data


def split_train_val(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index arrays ``(train, val)`` of ``n`` shapes; ``val`` has ``round(fraction *
    n)`` of them, drawn by ``default_rng(seed)``. ``train`` is sorted; ``val`` stays in the
    drawn order, so its first few shapes already mix the classes (the files are class-sorted)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(fraction * n)
    return np.sort(order[n_val:]), order[:n_val]


def _stack(items: list) -> dict[str, Tensor]:
    return {
        key: torch.from_numpy(np.stack([getattr(p, key) for p in items]))
        for key in ("source", "target", "rotation", "translation")
    }


def steps_per_epoch(n_shapes: int, batch_size: int, world: int) -> int:
    return n_shapes // (batch_size * world)


def rank_batches(
    points: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    epoch: int,
    rank: int,
    world: int,
    start_step: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """This rank's training batches of ``epoch``, from global step ``start_step`` on.

    The epoch's shapes are ``default_rng([seed, epoch]).permutation``; global step ``s`` uses the
    shapes ``[s * W * B, (s + 1) * W * B)`` of it and rank ``r`` the ``r``-th ``B`` of those
    (``W`` processes, ``B = batch_size``); the last incomplete global batch is dropped. Each pair
    comes from ``default_rng([seed, epoch, shape])``.
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(points))
    B = cfg.batch_size
    for step in range(start_step, steps_per_epoch(len(points), B, world)):
        first = (step * world + rank) * B
        items = []
        for idx in order[first : first + B]:
            rng = np.random.default_rng([cfg.seed, epoch, int(idx)])
            shape = points[idx][rng.permutation(points.shape[1])[: cfg.num_points]]
            items.append(make_pair(shape, cfg.protocol, rng, int(labels[idx]), cfg.num_points))
        yield _stack(items)


def make_val_pairs(points: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> list:
    """The fixed validation pairs: pair ``i`` of shape ``i`` from ``default_rng([split_seed, i])``."""
    n = min(cfg.val_pairs, len(points))
    return [
        make_pair(
            points[i],
            cfg.val_protocol,
            np.random.default_rng([cfg.split_seed, i]),
            int(labels[i]),
            cfg.num_points,
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False


def setup_distributed() -> Dist:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    here = not dist.is_initialized()
    if here:
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), device, here)


def _all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(model: nn.Module, d: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if d.world == 1:
        return
    for buf in _inner(model).buffers():
        dist.broadcast(buf, src=0)


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def validate(model: nn.Module, pairs: list, cfg: TrainConfig, d: Dist) -> dict[str, float]:
    """DCP's rotation RMSE (Euler zyx, degrees), translation RMSE and loss on ``pairs``, split
    across ranks (pair ``i`` on rank ``i % world``)."""
    net = _inner(model)
    was_training = net.training
    net.eval()
    mine = pairs[d.rank :: d.world]
    sq_r = sq_t = loss_sum = 0.0
    for start in range(0, len(mine), cfg.batch_size):
        batch = {k: v.to(d.device) for k, v in _stack(mine[start : start + cfg.batch_size]).items()}
        R, t = net(batch["source"], batch["target"])
        n = len(R)
        loss_sum += float(dcp_loss(R, t, batch["rotation"], batch["translation"])) * n
        R64, t64 = R.double().cpu().numpy(), t.double().cpu().numpy()
        dr = euler_zyx_deg(R64) - euler_zyx_deg(batch["rotation"].double().cpu().numpy())
        sq_r += float((dr**2).sum())
        sq_t += float(((t64 - batch["translation"].double().cpu().numpy()) ** 2).sum())
    n_total = len(pairs)
    sq_r, sq_t, loss_sum = _all_sum([sq_r, sq_t, loss_sum], d)
    net.train(was_training)
    return {
        "val_rmse_r": math.sqrt(sq_r / (3 * n_total)),
        "val_rmse_t": math.sqrt(sq_t / (3 * n_total)),
        "val_loss": loss_sum / n_total,
        "val_pairs": n_total,
    }


def _model_payload(model: nn.Module, cfg: TrainConfig, progress: dict) -> dict:
    """A small model file: float16 weights, constructor config, the run's options and progress."""
    state = {
        k: (v.detach().half() if v.is_floating_point() else v).cpu()
        for k, v in _dcp(model).state_dict().items()
    }
    return {
        "model": state,
        "config": _model_config(model),
        "train": _plain(asdict(cfg)),
        "progress": dict(progress),
    }


def _plain(obj: object) -> object:
    """Tuples to lists, so the stored config has only ``weights_only``-safe plain types."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def save_checkpoint(
    out: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    progress: dict,
) -> None:
    """Write the latest model file and the resumable state (keeping the previous state)."""
    paths = _paths(out)
    state = {
        "model": {k: v.detach().cpu() for k, v in _dcp(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "config": _model_config(model),
        "train": _plain(asdict(cfg)),
        "progress": dict(progress),
    }
    _atomic.save_checkpoint(state, paths["state"])  # keeps the previous state as .prev
    _atomic.save_checkpoint(_model_payload(model, cfg, progress), paths["model"], False)


class _StopFlag:
    """Set by SIGTERM/SIGINT, so the loop saves and leaves at the next step."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, _signum: int, _frame: object) -> None:
        self.raised = True

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def _config_from_state(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """Check that a resumed run keeps the options that shape the model and the data."""
    fixed = ("mode", "emb_dims", "k", "n_blocks", "n_heads", "ff_dims", "split_seed", "seed")
    fixed += ("val_fraction", "dataset")  # type: ignore[assignment]  # mypy: fixed-length tuple
    clash = {
        k: (saved[k], getattr(cfg, k)) for k in fixed if k in saved and saved[k] != getattr(cfg, k)
    }
    if clash:
        raise ValueError(f"--resume with options that differ from the saved run: {clash}")
    return cfg


def run_training(cfg: TrainConfig, resume: bool = False) -> nn.Module:
    """Train (or resume) on this process's share; returns the trained model (unwrapped).

    Under ``torchrun`` every rank calls this; only rank 0 writes files.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    d = setup_distributed()
    try:
        return _train_loop(cfg, resume, d)
    finally:
        if d.initialised_here:
            dist.destroy_process_group()


def _load_split(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    points, labels = load_modelnet(cfg.data_dir, cfg.dataset, "train")
    if cfg.limit_shapes:
        points, labels = points[: cfg.limit_shapes], labels[: cfg.limit_shapes]
    train_idx, val_idx = split_train_val(len(points), cfg.val_fraction, cfg.split_seed)
    tr_pts, tr_lab = points[train_idx], labels[train_idx]
    va_pts, va_lab = points[val_idx], labels[val_idx]
    if cfg.protocol == "unseen":  # train (and validate) on the first half of the classes
        n_cls = NUM_CLASSES[cfg.dataset]
        keep, _ = unseen_class_split(tr_lab, n_cls)
        tr_pts, tr_lab = tr_pts[keep], tr_lab[keep]
        keep, _ = unseen_class_split(va_lab, n_cls)
        va_pts, va_lab = va_pts[keep], va_lab[keep]
    return tr_pts, tr_lab, va_pts, va_lab


def _train_loop(cfg: TrainConfig, resume: bool, d: Dist) -> nn.Module:
    paths = _paths(cfg.out)
    lead = d.rank == 0
    if lead:
        paths["state"].parent.mkdir(parents=True, exist_ok=True)
    tr_pts, tr_lab, va_pts, va_lab = _load_split(cfg)
    n_steps = steps_per_epoch(len(tr_pts), cfg.batch_size, d.world)
    if n_steps == 0:
        raise ValueError(
            f"{len(tr_pts)} training shapes are fewer than one global batch "
            f"({d.world} x {cfg.batch_size})"
        )
    vpairs = make_val_pairs(va_pts, va_lab, cfg) if cfg.val_pairs > 0 and len(va_pts) else []

    model = build_model(cfg).to(d.device)
    params = trainable(model, cfg.freeze_embedding)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    progress: dict = {
        "epoch": 0,
        "step_in_epoch": 0,
        "steps": 0,
        "seconds": 0.0,
        "best_val_rmse_r": None,
        "best_step": None,
        "world_size": d.world,
    }
    if resume:
        _resume(cfg, d, model, optimizer, progress)
    if d.world > 1:
        ddp_kwargs: dict[str, Any] = (
            {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
        )
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    log = paths["log"].open("a") if lead else None
    run = _Run(cfg, d, model, optimizer, progress, vpairs, log, paths)
    if lead:
        run.write(
            {
                "kind": "start",
                "resume": resume,
                "steps": progress["steps"],
                "train_shapes": len(tr_pts),
                "val_shapes": len(va_pts),
                "steps_per_epoch": n_steps,
                "world_size": d.world,
                "argv": sys.argv,
                "config": _plain(asdict(cfg)),
            }
        )
    with _StopFlag() as flag:
        run.train(tr_pts, tr_lab, n_steps, flag)
    if log is not None:
        log.close()
    if d.world > 1:
        dist.barrier()  # the files are complete before any rank returns
    return _inner(model)


def _resume(
    cfg: TrainConfig, d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict
) -> None:
    """Load the saved run of ``cfg.out`` (if any) into ``model``, ``optimizer`` and
    ``progress``, after checking that it was saved with the same options and process count."""
    lead = d.rank == 0
    # Rank 0 reads the state (or else the carried model file) and hands it to the others: no
    # shared file system needed.
    saved = None
    if lead:
        saved = load_state(cfg.out)
        if saved is None and cfg.resume_weights:
            saved = _state_from_model_file(cfg.resume_weights)
    if d.world > 1:
        box = [saved]
        dist.broadcast_object_list(box, src=0)
        saved = box[0]
    if saved is None:
        return
    _config_from_state(cfg, saved.get("train", {}))
    if saved["progress"].get("world_size", 1) != d.world:
        # The step index counts global batches of world * batch_size shapes.
        raise ValueError(
            f"resuming with {d.world} processes a run saved with "
            f"{saved['progress'].get('world_size', 1)}; keep the process count"
        )
    _dcp(model).load_state_dict(saved["model"])
    if saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])
    progress.update(saved["progress"])
    if lead:
        print(f"resumed at epoch {progress['epoch']} step {progress['steps']}", flush=True)


def _state_from_model_file(path: str | os.PathLike) -> dict:
    """A resumable state from a run's small model file (``model.pt`` / ``best.pt``): its
    weights in float32, its progress and options, and no optimiser state (Adam starts afresh).

    For carrying a run to another machine when only the model file travels (11 MB in float16
    against 67 MB for ``state.pt`` with Adam's moments): the data order and the learning-rate
    schedule continue from the saved step; the weights lose the float32 digits below float16's.
    """
    payload = _atomic.load_checkpoint(Path(path))
    if "progress" not in payload or "train" not in payload:
        raise ValueError(f"{path} is not a model file written by `difficp train dcp`")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()}
    progress = dict(payload["progress"])
    print(
        f"resuming from the model file {path} (step {progress.get('steps')}; fresh optimiser)",
        flush=True,
    )
    return {
        "model": weights,
        "optimizer": None,
        "train": payload["train"],
        "progress": progress,
    }


class _Run:
    """One rank's training run: steps through the epochs, logs, validates and saves.

    ``progress`` (epoch, step, seconds, best validation) is what the checkpoints keep; only
    rank 0 (``lead``) writes the log and the files.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        d: Dist,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: dict,
        vpairs: list,
        log: TextIO | None,
        paths: dict[str, Path],
    ) -> None:
        self.cfg, self.d, self.model, self.optimizer = cfg, d, model, optimizer
        self.progress, self.vpairs, self.log, self.paths = progress, vpairs, log, paths
        self.lead = d.rank == 0
        self.running: list[float] = []  # losses since the last train record

    def write(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            print(json.dumps(record), flush=True)

    def save(self) -> None:
        """Sync the buffers (a collective: every rank calls it) and save the state (rank 0)."""
        _sync_buffers(self.model, self.d)
        if self.lead:
            save_checkpoint(self.cfg.out, self.model, self.optimizer, self.cfg, self.progress)
        self.last_save = time.perf_counter()

    def validate(self) -> None:
        """Validate, keep the best model (best.pt) and log the result."""
        if not self.vpairs:
            return
        progress = self.progress
        _sync_buffers(self.model, self.d)
        tic = time.perf_counter()
        result = validate(self.model, self.vpairs, self.cfg, self.d)
        best = progress["best_val_rmse_r"]
        is_best = best is None or result["val_rmse_r"] < best
        if is_best:
            progress["best_val_rmse_r"] = result["val_rmse_r"]
            progress["best_step"] = progress["steps"]
            if self.lead:
                payload = _model_payload(self.model, self.cfg, progress)
                _atomic.save_checkpoint(payload, self.paths["best"], False)
        self.write(
            {
                "kind": "val",
                "step": progress["steps"],
                "epoch": progress["epoch"],
                **result,
                "best": is_best,
                "val_seconds": round(time.perf_counter() - tic, 1),
            }
        )

    def train(self, tr_pts: np.ndarray, tr_lab: np.ndarray, n_steps: int, flag: _StopFlag) -> None:
        """Run the epochs left (until done, stopped or out of time), then validate the final
        model (unless that was just done), save and log the stop."""
        cfg, progress = self.cfg, self.progress
        self.start_time = time.perf_counter() - progress["seconds"]
        self.last_save = time.perf_counter()
        stop = False
        while progress["epoch"] < cfg.epochs and not stop:
            stop = self._epoch(tr_pts, tr_lab, n_steps, flag)
            if not stop:
                progress["epoch"] += 1
                progress["step_in_epoch"] = 0
                self.save()
        finished = progress["epoch"] >= cfg.epochs
        if finished and (not cfg.val_every or progress["steps"] % cfg.val_every):
            self.validate()  # the final model's validation, unless it was just done
        self.save()
        self.write(
            {
                "kind": "stop",
                "steps": progress["steps"],
                "finished": finished,
                "seconds": round(progress["seconds"], 1),
            }
        )

    def _epoch(self, tr_pts: np.ndarray, tr_lab: np.ndarray, n_steps: int, flag: _StopFlag) -> bool:
        """The rest of the current epoch; True when the run has to stop before its end."""
        cfg, d, progress = self.cfg, self.d, self.progress
        lr = learning_rate(cfg, progress["epoch"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        set_train_mode(self.model, cfg.freeze_embedding)
        batches = rank_batches(
            tr_pts, tr_lab, cfg, progress["epoch"], d.rank, d.world, progress["step_in_epoch"]
        )
        for batch in batches:
            if cfg.max_steps is not None and progress["steps"] >= cfg.max_steps:
                return True  # resumed at the cap already (the same on every rank)
            self._step({k: v.to(d.device) for k, v in batch.items()})
            if progress["steps"] % cfg.log_every == 0:
                self._log_train(lr, n_steps)
            if cfg.val_every and progress["steps"] % cfg.val_every == 0:
                self.validate()
                set_train_mode(self.model, cfg.freeze_embedding)
            stop, due = self._votes(flag)
            if due:
                self.save()
            if stop:
                return True
        return False

    def _step(self, batch: dict[str, Tensor]) -> None:
        """One optimiser step on ``batch``."""
        model, progress = self.model, self.progress
        if self.cfg.cycle:
            R, t, R_ba, t_ba = _forward_both(model, batch)
            loss = dcp_loss(R, t, batch["rotation"], batch["translation"])
            loss = loss + 0.1 * cycle_loss(R, t, R_ba, t_ba)
        else:
            R, t = model(batch["source"], batch["target"])
            loss = dcp_loss(R, t, batch["rotation"], batch["translation"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.running.append(loss.item())
        progress["step_in_epoch"] += 1
        progress["steps"] += 1
        progress["seconds"] = time.perf_counter() - self.start_time

    def _log_train(self, lr: float, n_steps: int) -> None:
        """The mean loss over every rank since the last record."""
        progress = self.progress
        mean_loss = _all_sum([float(np.mean(self.running))], self.d)[0] / self.d.world
        self.running = []
        self.write(
            {
                "kind": "train",
                "step": progress["steps"],
                "epoch": progress["epoch"],
                "epoch_fraction": round(progress["step_in_epoch"] / n_steps, 4),
                "loss": mean_loss,
                "lr": lr,
                "seconds": round(progress["seconds"], 1),
            }
        )

    def _votes(self, flag: _StopFlag) -> tuple[bool, bool]:
        """Whether to stop (a signal, the time budget, the step cap) and whether a save is
        due. Every rank must take the same decisions (saving syncs buffers, a collective)
        and clocks differ: any rank's vote counts for all."""
        cfg, progress = self.cfg, self.progress
        budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
        over = (budget is not None and progress["seconds"] > budget) or flag.raised
        over = over or (cfg.max_steps is not None and progress["steps"] >= cfg.max_steps)
        due = bool(cfg.save_every) and progress["steps"] % (cfg.save_every or 1) == 0
        due = due or time.perf_counter() - self.last_save > 60.0 * cfg.save_minutes
        votes = _all_sum([float(over), float(due)], self.d)
        return votes[0] > 0, votes[1] > 0


def _forward_both(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """:meth:`DCP.forward_both` through ``model``'s ``__call__``: DDP synchronises gradients
    only of what runs through its own ``forward``, so the call has to go that way."""
    inner = _inner(model)
    if not isinstance(inner, DCP):
        raise ValueError("--cycle needs a plain DCP model (mode v2)")
    original = inner.forward
    inner.forward = inner.forward_both  # type: ignore[method-assign, assignment]
    try:
        return model(batch["source"], batch["target"])
    finally:
        inner.forward = original  # type: ignore[method-assign]


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training; returns the latest model file's path."""
    run_training(cfg, resume)
    return model_path(cfg.out)
