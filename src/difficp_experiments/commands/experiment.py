"""``difficp experiment``: the paper experiments. ``depth``: pose CNN + differentiable ICP.

difficp experiment depth train --data-dir D --out results/depth [--seed 0] [--resume]
difficp experiment depth eval  --data-dir D --out DIR --n 500 --seed 1 [--checkpoint P]
difficp experiment depth plot  --out DIR
difficp experiment depth study --data-dir D --out results/depth/study [--seeds 0,1,2] [--resume]

Paths are relative to the current directory: ``--out`` defaults to ``results/depth`` and
``--checkpoint`` to ``results/depth/pose_cnn.pt``, the repository's committed results when run
from its root.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difficp._atomic import atomic_write_text
from difficp.cli import add_command
from difficp_experiments.commands import require

# Training and evaluation render depth maps with Open3D and show progress with tqdm; the figure
# is matplotlib's.
require("matplotlib", "tqdm", "open3d")

DEFAULT_OUT = Path("results") / "depth"
CHECKPOINT_NAME = "pose_cnn.pt"
FIGURE_NAME = "success_vs_initial_distance.png"
STUDY_FIGURE_NAME = "study.png"


def committed_checkpoint() -> Path:
    """The checkpoint shipped with the repository, ``results/depth/pose_cnn.pt``, relative to the
    current directory (the default of ``eval --checkpoint``: run from the repository root, or
    pass the path)."""
    return DEFAULT_OUT / CHECKPOINT_NAME


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def run_train(args: argparse.Namespace) -> int:
    from difficp.datadir import require_data_dir
    from difficp_experiments.depth.train import StageConfig, train_depth

    _threads(args.threads)
    data_dir = require_data_dir(args.data_dir, needs="the body mesh")
    steps = max(1, args.n // args.batch)
    nn_cfg = StageConfig(epochs=args.epochs, steps=steps, batch=args.batch)
    icp_cfg = StageConfig(
        epochs=args.icp_epochs,
        steps=max(1, args.icp_n // args.batch),
        batch=args.batch,
        lr=args.icp_lr,
        min_lr=1e-5,
    )
    train_depth(
        data_dir,
        Path(args.out),
        seed=args.seed,
        resume=args.resume,
        nn_config=nn_cfg,
        icp_config=icp_cfg,
        progress=not args.no_progress,
        icp_iterations=(args.train_p2p_iters, args.train_sym_iters),
        pose_weight=args.pose_weight,
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from difficp.datadir import require_data_dir
    from difficp_experiments.depth.data import TEST, DepthPairs, load_or_build, open_renderer
    from difficp_experiments.depth.evaluate import method_errors, summarize
    from difficp_experiments.depth.plot import plot_metrics
    from difficp_experiments.depth.train import load_final

    _threads(args.threads)
    data_dir = require_data_dir(args.data_dir, needs="the body mesh")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} not found; train one with "
            "`difficp experiment depth train` or pass --checkpoint"
        )
    nets, scene, _ = load_final(ckpt)
    if args.icp_res:
        scene = replace(scene, icp_res=args.icp_res)
    out = Path(args.out)
    data = DepthPairs(open_renderer(data_dir), scene, args.seed, TEST, args.n)
    # The test set is rendered once and cached; a later run with the same seed/n reuses it.
    cache = out / "cache" / f"test_seed{args.seed}_n{args.n}_icp{scene.icp_res}.pt"
    batch = load_or_build(cache, data, progress=not args.no_progress)
    errors = method_errors(nets, batch, scene, progress=not args.no_progress)
    metrics = summarize(errors, batch["init_rmse"])
    metrics.update(seed=args.seed, checkpoint=str(ckpt), icp_res=scene.icp_res)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    plot_metrics(metrics, out / FIGURE_NAME)
    for name, m in metrics["methods"].items():
        print(
            f"{name:12s} success@3cm {m['success_3cm']:.3f}  success@30cm "
            f"{m['success_30cm']:.3f}  median error {m['median_error_m']:.3f} m"
        )
    print(f"wrote {out / 'metrics.json'} and {out / FIGURE_NAME}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from difficp_experiments.depth.plot import plot_metrics

    out = Path(args.out)
    metrics = json.loads((out / "metrics.json").read_text())
    plot_metrics(metrics, out / FIGURE_NAME)
    print(f"wrote {out / FIGURE_NAME}")
    return 0


def _study_written(out: Path, metrics: dict) -> int:
    from difficp_experiments.depth.plot import plot_study

    plot_study(metrics, out / STUDY_FIGURE_NAME)
    print((out / "tables.md").read_text())
    print(
        f"wrote {out / 'metrics.json'}, {out / 'tables.md'} and {out / STUDY_FIGURE_NAME} "
        f"({len(metrics['runs'])} runs)"
    )
    return 0


def run_study(args: argparse.Namespace) -> int:
    from difficp_experiments.depth.study import ARMS, tabulate

    out = Path(args.out)
    if args.report_only:
        metrics = tabulate(out)
        if not metrics:
            raise FileNotFoundError(f"nothing to tabulate in {out} (no start.json)")
        return _study_written(out, metrics)

    from difficp.datadir import require_data_dir
    from difficp_experiments.depth.data import TEST, DepthPairs, load_or_build, open_renderer
    from difficp_experiments.depth.study import SCRATCH, start_network
    from difficp_experiments.depth.study import run_study as study
    from difficp_experiments.depth.train import StageConfig, load_final

    _threads(args.threads)
    data_dir = require_data_dir(args.data_dir, needs="the body mesh")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    arms = tuple(args.arms.split(","))
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; expected some of {ARMS}")
    nets, scene, _ = load_final(Path(args.start))
    start = start_network(nets, scene, args.start_net, args.scratch_seed)
    renderer = open_renderer(data_dir)
    test = DepthPairs(renderer, scene, args.test_seed, TEST, args.test_n)
    cache = out / "cache" / f"test_seed{args.test_seed}_n{args.test_n}_icp{scene.icp_res}.pt"
    test_data = load_or_build(cache, test, progress=not args.no_progress)
    if args.reevaluate:
        from difficp_experiments.depth.study import reevaluate

        metrics = reevaluate(start, test_data, scene, out, progress=not args.no_progress)
        return _study_written(out, metrics)
    config = StageConfig(
        epochs=args.epochs,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        min_lr=args.min_lr,
        val_size=args.val_size,
    )
    metrics = study(
        start,
        renderer,
        scene,
        test_data,
        out,
        config,
        seeds=seeds,
        arms=arms,
        icp_iterations=(args.train_p2p_iters, args.train_sym_iters),
        pose_weight=args.pose_weight,
        resume=args.resume,
        progress=not args.no_progress,
        info={
            "start": f"{args.start}:{args.start_net}"
            + (f" (seed {args.scratch_seed})" if args.start_net == SCRATCH else ""),
            "test_seed": args.test_seed,
            "torch_threads": args.threads,
        },
    )
    return _study_written(out, metrics)


def _common(p: argparse.ArgumentParser, seed: int | None, out: Path = DEFAULT_OUT) -> None:
    p.add_argument("--data-dir", default=None, help="data directory (default: $DIFFICP_DATA)")
    p.add_argument("--out", default=str(out), help="output directory (%(default)s)")
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, help="random seed (%(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (%(default)s: the machine is usually shared)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "experiment")
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    depth = experiments.add_parser(
        "depth", help="pose CNN + differentiable ICP on rendered depth maps of a body"
    )
    actions = depth.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser("train", help="train nn, then fine-tune nn_icp through ICP")
    _common(train, seed=0)
    train.add_argument(
        "--n", type=int, default=19200, help="fresh training samples per nn epoch (%(default)s)"
    )
    train.add_argument("--epochs", type=int, default=10, help="nn epochs (%(default)s)")
    train.add_argument(
        "--icp-n", type=int, default=4800, help="training samples per nn_icp epoch (%(default)s)"
    )
    train.add_argument("--icp-epochs", type=int, default=3, help="nn_icp epochs (%(default)s)")
    train.add_argument(
        "--icp-lr", type=float, default=2e-4, help="nn_icp fine-tuning learning rate (%(default)s)"
    )
    train.add_argument(
        "--train-p2p-iters",
        type=int,
        default=3,
        help="soft point-to-point ICP iterations unrolled in training (%(default)s)",
    )
    train.add_argument(
        "--train-sym-iters",
        type=int,
        default=2,
        help="soft symmetric ICP iterations unrolled in training (%(default)s)",
    )
    train.add_argument(
        "--pose-weight",
        type=float,
        default=1.0,
        help="weight of the network's own pose loss in nn_icp (%(default)s)",
    )
    train.add_argument("--batch", type=int, default=32, help="batch size (%(default)s)")
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints after an interruption"
    )
    train.set_defaults(func=run_train)

    ev = actions.add_parser("eval", help="evaluate the four methods on fresh test samples")
    _common(ev, seed=1)
    ev.add_argument("--n", type=int, default=500, help="test samples (%(default)s)")
    ev.add_argument(
        "--checkpoint",
        default=str(committed_checkpoint()),
        help="pose_cnn.pt to evaluate (default: %(default)s, the committed one when run from the "
        "repository root)",
    )
    ev.add_argument(
        "--icp-res",
        type=int,
        default=None,
        help="render the ICP point clouds at this resolution (default: as trained)",
    )
    ev.set_defaults(func=run_eval)

    plot = actions.add_parser("plot", help="plot OUT/metrics.json to a PNG")
    plot.add_argument("--out", default=str(DEFAULT_OUT), help="directory of metrics.json")
    plot.set_defaults(func=run_plot)

    study = actions.add_parser(
        "study",
        help="matched-budget fine-tuning study: pose loss vs loss through ICP vs both",
        description="Fine-tune the start network three ways (arms pose, icp, both) with the same "
        "steps, batch, learning-rate schedule and training samples per seed, then evaluate each "
        "on the same test samples raw and refined by ICP. Writes OUT/metrics.json and "
        "OUT/tables.md, rewritten after every finished arm.",
    )
    _common(study, seed=None, out=DEFAULT_OUT / "study")
    study.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (%(default)s)")
    study.add_argument("--arms", default=",".join(("pose", "icp", "both")), help="(%(default)s)")
    study.add_argument(
        "--start",
        default=str(committed_checkpoint()),
        help="checkpoint holding the start network (%(default)s)",
    )
    study.add_argument(
        "--start-net",
        default="nn",
        help="network in --start (%(default)s), or 'scratch': a freshly initialised network "
        "of its architecture (training from scratch)",
    )
    study.add_argument(
        "--scratch-seed", type=int, default=0, help="init seed of --start-net scratch (%(default)s)"
    )
    study.add_argument("--epochs", type=int, default=6, help="epochs per arm (%(default)s)")
    study.add_argument("--steps", type=int, default=100, help="batches per epoch (%(default)s)")
    study.add_argument("--batch", type=int, default=32, help="batch size (%(default)s)")
    study.add_argument("--lr", type=float, default=2e-4, help="initial learning rate (%(default)s)")
    study.add_argument(
        "--min-lr", type=float, default=1e-5, help="cosine schedule floor (%(default)s)"
    )
    study.add_argument("--val-size", type=int, default=256, help="validation samples (%(default)s)")
    study.add_argument(
        "--train-p2p-iters",
        type=int,
        default=3,
        help="soft point-to-point iterations (%(default)s)",
    )
    study.add_argument(
        "--train-sym-iters", type=int, default=2, help="soft symmetric iterations (%(default)s)"
    )
    study.add_argument(
        "--pose-weight", type=float, default=1.0, help="pose-loss weight of arm both (%(default)s)"
    )
    study.add_argument("--test-n", type=int, default=500, help="test samples (%(default)s)")
    study.add_argument("--test-seed", type=int, default=1, help="test seed (%(default)s)")
    study.add_argument(
        "--resume", action="store_true", help="skip finished arms, continue unfinished ones"
    )
    study.add_argument(
        "--report-only", action="store_true", help="only tabulate what has finished in OUT"
    )
    study.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate the finished arms again from their final checkpoints (no training)",
    )
    study.set_defaults(func=run_study)
