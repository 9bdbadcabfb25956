"""The ModelNet registration benchmark: every method on the same deterministic pairs.

Methods (comma-separated names):
    ``icp``          difficp point-to-point ICP (nearest neighbours, SVD) from the identity;
    ``open3d_icp``   Open3D point-to-point ICP from the identity, same stopping rule;
    ``open3d_fgr``   FPFH + Fast Global Registration (Open3D);
    ``pointnetlk``   PointNetLK with the shared ModelNet40 weights;
    ``dcp_v1``       DCP-v1 with the official ModelNet40 weights;
    ``dcp_v2``       DCP-v2 trained here (``difficp train dcp``);
    ``dcp_v2_e2e``   DCP-v2 fine-tuned end to end through difficp's soft ICP;
    ``X+icp``        method X's estimate refined by difficp ICP (nearest, SVD) at test time.

Each method's per-pair estimates and timings are cached in ``OUT/raw/<method>.npz``; a later run
with other methods adds to the cache, and ``results.json`` / ``results.md`` always tabulate every
cached method (``--force`` recomputes). ``X+icp`` reuses X's cached estimate and adds its time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import difficp
from difficp.learning.metrics import all_metrics
from difficp.learning.modelnet import NUM_CLASSES, ModelNetPairs, load_modelnet

BASE_METHODS = ("icp", "open3d_icp", "open3d_fgr", "pointnetlk", "dcp_v1", "dcp_v2", "dcp_v2_e2e")
LEARNED = ("pointnetlk", "dcp_v1", "dcp_v2", "dcp_v2_e2e")
DEFAULT_METHODS = (
    "icp,open3d_icp,open3d_fgr,pointnetlk,pointnetlk+icp,dcp_v1,dcp_v1+icp,"
    "dcp_v2,dcp_v2+icp,dcp_v2_e2e,dcp_v2_e2e+icp"
)
SIX = ("MSE_R", "RMSE_R", "MAE_R", "MSE_t", "RMSE_t", "MAE_t")


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    ``refine_*`` set the test-time difficp refinement of ``X+icp``; ``icp_*`` the ``icp`` and
    ``open3d_icp`` baselines (``icp_max_distance=None``: no rejection, plain ICP).
    """

    data_dir: Path
    dataset: str = "modelnet10"
    protocol: str = "clean"
    methods: tuple[str, ...] = tuple(DEFAULT_METHODS.split(","))
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    dcp_v2: Path | None = None
    dcp_v2_e2e: Path | None = None
    icp_max_iterations: int = 50
    icp_max_distance: float | None = None
    refine_max_distance: float | None = 0.1
    refine_max_iterations: int = 50
    threads: int | None = None
    force: bool = False
    extra: dict = field(default_factory=dict)


