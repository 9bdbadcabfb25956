"""The gradient-path cases of benchmarks/gradients.py, a batched no-gradient case and the
tiled brute-force neighbour search at 100k x 100k, on a CUDA device.

Without CUDA it says so and exits 0 (nothing to measure). Everything runs the device-agnostic
PyTorch path (the compiled KD forest is CPU-only): neighbours by the tiled brute force
(:func:`difficp.correspondence.blocked_knn`), whose memory stays bounded.

    DIFFICP_DATA=../shared/data python benchmarks/gpu.py [--repeats 5] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradients

import difficp
from difficp.correspondence import blocked_knn


def batch_no_grad(device: str, batch: int = 256) -> None:
    """A batch of 256 ModelNet pairs, 30 iterations, no gradient."""
    source, target = gradients.modelnet_batch(batch, device)
    run = lambda: difficp.icp(  # noqa: E731
        source,
        target,
        max_distance=gradients.MAX_DISTANCE,
        max_iterations=30,
        relative_fitness=0.0,
        relative_rmse=0.0,
        differentiation="none",
    )
    seconds = gradients.measure({"batch": run}, 3, device)["batch"]
    print(f"| batch of {batch} x 1024, 30 iterations, no gradient | {1e3 * seconds:.0f} |")


def big_search(device: str, points: int = 100_000, k: int = 16) -> None:
    """k nearest neighbours of 100k queries in 100k points: time and peak memory."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, points, 3, generator=g).to(device)
    queries = torch.rand(1, points, 3, generator=g).to(device)
    mask = torch.ones(1, points, dtype=torch.bool, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    gradients.sync(device)
    t0 = time.perf_counter()
    blocked_knn(queries, ref, mask, k)
    gradients.sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    print(
        f"| blocked k-NN, k={k}, {points} x {points} | {1e3 * seconds:.0f} | peak +{peak:.0f} MiB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); skipped"
        )
        return
    device = args.device
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    source, target = gradients.modelnet_batch(32, device)
    runs = gradients.cases(source, target)
    # The compiled no-gradient path is CPU-only: on the device the yardstick is the PyTorch path.
    medians = gradients.measure(runs, args.repeats, device)
    print(gradients.table(medians, torch.get_num_threads(), device))
    print("| case | ms | |\n|---|---|---|")
    batch_no_grad(device)
    big_search(device)


if __name__ == "__main__":
    main()
