"""``difficp warmup``: compile the ICP fast path ahead, so that no later call waits for it.

The fast path (:mod:`difficp.fused`) is compiled by numba on first use and cached on disk (beside
the package, or in a user cache directory where that is not writable; ``NUMBA_CACHE_DIR`` sets
it): 1-3 minutes once per installation. Until it is, ``difficp.icp`` starts this command in the
background and runs its PyTorch path. Running it by hand (after installing, in a Docker build)
does the work ahead; a second run returns in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from difficp.cli import add_command
from difficp.compile_cache import compile_lock

DESCRIPTION = (
    "Compile the compiled (numba) ICP fast path for small and large problems, so that "
    "no later difficp.icp call waits for it. Takes 1-3 minutes once; cached on disk."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``warmup`` sub-command on ``subparsers`` (from ``add_subparsers``)."""
    p = add_command(subparsers, "warmup", DESCRIPTION, run)
    _add_options(p)
    return p


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument(
        "--background",
        action="store_true",
        help="exit at once if another process is already compiling (what difficp.icp starts)",
    )


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel of the fast path; the seconds taken."""
    os.environ["DIFFICP_COMPILE"] = "now"
    # here: `difficp warmup --help` and the background compile's start load no PyTorch / numba
    import torch

    import difficp
    from difficp import fused
    from difficp.colors import intensity_gradients
    from difficp.correspondence import NeighborIndex

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    # one small pair (difficp.express: one compiled call), a small batch (the whole loop on the
    # calling thread) and a larger problem (the whole loop on the pool, which compiles the
    # parallel kernels of the lock-step iterations with it)
    for shape in ((100, 3), (2, 100, 3), (2 * fused.SERIAL_POINTS, 3)):
        source = torch.rand(shape, generator=generator, dtype=torch.float64)
        target = source + 0.01
        difficp.icp(source, target, max_distance=0.1, max_iterations=2, search_backend="compiled")
    # one large cloud's tree, built on the thread pool (difficp.kdtree.build_forest)
    from difficp import kdtree

    kdtree.build_forest(
        torch.rand(1, kdtree.PARALLEL_BUILD_POINTS, 3, generator=generator).double().numpy(),
        np.array([kdtree.PARALLEL_BUILD_POINTS]),
    )
    # normals on the KD-forest (difficp.estimate_normals on the CPU)
    difficp.estimate_normals(torch.rand(200, 3, generator=generator, dtype=torch.float64), k=8)
    # and Generalized-ICP's covariances (difficp.estimate_covariances, metric="gicp")
    difficp.estimate_covariances(torch.rand(200, 3, generator=generator, dtype=torch.float64), k=8)
    # and colored ICP's intensity gradients (difficp.colors.intensity_gradients, metric="colored")
    cloud = torch.rand(1, 200, 3, generator=generator, dtype=torch.float64)
    normals = torch.nn.functional.normalize(torch.rand(1, 200, 3, generator=generator), dim=-1)
    intensity_gradients(cloud, normals.double(), cloud[..., 0], k=8)
    # a depth-map target (projective correspondences): its own kernel
    depth = torch.full((32, 32), 2.0, dtype=torch.float64)
    intrinsics = torch.tensor([[30.0, 0, 16], [0, 30.0, 16], [0, 0, 1]], dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    plane = torch.stack([(u - 16) / 30 * 2, (v - 16) / 30 * 2, depth], -1).reshape(-1, 3)
    difficp.icp(
        plane.double() + 0.01,
        depth,
        intrinsics=intrinsics,
        correspondence="projective",
        max_distance=0.1,
        max_iterations=2,
        search_backend="compiled",
    )
    # the k-nearest search of the differentiable path (difficp.kdtree.knearest) and the plain
    # nearest search of one-off questions (difficp.evaluate_registration: kdtree.nearest)
    index = NeighborIndex(torch.rand(1, 50, 3, generator=generator), backend="compiled")
    queries = torch.rand(1, 5, 3, generator=generator)
    index.query(queries, 2)
    index.query(queries, 1, repeated=False)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    # one compile per installation at a time; a second `difficp warmup` waits, then finds the
    # cache and returns in seconds
    with compile_lock(wait=not args.background) as held:
        if not held:
            return 0
        seconds = warm_up()
    if not args.quiet:
        print(f"difficp: the ICP fast path is compiled ({seconds:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m difficp.commands.warmup``: what :func:`difficp.fused.compile_now` starts."""
    parser = argparse.ArgumentParser(prog="difficp warmup")
    _add_options(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