def parse_methods(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate ``"a,b+icp,..."`` into a tuple of names."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    for name in names:
        base = name.removesuffix("+icp")
        if base not in BASE_METHODS:
            raise ValueError(
                f"unknown method {name!r}; base methods are {BASE_METHODS}, "
                "each optionally followed by '+icp'"
            )
    return tuple(names)


def test_pairs(cfg: BenchmarkConfig) -> ModelNetPairs:
    """The test pairs of ``cfg`` (the ``unseen`` protocol keeps the second half of the classes)."""
    points, labels = load_modelnet(cfg.data_dir, cfg.dataset, "test")
    return ModelNetPairs(
        points,
        labels,
        cfg.protocol,
        split="test",
        seed=cfg.seed,
        num_classes=NUM_CLASSES[cfg.dataset],
    )


def batches(pairs: ModelNetPairs, n: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Stacked batches of the first ``n`` pairs: ``source (B,N,3)``, ``target (B,M,3)``, ..."""
    for start in range(0, n, size):
        items = [pairs[i] for i in range(start, min(n, start + size))]
        yield {
            k: torch.stack([it[k] for it in items])
            for k in ("source", "target", "rotation", "translation")
        }


def _to_transform(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.tile(np.eye(4), (len(R), 1, 1))
    T[:, :3, :3], T[:, :3, 3] = R, t
    return T


def icp_config(max_distance: float | None, max_iterations: int) -> difficp.ICPConfig:
    """Point-to-point, nearest-neighbour, SVD ICP without autograd (test time)."""
    return difficp.ICPConfig(
        metric="point_to_point",
        solver="svd",
        correspondence="nearest",
        max_distance=max_distance,
        max_iterations=max_iterations,
        differentiation="none",
    )


class MethodRunner:
    """Loads each model once and estimates ``(R, t)`` for a batch of pairs."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self._models: dict[str, torch.nn.Module] = {}

    def _weights(self, *parts: str) -> Path:
        path = Path(self.cfg.data_dir, "weights", *parts)
        if not path.is_file():
            raise FileNotFoundError(f"missing weights {path}")
        return path

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            from difficp.learning.dcp import load_dcp_checkpoint, load_dcp_v1
            from difficp.learning.pointnetlk import load_pointnetlk

            if name == "dcp_v1":
                self._models[name] = load_dcp_v1(self._weights("dcp_v1.t7"))
            elif name == "pointnetlk":
                self._models[name] = load_pointnetlk(
                    self._weights("pointnetlk", "pointnetlk_modelnet40.t7")
                )
            else:
                path = getattr(self.cfg, name)
                if path is None or not Path(path).is_file():
                    raise FileNotFoundError(
                        f"{name} needs a checkpoint (--{name.replace('_', '-')} PATH); "
                        f"train one with `difficp train dcp`; got {path}"
                    )
                self._models[name] = load_dcp_checkpoint(path)
        return self._models[name]

    def estimate(self, name: str, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """``(R (B,3,3), t (B,3))`` of base method ``name`` on ``batch``."""
        src, tgt = batch["source"], batch["target"]
        if name == "icp":
            cfg = icp_config(self.cfg.icp_max_distance, self.cfg.icp_max_iterations)
            T = difficp.icp(src, tgt, config=cfg).transform.double().numpy()
            return T[:, :3, :3], T[:, :3, 3]
        if name in ("open3d_icp", "open3d_fgr"):
            from difficp.learning.classical import open3d_fgr, open3d_icp

            if name == "open3d_icp":
                dist = 2.0 if self.cfg.icp_max_distance is None else self.cfg.icp_max_distance
                fn: Callable = lambda s, t: open3d_icp(  # noqa: E731
                    s, t, max_distance=dist, max_iterations=self.cfg.icp_max_iterations
                )
            else:
                fn = open3d_fgr
            T = np.stack([fn(s.numpy(), t.numpy()) for s, t in zip(src, tgt, strict=True)])
            return T[:, :3, :3], T[:, :3, 3]
        with torch.no_grad():
            R, t = self.model(name)(src, tgt)
        return R.double().numpy(), t.double().numpy()

    def refine(
        self, batch: dict[str, torch.Tensor], R: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """difficp ICP from ``(R, t)`` on ``batch``."""
        cfg = icp_config(self.cfg.refine_max_distance, self.cfg.refine_max_iterations)
        init = torch.from_numpy(_to_transform(R, t)).to(batch["source"].dtype)
        T = difficp.icp(batch["source"], batch["target"], init=init, config=cfg).transform
        T = T.double().numpy()
        return T[:, :3, :3], T[:, :3, 3]


def _cache_path(out: Path, method: str) -> Path:
    return out / "raw" / f"{method.replace('+', '_plus_')}.npz"


def run_method(
    cfg: BenchmarkConfig, runner: MethodRunner, pairs: ModelNetPairs, n: int, method: str, out: Path
) -> dict[str, np.ndarray]:
    """Estimates of ``method`` on the first ``n`` pairs, from the cache or computed (and cached)."""
    path = _cache_path(out, method)
    if path.is_file() and not cfg.force:
        cached = dict(np.load(path))
        if len(cached["R"]) >= n:
            return {k: v[:n] for k, v in cached.items()}
    base = method.removesuffix("+icp")
    prior = run_method(cfg, runner, pairs, n, base, out) if method.endswith("+icp") else None
    Rs, ts, secs = [], [], []
    start = 0
    for batch in tqdm(
        batches(pairs, n, cfg.batch_size),
        total=-(-n // cfg.batch_size),
        desc=f"{cfg.protocol}:{method}",
        unit="batch",
    ):
        b = len(batch["source"])
        tic = time.perf_counter()
        if prior is None:
            R, t = runner.estimate(method, batch)
        else:
            R, t = runner.refine(
                batch, prior["R"][start : start + b], prior["t"][start : start + b]
            )
        per_pair = (time.perf_counter() - tic) / b
        if prior is not None:  # X+icp costs X's time plus the refinement's
            per_pair = per_pair + prior["seconds"][start : start + b]
        Rs.append(R)
        ts.append(t)
        secs.append(np.broadcast_to(per_pair, (b,)).astype(np.float64))
        start += b
    result = {"R": np.concatenate(Rs), "t": np.concatenate(ts), "seconds": np.concatenate(secs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)
    return result


def ground_truth(pairs: ModelNetPairs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``R (n,3,3)``, ``t (n,3)`` of the first ``n`` pairs."""
    R, t = zip(*[(p.rotation, p.translation) for p in map(pairs.pair, range(n))], strict=True)
    return np.stack(R).astype(np.float64), np.stack(t).astype(np.float64)


def run_benchmark(cfg: BenchmarkConfig, out: Path) -> dict:
    """Run ``cfg.methods``, write ``out/results.json`` and ``out/results.md``, return the dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = test_pairs(cfg)
    n = len(pairs) if cfg.limit is None else min(cfg.limit, len(pairs))
    runner = MethodRunner(cfg)
    for method in cfg.methods:
        run_method(cfg, runner, pairs, n, method, out)
    R_gt, t_gt = ground_truth(pairs, n)
    results: dict = {
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "pairs": n,
        "seed": cfg.seed,
        "methods": {},
    }
    cached = sorted((out / "raw").glob("*.npz"))
    order = {m: i for i, m in enumerate(DEFAULT_METHODS.split(","))}
    names = sorted(
        (p.stem.replace("_plus_", "+") for p in cached), key=lambda m: (order.get(m, len(order)), m)
    )
    for name in names:
        est = dict(np.load(_cache_path(out, name)))
        if len(est["R"]) < n:
            continue  # cached on fewer pairs than this run: not comparable, leave it out
        metrics = all_metrics(est["R"][:n], est["t"][:n], R_gt, t_gt)
        metrics["seconds_per_pair"] = float(est["seconds"][:n].mean())
        results["methods"][name] = metrics
    results["settings"] = {
        "icp_max_iterations": cfg.icp_max_iterations,
        "icp_max_distance": cfg.icp_max_distance,
        "refine_max_distance": cfg.refine_max_distance,
        "refine_max_iterations": cfg.refine_max_iterations,
        **cfg.extra,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    """The results as a markdown table (DCP's six, isotropic errors, success, time)."""
    head = (
        f"ModelNet registration: dataset `{results['dataset']}`, protocol "
        f"`{results['protocol']}`, {results['pairs']} test pairs.\n\n"
    )
    cols = [
        "method",
        "MSE(R)",
        "RMSE(R)",
        "MAE(R)",
        "MSE(t)",
        "RMSE(t)",
        "MAE(t)",
        "rot err (deg)",
        "trans err",
        "success",
        "ms/pair",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in results["methods"].items():
        row = [
            f"`{name}`",
            f"{m['MSE_R']:.4g}",
            f"{m['RMSE_R']:.4g}",
            f"{m['MAE_R']:.4g}",
            f"{m['MSE_t']:.3g}",
            f"{m['RMSE_t']:.4g}",
            f"{m['MAE_t']:.4g}",
            f"{m['rot_err_deg_mean']:.3g}",
            f"{m['trans_err_mean']:.3g}",
            f"{100 * m['success_rate']:.1f}%",
            f"{1000 * m['seconds_per_pair']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    foot = (
        "\nRotation errors in degrees (Euler zyx for MSE/RMSE/MAE, geodesic for 'rot err'), "
        "translations in unit-sphere units; success = rot err < 1 deg and trans err < 0.01; "
        "time per pair on one CPU thread.\n"
    )
    return head + "\n".join(lines) + "\n" + foot
