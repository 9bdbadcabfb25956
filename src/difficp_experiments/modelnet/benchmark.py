"""The ModelNet registration benchmark: every method on the same deterministic pairs.

Methods (comma-separated names):
    ``icp``          difficp point-to-point ICP (nearest neighbours, SVD) from the identity;
    ``open3d_icp``   Open3D point-to-point ICP from the identity, same stopping rule;
    ``open3d_fgr``   FPFH + Fast Global Registration (Open3D);
    ``pointnetlk``   PointNetLK with the shared ModelNet40 weights;
    ``dcp_v1``       DCP-v1 with the official ModelNet40 weights;
    ``dcp_v2``       DCP-v2 trained here (``difficp train dcp``);
    ``dcp_v2_e2e``   DCP-v2 fine-tuned end to end through difficp's soft ICP;
    ``X+icp``        method X's estimate refined by difficp ICP (nearest, SVD) at test time;
    ``true_rotA``    calibration: the true pose with its rotation turned by exactly ``A`` degrees
                     about a random axis (per pair, seeded), so ``true_rotA+icp`` shows ICP's basin.

Each method's per-pair estimates and timings are cached in ``OUT/raw/<method>/<key>/``, keyed by
everything that changes them (dataset, protocol, seed, method options, weights, code version:
:func:`method_key`), in atomically written files of :data:`CACHE_CHUNK` pairs, so an interrupted
run resumes where it stopped and a file cut short is recomputed. A later run with other methods
adds to the cache, and ``results.json`` / ``results.md`` tabulate every method cached under the
current settings (``--force`` recomputes). ``X+icp`` reuses X's cached estimate and adds its time.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import difficp
from difficp._atomic import AtomicFiles, atomic_open, atomic_write_text
from difficp_experiments.modelnet.data import NUM_CLASSES, ModelNetPairs, load_modelnet
from difficp_experiments.modelnet.metrics import (
    SUCCESS_ROT_DEG,
    SUCCESS_TRANS,
    all_metrics,
    isotropic_errors,
)
from difficp_experiments.modelnet.stats import method_statistics, paired_tests

BASE_METHODS = ("icp", "open3d_icp", "open3d_fgr", "pointnetlk", "dcp_v1", "dcp_v2", "dcp_v2_e2e")
DEFAULT_METHODS = (
    "icp,open3d_icp,open3d_fgr,pointnetlk,pointnetlk+icp,dcp_v1,dcp_v1+icp,"
    "dcp_v2,dcp_v2+icp,dcp_v2_e2e,dcp_v2_e2e+icp"
)
# Calibration rows: ``true_rot10`` is the true pose turned by 10 degrees (see perturbed_truth).
CALIBRATION = re.compile(r"true_rot(\d+(?:\.\d+)?)")
CALIBRATION_METHODS = ",".join(f"true_rot{a},true_rot{a}+icp" for a in (5, 10, 20, 30))


def calibration_angle(name: str) -> float | None:
    """The perturbation in degrees of calibration method ``name`` (``true_rot10`` -> 10.0)."""
    match = CALIBRATION.fullmatch(name.removesuffix("+icp"))
    return float(match.group(1)) if match else None


def perturbed_truth(
    R_gt: np.ndarray, t_gt: np.ndarray, index: np.ndarray, angle_deg: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The true pose with its rotation turned by exactly ``angle_deg`` about a random axis.

    ``R = dR @ R_gt``, ``t = t_gt``: the aligned source is rotated about the target frame's
    origin (the shapes are centred, so roughly about the target's centre); the geodesic rotation
    error is ``angle_deg`` and the translation error 0. The axis of pair ``i`` comes from
    ``default_rng([seed, 7, i, round(1000 * angle_deg)])``, the same for every method and run.

    Args:
        R_gt: ``(B, 3, 3)``; t_gt: ``(B, 3)``; index: ``(B,)`` pair indices.
    Returns:
        ``R (B, 3, 3)``, ``t (B, 3)`` float64.
    """
    from scipy.spatial.transform import Rotation

    axes = []
    for i in np.asarray(index).tolist():
        rng = np.random.default_rng([seed, 7, int(i), round(1000 * angle_deg)])
        v = rng.standard_normal(3)
        axes.append(v / np.linalg.norm(v))
    dR = Rotation.from_rotvec(np.radians(angle_deg) * np.stack(axes)).as_matrix()
    return dR @ np.asarray(R_gt, np.float64), np.asarray(t_gt, np.float64).copy()


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    ``refine_*`` set the test-time difficp refinement of ``X+icp``; ``icp_*`` the ``icp`` and
    ``open3d_icp`` baselines (``icp_max_distance=None``: no rejection, plain ICP).
    ``max_minutes``: start no new chunk after this long (0: only tabulate what is cached); the
    table then covers, per method, the pairs cached so far.
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
    max_minutes: float | None = None
    extra: dict = field(default_factory=dict)


