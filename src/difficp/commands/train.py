"""``difficp train dcp ...``: train DCP-v2 on ModelNet, or fine-tune it end to end through ICP.

Examples::

    difficp train dcp --data-dir ../shared/data --out results/modelnet/dcp_v2.pt --max-minutes 25
    difficp train dcp --mode e2e --init results/modelnet/dcp_v2.pt \
        --out results/modelnet/dcp_v2_e2e.pt --max-minutes 12
    # continue an interrupted run
    difficp train dcp ... --resume
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and its ``dcp`` sub-command."""
    parser = subparsers.add_parser("train", help="train a learned registration model (dcp)")
    sub = parser.add_subparsers(dest="model", metavar="MODEL")
    p = sub.add_parser(
        "dcp",
        help="DCP-v2 on ModelNet (CPU schedule), or end-to-end through difficp ICP",
        description="Train DCP-v2's transformer on top of the frozen DCP-v1 embedding (mode v2), "
        "or fine-tune a DCP-v2 through differentiable soft ICP with the loss on the "
        "refined pose (mode e2e). Writes OUT (small float16 model), OUT.state "
        "(resumable) and OUT's .log.jsonl.",
    )
    p.add_argument("--data-dir", default=None, help="data directory (default: $DIFFICP_DATA)")
    p.add_argument(
        "--dataset",
        default="modelnet10",
        choices=["modelnet10", "modelnet40", "modelnet40_airplane"],
    )
    p.add_argument(
        "--protocol",
        default="clean",
        choices=["clean", "unseen"],
        help="unseen: train on the first half of the classes only",
    )
    p.add_argument("--mode", default="v2", choices=["v2", "e2e"])
    p.add_argument("--init", default=None, help="e2e: DCP-v2 checkpoint to start from")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much time")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-points", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--train-embedding",
        action="store_true",
        help="also train the DGCNN (default: frozen DCP-v1 embedding)",
    )
    p.add_argument("--e2e-iterations", type=int, default=3)
    p.add_argument("--e2e-temperature", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--limit-shapes", type=int, default=None, help="use only N training shapes")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state")
    p.set_defaults(func=run_dcp)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_dcp(args: argparse.Namespace) -> int:
    from difficp.datadir import require_data_dir
    from difficp.learning.train_dcp import TrainConfig, train

    cfg = TrainConfig(
        data_dir=str(require_data_dir(args.data_dir, needs="DCP training")),
        out=args.out,
        dataset=args.dataset,
        protocol=args.protocol,
        mode=args.mode,
        init=args.init,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        num_points=args.num_points,
        lr=args.lr,
        freeze_embedding=not args.train_embedding,
        e2e_iterations=args.e2e_iterations,
        e2e_temperature=args.e2e_temperature,
        seed=args.seed,
        save_every=args.save_every,
        threads=args.threads,
        limit_shapes=args.limit_shapes,
    )
    path = train(cfg, resume=args.resume)
    print(f"saved {path}")
    return 0
