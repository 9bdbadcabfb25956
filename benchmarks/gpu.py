"""The GPU benchmark: the CUDA tests, the gradient path at 32 x 1024, 256 x 1024 and 8 x 100k
points against the naive dense soft ICP and PyPose, a batched no-gradient case and the tiled
brute-force neighbour search at 100k x 100k, each with its peak GPU memory.

Everything runs the device-agnostic PyTorch path (the compiled KD forest is CPU-only):
neighbours by the tiled brute force (:func:`difficp.correspondence.blocked_knn`), whose memory
stays bounded. The peers' dense ``(B, N, M)`` distances do not fit at 100k points: their rows
then say "out of memory". A time budget (``--budget-s``, default 420 s of the 8 minutes the
issue allows) skips what would start after it, saying so; the 100k problem runs last and once
(no warm-up round), so that only it can be cut short.

Without CUDA it says so and exits 0 (nothing to measure); ``--dry-run`` runs every part on the
CPU at toy sizes instead, to check the script itself (the test suite does).

    DIFFICP_DATA=../shared/data python benchmarks/gpu.py [--repeats 3] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradients

import difficp
from difficp.correspondence import blocked_knn
from difficp.geometry import random_rotation

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """What one run measures: gradient-path problems ``(batch, points)``, the batched
    no-gradient case and the big search."""

    problems: tuple[tuple[int, int], ...]
    no_grad_batch: int
    search_points: int


FULL = Sizes(problems=((32, 1024), (256, 1024), (8, 100_000)), no_grad_batch=256,
             search_points=100_000)  # fmt: skip
DRY = Sizes(problems=((2, 1024), (2, 1500)), no_grad_batch=4, search_points=2000)


class Clock:
    """Seconds since the start, against the budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def surface_batch(
    batch: int, points: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, points, 3)`` clouds on a bumpy unit sphere and their targets (rotated <= 15 deg,
    moved <= 5 cm): ModelNet's clouds have 1024 points, so the large problems are synthetic."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, points, 3, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    bumps = 1 + 0.1 * torch.sin(5 * u[..., 0]) * torch.cos(4 * u[..., 1])
    source = u * bumps[..., None]
    R = random_rotation(batch, max_angle_deg=15, generator=g)
    t = (torch.rand(batch, 3, generator=g) - 0.5) * 0.1
    target = source @ R.transpose(1, 2) + t[:, None]
    return source.to(device), target.to(device)