def parse_methods(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate ``"a,b+icp,..."`` into a tuple of names."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    for name in names:
        base = name.removesuffix("+icp")
        if base not in BASE_METHODS and calibration_angle(base) is None:
            raise ValueError(
                f"unknown method {name!r}; base methods are {BASE_METHODS} and the "
                "calibration rows true_rotA (A in degrees), each optionally followed by '+icp'"
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


def batches(
    pairs: ModelNetPairs, n: int, size: int, first: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Stacked batches of pairs ``first .. n-1``: ``source (B,N,3)``, ``target (B,M,3)``,
    ``rotation (B,3,3)``, ``translation (B,3)``, ``index (B,)``."""
    for start in range(first, n, size):
        stop = min(n, start + size)
        items = [pairs[i] for i in range(start, stop)]
        batch = {
            k: torch.stack([it[k] for it in items])
            for k in ("source", "target", "rotation", "translation")
        }
        batch["index"] = torch.arange(start, stop)
        yield batch


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
            from difficp_experiments.modelnet.dcp import load_dcp_checkpoint, load_dcp_v1
            from difficp_experiments.modelnet.pointnetlk import load_pointnetlk

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
        angle = calibration_angle(name)
        if angle is not None:  # calibration: reads the ground truth on purpose
            return perturbed_truth(
                batch["rotation"].double().numpy(),
                batch["translation"].double().numpy(),
                batch["index"].numpy(),
                angle,
                self.cfg.seed,
            )
        if name == "icp":
            cfg = icp_config(self.cfg.icp_max_distance, self.cfg.icp_max_iterations)
            T = difficp.icp(src, tgt, config=cfg).transform.double().numpy()
            return T[:, :3, :3], T[:, :3, 3]
        if name in ("open3d_icp", "open3d_fgr"):
            from difficp_experiments.modelnet.classical import open3d_fgr, open3d_icp

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
        result = difficp.icp(batch["source"], batch["target"], init=init, config=cfg)
        T = result.transform.double().numpy()
        return T[:, :3, :3], T[:, :3, 3]


# Pairs per cache file: a run that stops (or a file that is lost) costs at most this many pairs.
CACHE_CHUNK = 32
# Bump when the cache layout or the meaning of a cached number changes.
CACHE_FORMAT = 2


def _file_digest(path: Path | None) -> str | None:
    """sha256 of a weights file (None when there is none: the method then fails to run)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def method_key(cfg: BenchmarkConfig, method: str, test_shapes: int) -> dict:
    """Everything that changes ``method``'s estimates: the cache is keyed by it.

    Dataset, protocol, seed and size of the test set (the pairs), the method and its options
    (ICP settings, the digest of learned weights), ``X+icp``'s refinement settings on top of X's
    key, and the code version. The number of pairs (``--limit``) is not in the key: pair ``i``
    does not depend on it, and the cache holds pairs by index.
    """
    base = method.removesuffix("+icp")
    key: dict = {
        "format": CACHE_FORMAT,
        "difficp": difficp.__version__,
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "test_shapes": test_shapes,
        "method": base,
    }
    if base == "icp":
        key["icp_max_distance"] = cfg.icp_max_distance
        key["icp_max_iterations"] = cfg.icp_max_iterations
    elif base == "open3d_icp":
        key["icp_max_distance"] = 2.0 if cfg.icp_max_distance is None else cfg.icp_max_distance
        key["icp_max_iterations"] = cfg.icp_max_iterations
    elif base == "dcp_v1":
        key["weights"] = _file_digest(Path(cfg.data_dir, "weights", "dcp_v1.t7"))
    elif base == "pointnetlk":
        key["weights"] = _file_digest(
            Path(cfg.data_dir, "weights", "pointnetlk", "pointnetlk_modelnet40.t7")
        )
    elif base in ("dcp_v2", "dcp_v2_e2e"):
        key["weights"] = _file_digest(getattr(cfg, base))
    elif calibration_angle(base) is not None:
        key["calibration"] = {"angle_deg": calibration_angle(base), "version": 1}
    if method.endswith("+icp"):
        key = {
            "base": key,
            "refine_max_distance": cfg.refine_max_distance,
            "refine_max_iterations": cfg.refine_max_iterations,
        }
    return key


def _cache_dir(out: Path, method: str, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out / "raw" / method.replace("+", "_plus_") / digest


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + CACHE_CHUNK, n)) for a in range(0, n, CACHE_CHUNK)]


def _read_chunk(path: Path, key: dict, start: int, stop: int) -> dict[str, np.ndarray] | None:
    """The cached estimates of pairs ``[start, stop)``, or None when the file is missing, cut
    short, corrupt, made under another key, or holds fewer pairs."""
    if not path.is_file():
        return None
    try:
        # our own file handle: np.load leaks the one it opens when the archive is corrupt
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as z:
            blob = {k: z[k] for k in z.files}  # reading every member checks its CRC
        ok = (
            json.loads(str(blob["key"])) == json.loads(json.dumps(key))
            and int(blob["start"]) == start
            and len(blob["R"]) == len(blob["t"]) == len(blob["seconds"]) >= stop - start
        )
    except Exception as err:  # truncated / corrupt file: recompute it
        warnings.warn(f"benchmark cache {path} is unreadable ({err}); recomputing it", stacklevel=2)
        return None
    if not ok:
        return None
    return {k: blob[k][: stop - start] for k in ("R", "t", "seconds")}


def _write_chunk(path: Path, key: dict, start: int, result: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.parent / "key.json").is_file():  # for people reading the folder
        atomic_write_text(path.parent / "key.json", json.dumps(key, indent=1, sort_keys=True))
    with atomic_open(path) as f:
        arrays: dict[str, Any] = {
            "key": np.array(json.dumps(key)),
            "start": np.array(start),
            **result,
        }
        np.savez(f, **arrays)


def cached_estimates(out: Path, method: str, key: dict, n: int) -> dict[str, np.ndarray] | None:
    """``method``'s cached estimates of the longest run of complete chunks from pair 0 (at most
    ``n`` pairs) under ``key``, or None when pair 0's chunk is missing."""
    folder = _cache_dir(out, method, key)
    parts = []
    for a, b in _chunks(n):
        part = _read_chunk(folder / f"{a:06d}.npz", key, a, b)
        if part is None:
            break
        parts.append(part)
    if not parts:
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in ("R", "t", "seconds")}


