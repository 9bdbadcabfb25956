"""Speed of the gradient path: ICP forward + backward on a batch, against peers.

Problem: 32 ModelNet10 pairs of 1024 points (target = source rotated up to 15 deg and moved up
to 5 cm), float32, exactly 10 ICP iterations (early stopping off), loss = sum of the transforms,
``backward()`` to the source points. Cases, interleaved in one process, median of --repeats:

* difficp without gradients (the compiled path; the yardstick of the ratios);
* difficp soft top-16 without gradients (the same problem as the soft cases: the second
  yardstick, "/ own no-gradient");
* difficp hard nearest, unrolled; soft top-16 (``soft_k=16``), unrolled and implicit;
* PyPose's ICP (``pypose.module.ICP``: dense k-NN by ``cdist``, SVD), the same 10 iterations;
* a naive dense soft ICP in plain PyTorch (``cdist`` + softmax over all targets + weighted
  SVD Procrustes), written below in 20 lines, the same temperature and iterations.

    flock /work/heavy.lock env DIFFICP_DATA=../shared/data python benchmarks/gradients.py
    ... --threads 1 --repeats 7 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import difficp
from difficp.datadir import require_data_dir
from difficp.geometry import make_transform, random_rotation

ITERATIONS = 10
TEMPERATURE = 1e-3
MAX_DISTANCE = 0.2


def modelnet_batch(batch: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1024, 3)`` source and target clouds (unit radius, rotated <= 15 deg)."""
    import h5py

    path = require_data_dir() / "modelnet10" / "modelnet10_poisson1024_test.h5"
    with h5py.File(path, "r") as f:
        pts = torch.from_numpy(np.asarray(f["data"][:batch], dtype=np.float32))
    pts = pts - pts.mean(1, keepdim=True)
    pts = pts / pts.norm(dim=-1).amax(1)[:, None, None]
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(batch, max_angle_deg=15, generator=g)
    t = (torch.rand(batch, 3, generator=g) - 0.5) * 0.1
    tgt = pts @ R.transpose(1, 2) + t[:, None]
    return pts.to(device), tgt.to(device)


def naive_soft_icp(source: torch.Tensor, target: torch.Tensor, iterations: int) -> torch.Tensor:
    """Dense soft ICP, the obvious way: ``(B, 4, 4)`` transforms, differentiable."""
    B = source.shape[0]
    R = torch.eye(3, dtype=source.dtype, device=source.device).expand(B, 3, 3)
    t = torch.zeros(B, 3, dtype=source.dtype, device=source.device)
    for _ in range(iterations):
        moved = source @ R.transpose(1, 2) + t[:, None]
        w = torch.softmax(-(torch.cdist(moved, target) ** 2) / TEMPERATURE, dim=-1)
        partner = w @ target
        mu_s, mu_t = source.mean(1, keepdim=True), partner.mean(1, keepdim=True)
        H = (source - mu_s).transpose(1, 2) @ (partner - mu_t)
        U, _, Vh = torch.linalg.svd(H)
        d = torch.sign(torch.linalg.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))
        D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        R = Vh.transpose(1, 2) @ D @ U.transpose(1, 2)
        t = (mu_t - mu_s @ R.transpose(1, 2))[:, 0]
    return make_transform(R, t)


def cases(source: torch.Tensor, target: torch.Tensor) -> dict[str, Callable[[], None]]:
    common = dict(max_iterations=ITERATIONS, relative_fitness=0.0, relative_rmse=0.0)
    hard = dict(common, max_distance=MAX_DISTANCE)
    soft = dict(common, correspondence="soft", soft_k=16, temperature=TEMPERATURE)

    def backward_of(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def case() -> None:
            s = source.clone().requires_grad_(True)
            run(s).sum().backward()
            assert s.grad is not None and bool(torch.isfinite(s.grad).all())

        return case

    def no_grad() -> None:
        difficp.icp(source, target, differentiation="none", **hard)

    def soft_no_grad() -> None:
        difficp.icp(source, target, differentiation="none", **soft)

    out = {
        "difficp, no gradient (compiled)": no_grad,
        SOFT_NO_GRAD: soft_no_grad,
        "difficp nearest, unroll": backward_of(lambda s: difficp.icp(s, target, **hard).transform),
        "difficp soft top-16, unroll": backward_of(
            lambda s: difficp.icp(s, target, **soft).transform
        ),
        "difficp soft top-16, implicit": backward_of(
            lambda s: difficp.icp(s, target, differentiation="implicit", **soft).transform
        ),
        "naive dense soft ICP (PyTorch)": backward_of(
            lambda s: naive_soft_icp(s, target, ITERATIONS)
        ),
    }
    try:
        import pypose as pp

        def pypose_icp(s: torch.Tensor) -> torch.Tensor:
            stepper = pp.utils.ReduceToBason(steps=ITERATIONS, patience=ITERATIONS + 1, tol=0.0)
            return pp.module.ICP(stepper=stepper)(s, target).matrix()

        out["PyPose ICP (pypose.module.ICP)"] = backward_of(pypose_icp)
    except ImportError:
        print("pypose is not installed: its row is skipped")
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(runs: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each case, the cases interleaved in every round (one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


SOFT_NO_GRAD = "difficp soft top-16, no gradient"


def table(medians: dict[str, float], threads: int, device: str) -> str:
    base = medians["difficp, no gradient (compiled)"]
    # Each difficp case against the no-gradient run of the same problem.
    own = {
        "difficp nearest, unroll": base,
        "difficp soft top-16, unroll": medians[SOFT_NO_GRAD],
        "difficp soft top-16, implicit": medians[SOFT_NO_GRAD],
    }
    pairs = {
        "PyPose ICP (pypose.module.ICP)": "difficp nearest, unroll",
        "naive dense soft ICP (PyTorch)": "difficp soft top-16, unroll",
    }
    lines = [
        f"threads {threads}, {device}",
        "| case | ms | / no-gradient difficp | / own no-gradient | peer / difficp |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in medians.items():
        ahead = f"{seconds / medians[pairs[name]]:.1f}x" if name in pairs else ""
        mine = f"{seconds / own[name]:.2f}" if name in own else ""
        lines.append(f"| {name} | {1e3 * seconds:.0f} | {seconds / base:.2f} | {mine} | {ahead} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    source, target = modelnet_batch(args.batch, args.device)
    for threads in args.threads:
        torch.set_num_threads(threads)
        medians = measure(cases(source, target), args.repeats, args.device)
        print(table(medians, threads, args.device), flush=True)


if __name__ == "__main__":
    main()
