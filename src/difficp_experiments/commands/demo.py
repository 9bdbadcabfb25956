"""``difficp demo [rigid|nonrigid]``: the command line of the built-in demos (no data needed).

The demos themselves are :mod:`difficp_experiments.demos.rigid` (two partial scans of a
procedural terrain) and :mod:`difficp_experiments.demos.nonrigid` (a bent limb); this module
only parses the options, so that ``difficp demo --help`` answers without importing PyTorch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from difficp.cli import add_command
from difficp_experiments.commands import require

# Both demos draw their figure with matplotlib: fail here, before parsing, with the extra to
# install, rather than after the registration has run.
require("matplotlib")

DESCRIPTION = (
    "Run a built-in registration demo on procedural data and write a picture and "
    "metrics to --out. 'rigid' (default): two partial noisy scans of a procedural "
    "terrain with a known pose (20 degrees, 10% of the size), registered by ICP; "
    "writes DIR/demo.png and DIR/metrics.json. 'nonrigid': a deformed limb "
    "registered by non-rigid ICP (difficp.nonrigid)."
)

KINDS = ("rigid", "nonrigid")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``demo`` sub-command on ``subparsers`` (from ``add_subparsers``)."""
    p = add_command(subparsers, "demo", DESCRIPTION, run)
    p.add_argument(
        "kind", nargs="?", choices=KINDS, default="rigid", help="which demo (default: %(default)s)"
    )
    p.add_argument("--out", default=None, help="output directory (default: difficp_demo/<kind>)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the scene and the pose (default: %(default)s)",
    )
    p.add_argument(
        "--metric",
        choices=("point_to_point", "point_to_plane", "symmetric"),
        default="point_to_plane",
        help="ICP error metric of the rigid demo (default: %(default)s)",
    )
    p.add_argument(
        "--points",
        type=int,
        default=20000,
        help="terrain samples per scan before cropping to its footprint (default: %(default)s)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``difficp demo``; returns the exit code."""
    if args.out is None:
        # Each demo gets its own folder: both write a metrics.json.
        args.out = f"difficp_demo/{args.kind}"
    if args.kind == "nonrigid":
        try:
            from difficp_experiments.demos.nonrigid import run_demo
        except ModuleNotFoundError as err:
            if err.name is None or not err.name.startswith("difficp_experiments.demos"):
                raise
            print(
                "difficp demo: error: the non-rigid demo (difficp_experiments.demos.nonrigid) is "
                "not part of this installation; run 'difficp demo rigid' instead",
                file=sys.stderr,
            )
            return 2
        return int(run_demo(args) or 0)
    if args.points < 500:
        print(f"difficp demo: error: --points must be >= 500, got {args.points}", file=sys.stderr)
        return 2
    from difficp_experiments.demos.rigid import run_rigid_demo

    run_rigid_demo(args.out, seed=args.seed, metric=args.metric, n_points=args.points)
    return 0