@dataclass(frozen=True)
class _Run:
    """What every chunk of a benchmark run reads: options, methods, pairs, output folder."""

    cfg: BenchmarkConfig
    runner: MethodRunner
    pairs: ModelNetPairs
    out: Path


def _estimate_chunk(
    run: _Run, method: str, start: int, stop: int, prior: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """Estimates of pairs ``[start, stop)``; ``prior``: the base method's (for ``X+icp``)."""
    runner = run.runner
    Rs, ts, secs = [], [], []
    at = 0
    for batch in batches(run.pairs, stop, run.cfg.batch_size, start):
        b = len(batch["source"])
        tic = time.perf_counter()
        if prior is None:
            R, t = runner.estimate(method, batch)
        else:
            R, t = runner.refine(batch, prior["R"][at : at + b], prior["t"][at : at + b])
        per_pair: float | np.ndarray = (time.perf_counter() - tic) / b
        if prior is not None:  # X+icp costs X's time plus the refinement's
            per_pair = per_pair + prior["seconds"][at : at + b]
        Rs.append(R)
        ts.append(t)
        secs.append(np.broadcast_to(per_pair, (b,)).astype(np.float64))
        at += b
    return {"R": np.concatenate(Rs), "t": np.concatenate(ts), "seconds": np.concatenate(secs)}


def _method_chunk(run: _Run, method: str, start: int, stop: int) -> dict[str, np.ndarray]:
    """``method``'s estimates of pairs ``[start, stop)`` (one chunk), cached or computed."""
    key = method_key(run.cfg, method, len(run.pairs))
    path = _cache_dir(run.out, method, key) / f"{start:06d}.npz"
    part = None if run.cfg.force else _read_chunk(path, key, start, stop)
    if part is None:
        prior = None
        if method.endswith("+icp"):
            prior = _method_chunk(run, method.removesuffix("+icp"), start, stop)
        part = _estimate_chunk(run, method, start, stop, prior)
        _write_chunk(path, key, start, part)
    return part


def run_methods(
    cfg: BenchmarkConfig,
    runner: MethodRunner,
    pairs: ModelNetPairs,
    n: int,
    methods: tuple[str, ...],
    out: Path,
) -> None:
    """Estimates of ``methods`` on the first ``n`` pairs, from the cache or computed (and cached).

    Chunk by chunk, every method in turn, so that a run stopped early (``cfg.max_minutes``, or
    killed) leaves all methods on the same pairs (paired comparisons need them). The cache
    (``out/raw/<method>/<key digest>/<first pair>.npz``) is keyed by :func:`method_key` and
    holds :data:`CACHE_CHUNK` pairs per file, each written atomically, so an interrupted run
    resumes at the first missing chunk and a file cut short is recomputed.
    """
    start_time = time.monotonic()
    chunks = _chunks(n)
    run = _Run(cfg, runner, pairs, out)
    for a, b in tqdm(chunks, desc=cfg.protocol, unit="chunk", disable=len(chunks) < 2):
        if cfg.max_minutes is not None and time.monotonic() - start_time >= 60 * cfg.max_minutes:
            break
        for method in methods:
            _method_chunk(run, method, a, b)


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
    run_methods(cfg, runner, pairs, n, cfg.methods, out)
    R_gt, t_gt = ground_truth(pairs, n)
    results: dict = {
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "pairs": n,
        "seed": cfg.seed,
        "methods": {},
    }
    # This run's methods, and those of earlier runs into the same folder whose estimates are
    # cached under this run's key (same pairs, options and code) for all n pairs.
    # A table may cover fewer than n pairs per method (a run stopped early): each row says how
    # many, and always the first ones.
    order = {m: i for i, m in enumerate(DEFAULT_METHODS.split(","))}
    found = {p.name.replace("_plus_", "+") for p in (out / "raw").glob("*") if p.is_dir()}
    known = {
        m
        for m in found
        if m.removesuffix("+icp") in BASE_METHODS or calibration_angle(m) is not None
    }

    def rank(m: str) -> tuple:
        angle = calibration_angle(m)
        return (order.get(m, len(order)), angle or 0.0, m.endswith("+icp"), m)

    names = sorted(set(cfg.methods) | known, key=rank)
    success: dict[str, np.ndarray] = {}
    results["statistics"] = {}  # per method: bootstrap intervals (kept apart from the metrics)
    for name in names:
        est = cached_estimates(out, name, method_key(cfg, name, len(pairs)), n)
        if est is None:
            continue  # not run under this key (other seed, protocol, options, ...)
        m = len(est["R"])
        metrics = all_metrics(est["R"], est["t"], R_gt[:m], t_gt[:m])
        metrics["pairs"] = m
        metrics["seconds_per_pair"] = float(est["seconds"].mean())
        results["methods"][name] = metrics
        rot, trans = isotropic_errors(est["R"], est["t"], R_gt[:m], t_gt[:m])
        success[name] = (rot < SUCCESS_ROT_DEG) & (trans < SUCCESS_TRANS)
        results["statistics"][name] = method_statistics(rot, trans, success[name])
    results["paired_tests"] = paired_tests(success)
    results["settings"] = {
        "icp_max_iterations": cfg.icp_max_iterations,
        "icp_max_distance": cfg.icp_max_distance,
        "refine_max_distance": cfg.refine_max_distance,
        "refine_max_iterations": cfg.refine_max_iterations,
        **cfg.extra,
    }
    with AtomicFiles() as files:
        files.open(out / "results.json").write((json.dumps(results, indent=2) + "\n").encode())
        files.open(out / "results.md").write(results_markdown(results).encode())
    return results


def results_markdown(results: dict) -> str:
    """The results as a markdown table (DCP's six, isotropic errors, success, time)."""
    counts = {m["pairs"] for m in results["methods"].values() if "pairs" in m}
    n = results["pairs"]
    if counts <= {n}:
        cover = f"{n} test pairs"
    elif len(counts) == 1:
        cover = f"the first {counts.pop()} of {n} test pairs (a run stopped early)"
    else:
        cover = (
            f"the first {n} test pairs requested, fewer cached for some methods (column "
            "`pairs`: each row's metrics are on its first `pairs` pairs)"
        )
    head = (
        f"ModelNet registration: dataset `{results['dataset']}`, protocol "
        f"`{results['protocol']}`, {cover}.\n\n"
    )
    cols = [
        "method",
        "pairs",
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
            str(m.get("pairs", results["pairs"])),
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
    return head + "\n".join(lines) + "\n" + foot + statistics_markdown(results)


def _ci(m: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if key not in m:
        return "n/a"
    lo, hi = (scale * v for v in m[key])
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def statistics_markdown(results: dict) -> str:
    """Medians and success with bootstrap 95% intervals, and the paired McNemar tests."""
    cis = results.get("statistics", {})
    if not cis:
        return ""
    boot = next(iter(cis.values()))["bootstrap"]
    lines = [
        "",
        f"Medians and success rate with percentile-bootstrap 95% intervals ({boot['resamples']} "
        f"resamples of the pairs, seed {boot['seed']}):",
        "",
        "| method | pairs | median rot err (deg) [95% CI] | median trans err [95% CI] "
        "| success [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        c = cis.get(name, {})
        lines.append(
            f"| `{name}` | {m.get('pairs', results['pairs'])} "
            f"| {m['rot_err_deg_median']:.3g} {_ci(c, 'rot_err_deg_median_ci', '.3g')} "
            f"| {m['trans_err_median']:.3g} {_ci(c, 'trans_err_median_ci', '.3g')} "
            f"| {100 * m['success_rate']:.1f}% {_ci(c, 'success_rate_ci', '.1f', 100.0)} |"
        )
    tests = results.get("paired_tests", [])
    if tests:
        lines += [
            "",
            "Paired McNemar tests on success (same pairs; `A only`: pairs where A succeeds and "
            "B fails; exact two-sided binomial test below 25 discordant pairs, else chi-square "
            "with continuity correction):",
            "",
            "| A | B | pairs | success A | success B | A only | B only | test | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in tests:
            n = t["pairs"]
            sa, sb = t["both"] + t["a_only"], t["both"] + t["b_only"]
            lines.append(
                f"| `{t['a']}` | `{t['b']}` | {n} | {100 * sa / n:.1f}% | {100 * sb / n:.1f}% "
                f"| {t['a_only']} | {t['b_only']} | {t['test']} | {t['p_value']:.2g} |"
            )
    return "\n".join(lines) + "\n"
