"""``difficp benchmark modelnet ...``: the ModelNet registration benchmark.

Example::

    difficp benchmark modelnet --data-dir ../shared/data --dataset modelnet10 --protocol clean \
        --methods dcp_v1,dcp_v1+icp,icp --limit 100 --out results/modelnet/clean
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difficp_experiments.commands import add_dataset_options, add_subcommand, require

# ModelNet is read from HDF5; tqdm shows progress. (Open3D is needed only by the open3d_*
# methods, which say so themselves.)
require("h5py", "tqdm")

MODELNET_HELP = "ModelNet pairs: DCP, PointNetLK, FGR, ICP and difficp refinement"
DESCRIPTION = (
    "Evaluate registration methods on deterministic ModelNet test pairs and "
    "write OUT/results.json and OUT/results.md (per-method estimates are cached "
    "in OUT/raw/, keyed by dataset, protocol, seed, method options and code version, so "
    "methods can be added in later runs and an interrupted run resumes)."
)
PROTOCOLS = ("clean", "unseen", "noise", "noise_independent", "partial")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``benchmark`` and its ``modelnet`` sub-command."""
    p = add_subcommand(subparsers, "benchmark", "modelnet", MODELNET_HELP, DESCRIPTION, "benchmark")
    add_dataset_options(p, PROTOCOLS)
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (icp, open3d_icp, open3d_fgr, pointnetlk, dcp_v1, "
        "dcp_v2, dcp_v2_e2e, and the calibration rows true_rotA = the true pose turned by A "
        "degrees, each optionally with +icp; 'calibration' stands for true_rot5,10,20,30 "
        "with and without +icp); default: all but the calibration rows",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N test pairs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="base seed of the test pairs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--dcp-v2",
        default="results/modelnet/dcp_v2.pt",
        help="DCP-v2 checkpoint from `difficp train dcp`",
    )
    p.add_argument(
        "--dcp-v2-e2e",
        default="results/modelnet/dcp_v2_e2e.pt",
        help="end-to-end fine-tuned DCP-v2 checkpoint",
    )
    p.add_argument(
        "--refine-max-distance",
        type=float,
        default=0.1,
        help="rejection distance of the X+icp refinement (<= 0: none)",
    )
    p.add_argument("--refine-max-iterations", type=int, default=50)
    p.add_argument("--icp-max-iterations", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--force", action="store_true", help="recompute cached methods")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new chunk of pairs after this long, then tabulate what is cached "
        "(each row says how many pairs it covers); 0: only tabulate",
    )
    p.set_defaults(func=run_modelnet)


def run_modelnet(args: argparse.Namespace) -> int:
    from difficp.datadir import require_data_dir
    from difficp_experiments.modelnet.benchmark import (
        CALIBRATION_METHODS,
        DEFAULT_METHODS,
        BenchmarkConfig,
        parse_methods,
        run_benchmark,
    )

    cfg = BenchmarkConfig(
        data_dir=require_data_dir(args.data_dir, needs="the ModelNet benchmark"),
        dataset=args.dataset,
        protocol=args.protocol,
        methods=parse_methods(
            (args.methods or DEFAULT_METHODS).replace("calibration", CALIBRATION_METHODS)
        ),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        dcp_v2=Path(args.dcp_v2) if args.dcp_v2 else None,
        dcp_v2_e2e=Path(args.dcp_v2_e2e) if args.dcp_v2_e2e else None,
        refine_max_distance=args.refine_max_distance if args.refine_max_distance > 0 else None,
        refine_max_iterations=args.refine_max_iterations,
        icp_max_iterations=args.icp_max_iterations,
        threads=args.threads,
        force=args.force,
        max_minutes=args.max_minutes,
    )
    results = run_benchmark(cfg, Path(args.out))
    print((Path(args.out) / "results.md").read_text())
    return 0 if results["methods"] else 1