def problem(batch: int, points: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if points == 1024:
        return gradients.modelnet_batch(batch, device)
    return surface_batch(batch, points, device)


def peak_mib(device: str) -> float:
    if not device.startswith("cuda"):
        return math.nan
    return torch.cuda.max_memory_allocated(device) / 2**20


def mib(peak: float) -> str:
    return "-" if math.isnan(peak) else f"{peak:.0f}"


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(
    runs: dict[str, Callable[[], None]],
    repeats: int,
    device: str,
    clock: Clock,
    warm_up: bool = True,
) -> dict[str, tuple[float | str, float]]:
    """Median seconds (or why there is none) and peak memory (MiB; NaN on the CPU) of each
    case: a warm-up round (unless ``warm_up`` is False), then ``repeats`` rounds, the cases
    interleaved. A case that runs out of memory is dropped; once the budget is spent no run
    starts (a case keeps the rounds it had)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks = dict.fromkeys(runs, math.nan)
    why_not: dict[str, str] = {}
    first = 0 if warm_up else 1
    for round_ in range(first, repeats + 1):
        for name, run in runs.items():
            if name in why_not:
                continue
            if clock.left() <= 0:
                why_not[name] = "skipped: time budget spent"
                continue
            reset_peak(device)
            gradients.sync(device)
            t0 = time.perf_counter()
            try:
                run()
                gradients.sync(device)
            except torch.OutOfMemoryError:
                why_not[name] = "out of memory"
                continue
            if round_:
                times[name].append(time.perf_counter() - t0)
            peak = peak_mib(device)
            peaks[name] = peak if math.isnan(peaks[name]) else max(peaks[name], peak)
    return {
        name: (statistics.median(times[name]), peaks[name])
        if times[name]
        else (why_not.get(name, "skipped: time budget spent"), math.nan)
        for name in runs
    }


NO_GRAD = "difficp, no gradient"


def gradient_table(label: str, measured: dict[str, tuple[float | str, float]]) -> str:
    """The gradient-path rows: time, against difficp's no-gradient run of the same problem,
    peak memory."""
    base = measured[NO_GRAD][0]
    lines = [f"**{label}**", "", "| case | ms | / difficp no-gradient | peak MiB |",
             "|---|---|---|---|"]  # fmt: skip
    for name, (value, peak) in measured.items():
        if isinstance(value, str):
            lines.append(f"| {name} | {value} | | |")
            continue
        ratio = f"{value / base:.2f}" if isinstance(base, float) else ""
        lines.append(f"| {name} | {1e3 * value:.0f} | {ratio} | {mib(peak)} |")
    return "\n".join(lines)


DENSE_PEERS = ("naive dense soft ICP (PyTorch)", "PyPose ICP (pypose.module.ICP)")


def gradient_cases(batch: int, points: int, device: str) -> dict[str, Callable[[], None]]:
    """benchmarks/gradients.py's cases on this problem (its compiled no-gradient run takes the
    PyTorch path off the CPU: the same call). Large problems put the dense peers first (they
    run out of memory at once) and the soft cases last, so that a spent budget skips those."""
    source, target = problem(batch, points, device)
    runs = gradients.cases(source, target)
    runs[NO_GRAD] = runs.pop("difficp, no gradient (compiled)")
    first = [NO_GRAD, "difficp nearest, unroll"]
    if points > 1024:
        first = [name for name in DENSE_PEERS if name in runs] + first
    return {**{name: runs.pop(name) for name in first}, **runs}


def gradient_section(
    batch: int, points: int, device: str, repeats: int, clock: Clock, warm_up: bool
) -> str:
    runs = gradient_cases(batch, points, device)
    measured = measure(runs, repeats, device, clock, warm_up)
    iterations = gradients.ITERATIONS
    return gradient_table(f"{batch} x {points} points, {iterations} iterations, "
                          "forward + backward", measured) + "\n"  # fmt: skip


def batch_no_grad(batch: int, device: str, repeats: int, clock: Clock) -> str:
    source, target = gradients.modelnet_batch(batch, device)

    def run() -> None:
        difficp.icp(source, target, max_distance=gradients.MAX_DISTANCE, max_iterations=30,
                    relative_fitness=0.0, relative_rmse=0.0, differentiation="none")  # fmt: skip

    value, peak = measure({"batch": run}, repeats, device, clock)["batch"]
    shown = value if isinstance(value, str) else f"{1e3 * value:.0f}"
    return f"| batch of {batch} x 1024, 30 iterations, no gradient | {shown} | {mib(peak)} |"


def big_search(points: int, device: str, clock: Clock, k: int = 16) -> str:
    """k nearest neighbours of ``points`` queries among ``points`` references."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, points, 3, generator=g).to(device)
    queries = torch.rand(1, points, 3, generator=g).to(device)
    mask = torch.ones(1, points, dtype=torch.bool, device=device)

    def run() -> None:
        blocked_knn(queries, ref, mask, k)

    value, peak = measure({"search": run}, 1, device, clock)["search"]
    shown = value if isinstance(value, str) else f"{1e3 * value:.0f}"
    return f"| blocked k-NN, k={k}, {points} x {points} | {shown} | {mib(peak)} |"


def cuda_tests() -> str:
    """Run the tests marked ``cuda``; returns pytest's summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               str(ROOT / "tests")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip().splitlines()[-1]
    # 5: none collected (no test carries the marker any more)
    return ("FAILED: " if done.returncode not in (0, 5) else "") + summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument(
        "--dry-run", action="store_true", help="every part on the CPU at toy sizes (no GPU)"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        device, sizes, repeats = "cpu", DRY, 1
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
              "skipped (--dry-run checks the script on the CPU)")  # fmt: skip
        return 0
    else:
        device, sizes, repeats = args.device, FULL, args.repeats
    clock = Clock(args.budget_s)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}, difficp {difficp.__version__}")
    print(f"CUDA tests: {cuda_tests()}\n")
    # the large problem last, without a warm-up round: what the budget may cut short
    small = [size for size in sizes.problems if size[1] <= 1024]
    large = [size for size in sizes.problems if size[1] > 1024]
    for batch, points in small:
        print(gradient_section(batch, points, device, repeats, clock, warm_up=True))
    print("| case | ms | peak MiB |\n|---|---|---|")
    print(batch_no_grad(sizes.no_grad_batch, device, repeats, clock))
    print(big_search(sizes.search_points, device, clock))
    print()
    for batch, points in large:
        print(gradient_section(batch, points, device, 1, clock, warm_up=False))
    print(f"total {time.perf_counter() - clock.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
