"""``difficp train dcp ...``: train DCP-v2 on ModelNet, or fine-tune it end to end through ICP.

Examples::

    difficp train dcp --data-dir ../shared/data --out runs/dcp_v2 --epochs 10 --milestones 7,9
    # continue an interrupted run: the same command plus --resume
    difficp train dcp --data-dir ../shared/data --out runs/dcp_v2 --epochs 10 --milestones 7,9 \
        --resume
    # the same on 4 GPUs (or 4 CPU processes with gloo), 8 pairs per process and step
    torchrun --standalone --nproc_per_node 4 -m difficp.cli train dcp --out runs/dcp_v2 ...
    difficp train dcp --mode e2e --init runs/dcp_v2/best.pt --out runs/dcp_v2_e2e --max-minutes 30
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from difficp_experiments.commands import add_dataset_options, add_subcommand, require

require("h5py")  # ModelNet is read from HDF5

DCP_HELP = "DCP-v2 on ModelNet, or end-to-end through difficp ICP (runs under torchrun too)"
DESCRIPTION = (
    "Train DCP-v2 (DGCNN from the DCP-v1 weights, DCP's transformer, SVD head) "
    "on the train split minus a validation part (mode v2), or fine-tune a DCP through "
    "differentiable soft ICP with the loss on the refined pose (mode e2e). OUT is a "
    "directory (model.pt, best.pt, state.pt, log.jsonl) or a .pt path (OUT, OUT's "
    ".best.pt, .state and .log.jsonl siblings). Under `torchrun --nproc_per_node N` "
    "it trains with DistributedDataParallel (gloo on CPU, NCCL on GPU)."
)

if TYPE_CHECKING:
    from difficp_experiments.modelnet.train_dcp import TrainConfig


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and its ``dcp`` sub-command."""
    p = add_subcommand(subparsers, "train", "dcp", DCP_HELP, DESCRIPTION, "model")
    add_dataset_options(
        p,
        ("clean", "noise", "unseen"),
        "training pairs; unseen: train on the first half of the classes only",
    )
    p.add_argument("--mode", default="v2", choices=["v2", "e2e"])
    p.add_argument("--init", default=None, help="e2e: DCP checkpoint to start from")
    p.add_argument(
        "--init-weights",
        default="dcp_v1",
        help="v2: DGCNN start: dcp_v1 (DATA/weights/dcp_v1.t7), a path, or none",
    )
    p.add_argument("--out", required=True, help="run directory, or a checkpoint path (.pt)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much time")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in all")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step per process")
    p.add_argument("--num-points", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument(
        "--milestones", type=_ints, default=(), help="epochs where lr *= gamma, e.g. 6,8"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--cycle", action="store_true", help="add DCP's cycle-consistency loss")
    p.add_argument(
        "--freeze-embedding",
        action="store_true",
        help="keep the DGCNN (and its BatchNorm) fixed; train the transformer only",
    )
    p.add_argument(
        "--train-embedding",
        action="store_true",
        help=argparse.SUPPRESS,  # the old opt-in; training the DGCNN is now the default
    )
    p.add_argument("--emb-dims", type=int, default=512)
    p.add_argument("--k", type=int, default=20, help="DGCNN neighbours")
    p.add_argument("--n-blocks", type=int, default=1)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dims", type=int, default=1024)
    p.add_argument("--e2e-iterations", type=int, default=3)
    p.add_argument("--e2e-temperature", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-pairs", type=int, default=96, help="validation pairs per check")
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps (0: end)")
    p.add_argument("--val-protocol", default="clean", choices=["clean", "noise"])
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-minutes", type=float, default=5.0, help="state every M minutes")
    p.add_argument("--save-every", type=int, default=None, help="also a state every N steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--limit-shapes", type=int, default=None, help="use only N training shapes")
    p.add_argument("--resume", action="store_true", help="continue from the saved state")
    p.add_argument(
        "--resume-weights",
        default=None,
        metavar="MODEL",
        help="with --resume and no state in --out: continue from this model file (model.pt: "
        "its weights, step and schedule; a fresh optimiser), e.g. one carried from another machine",
    )
    p.set_defaults(func=run_dcp)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~difficp_experiments.modelnet.train_dcp.TrainConfig` of parsed ``train dcp`` options."""
    from difficp.datadir import require_data_dir
    from difficp_experiments.modelnet.train_dcp import TrainConfig

    init_weights = None if str(args.init_weights).lower() == "none" else args.init_weights
    return TrainConfig(
        data_dir=str(require_data_dir(args.data_dir, needs="DCP training")),
        out=args.out,
        dataset=args.dataset,
        protocol=args.protocol,
        mode=args.mode,
        init=args.init,
        init_weights=init_weights,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_points=args.num_points,
        lr=args.lr,
        lr_gamma=args.lr_gamma,
        milestones=tuple(args.milestones),
        weight_decay=args.weight_decay,
        cycle=args.cycle,
        freeze_embedding=args.freeze_embedding,
        emb_dims=args.emb_dims,
        k=args.k,
        n_blocks=args.n_blocks,
        n_heads=args.n_heads,
        ff_dims=args.ff_dims,
        e2e_iterations=args.e2e_iterations,
        e2e_temperature=args.e2e_temperature,
        seed=args.seed,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        val_pairs=args.val_pairs,
        val_every=args.val_every,
        val_protocol=args.val_protocol,
        log_every=args.log_every,
        save_minutes=args.save_minutes,
        save_every=args.save_every,
        threads=args.threads,
        limit_shapes=args.limit_shapes,
        resume_weights=args.resume_weights,
    )


def run_dcp(args: argparse.Namespace) -> int:
    from difficp_experiments.modelnet.train_dcp import run_training

    cfg = config_from_args(args)
    run_training(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved run {args.out}")
    return 0
