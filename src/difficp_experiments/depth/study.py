"""Matched-budget study: what does fine-tuning *through ICP* buy over fine-tuning the pose alone?

From one starting network (``nn`` of the committed checkpoint) three arms are fine-tuned with the
same steps, batch size, learning-rate schedule and the same training samples in the same order
(:class:`~difficp_experiments.depth.train.Stage` with one shared ``offset``); they differ only in
the loss:

* ``pose``: the network's own pose loss (:func:`~difficp_experiments.depth.train.nn_loss`);
* ``icp``: the body RMSE after the unrolled soft ICP of ``train_schedule`` only (pose weight 0);
* ``both``: that loss plus the pose loss (the committed ``nn_icp`` recipe).

Each arm runs once per seed (the seed changes the training samples and the torch RNG: the cloud
subsampling of the ICP loss), then every fine-tuned network and the unchanged start network are
evaluated on the same test samples, alone (``raw``) and refined by the test-time ICP of
``nn_then_icp`` (``icp``). :func:`tabulate` turns whatever has finished into ``metrics.json``
(success rates, median errors, bootstrap intervals, weight change, outcome flips vs the start,
McNemar tests of icp-vs-pose and both-vs-pose), so partial results can be reported.

Layout of ``out``: ``study.json`` (configuration and the log of invocations), ``start.json`` (the
start network's test errors), ``seed<s>/<arm>.json`` (a finished arm: errors, weight change,
history), ``seed<s>/checkpoints/<arm>.pt`` (per-epoch training checkpoints, for ``resume``),
``metrics.json`` and ``README.md`` (the tables).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difficp._atomic import atomic_write_text
from difficp_experiments.depth.data import SceneConfig
from difficp_experiments.depth.model import PoseCNN
from difficp_experiments.depth.train import (
    LossFn,
    Stage,
    StageConfig,
    copy_model,
    make_icp_loss,
    nn_loss,
    run_stage,
)
from difficp_experiments.modelnet.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    mcnemar,
    mean_ci,
    median_ci,
    rate_ci,
)

ARMS = ("pose", "icp", "both")
# Training samples of the study start here: disjoint from those of ``nn`` (from 0) and ``nn_icp``
# (from 10M) in train.STAGE_OFFSET, whatever the seed.
STUDY_OFFSET = 20_000_000
THRESHOLDS = {"3cm": 0.03, "30cm": 0.30}
KINDS = ("raw", "icp")  # the network alone; refined by the test-time ICP schedule
COMPARISONS = (("icp", "pose"), ("both", "pose"))


# ``start_network`` name of a fresh network: the study then trains from scratch
SCRATCH = "scratch"


def start_network(
    nets: dict[str, PoseCNN], scene: SceneConfig, name: str, scratch_seed: int = 0
) -> PoseCNN:
    """The study's start: ``nets[name]`` of a checkpoint, or for ``name == "scratch"`` a
    freshly initialised network of the same architecture (PyTorch's default init under
    ``scratch_seed``), the same for every arm and seed, so that the arms train from scratch."""
    if name == SCRATCH:
        torch.manual_seed(scratch_seed)
        reference = next(iter(nets.values()))
        return PoseCNN(scene.intrinsics(scene.cnn_res), reference.config).eval()
    if name not in nets:
        raise ValueError(
            f"no network {name!r}: the checkpoint holds {sorted(nets)}, or {SCRATCH!r}"
        )
    return nets[name]


def arm_loss(arm: str, scene: SceneConfig, schedule: list, pose_weight: float = 1.0) -> LossFn:
    """The training loss of ``arm``; the arms differ in nothing else."""
    if arm == "pose":
        return nn_loss
    if arm == "icp":
        return make_icp_loss(scene, schedule, pose_weight=0.0)
    if arm == "both":
        return make_icp_loss(scene, schedule, pose_weight=pose_weight)
    raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")


def weight_change(model: torch.nn.Module, start: torch.nn.Module) -> float:
    """Relative change of the parameters, ``||theta - theta0|| / ||theta0||`` (all parameters as
    one vector; buffers excluded)."""
    num = sum(
        float((p.detach().double() - q.detach().double()).square().sum())
        for p, q in zip(model.parameters(), start.parameters(), strict=True)
    )
    den = sum(float(q.detach().double().square().sum()) for q in start.parameters())
    return math.sqrt(num / den)


def outcome_flips(before: np.ndarray, after: np.ndarray) -> dict[str, int]:
    """Samples whose success changed: ``gained`` (failed before, succeeds after) and ``lost``.

    Args:
        before, after: ``(n,)`` booleans on the same samples.
    """
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    return {"gained": int(np.sum(~b & a)), "lost": int(np.sum(b & ~a))}


def train_arm(
    start: PoseCNN,
    arm: str,
    seed: int,
    config: StageConfig,
    renderer,
    scene: SceneConfig,
    out: Path,
    schedule: list,
    pose_weight: float = 1.0,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[PoseCNN, dict]:
    """Fine-tune a copy of ``start`` as ``arm`` with ``seed``; returns ``(model, history)``.

    Checkpoints go to ``out/seed<seed>/checkpoints/<arm>.pt`` (see ``run_stage``). Validation is
    the network's own pose error in every arm, so the arms' histories compare.
    """
    model = copy_model(start)
    torch.manual_seed(seed)  # the ICP loss subsamples the clouds with the torch RNG
    stage = Stage(
        arm,
        model,
        arm_loss(arm, scene, schedule, pose_weight),
        config,
        offset=STUDY_OFFSET,
        val_fn=nn_loss,
    )
    history = run_stage(
        stage, renderer, scene, out / f"seed{seed}", seed, resume=resume, progress=progress, log=log
    )
    return model, history


def _errors_json(errors: dict[str, Tensor]) -> dict[str, list[float]]:
    # Rounded to 0.1 um: far below the thresholds, and keeps the files small.
    return {k: [round(float(x), 7) for x in v] for k, v in errors.items()}


def run_study(
    start: PoseCNN,
    renderer,
    scene: SceneConfig,
    test_data: dict[str, Tensor],
    out: Path,
    config: StageConfig,
    seeds: tuple[int, ...] = (0, 1, 2),
    arms: tuple[str, ...] = ARMS,
    icp_iterations: tuple[int, int] = (3, 2),
    pose_weight: float = 1.0,
    resume: bool = False,
    progress: bool = True,
    info: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train and evaluate every (seed, arm), seed by seed; returns :func:`tabulate`'s metrics.

    A finished (seed, arm) leaves ``seed<s>/<arm>.json``; with ``resume`` it is not run again
    and an unfinished one continues from its last epoch checkpoint. The tables are rewritten
    after every arm, so an interrupted study still reports what finished. ``info`` (e.g. the
    start checkpoint and the test set) is recorded in ``study.json``.
    """
    from difficp_experiments.depth.evaluate import network_errors
    from difficp_experiments.depth.methods import train_schedule

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = train_schedule(*icp_iterations)
    meta = {
        "config": asdict(config),
        "icp_iterations": list(icp_iterations),
        "pose_weight": pose_weight,
        "offset": STUDY_OFFSET,
        "test_n": int(test_data["depth"].shape[0]),
        "scene": scene.to_dict(),
        **(info or {}),
    }
    study_file = out / "study.json"
    invocations: list[dict[str, Any]] = []
    if study_file.is_file():
        old = json.loads(study_file.read_text())
        if resume and old["meta"] != json.loads(json.dumps(meta)):
            raise ValueError(f"{study_file} was written with another configuration; cannot resume")
        invocations = old.get("invocations", []) if resume else []
    this: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
    }
    invocations.append(this)
    t_start = time.time()

    def save_study() -> None:
        this["wall_seconds"] = round(time.time() - t_start, 1)
        atomic_write_text(
            study_file, json.dumps({"meta": meta, "invocations": invocations}, indent=1)
        )

    save_study()
    start_file = out / "start.json"
    if not (resume and start_file.is_file()):
        t0 = time.time()
        errors = network_errors(start, test_data, scene, progress=progress)
        atomic_write_text(
            start_file,
            json.dumps({"errors": _errors_json(errors), "eval_seconds": time.time() - t0}),
        )
    for seed in seeds:
        for arm in arms:
            done = out / f"seed{seed}" / f"{arm}.json"
            if resume and done.is_file():
                log(f"[study] seed {seed} {arm}: already finished")
                continue
            model, history = train_arm(
                start,
                arm,
                seed,
                config,
                renderer,
                scene,
                out,
                schedule,
                pose_weight=pose_weight,
                resume=resume,
                progress=progress,
                log=log,
            )
            t0 = time.time()
            errors = network_errors(model, test_data, scene, progress=progress)
            record = {
                "seed": seed,
                "arm": arm,
                "weight_change": weight_change(model, start),
                "history": history,
                "train_seconds": history["seconds"],
                "eval_seconds": time.time() - t0,
                "errors": _errors_json(errors),
            }
            atomic_write_text(done, json.dumps(record))
            log(
                f"[study] seed {seed} {arm}: weight change {record['weight_change']:.4f}, "
                f"+ICP 3cm {(errors['icp'] < 0.03).float().mean().item():.3f}, "
                f"raw 3cm {(errors['raw'] < 0.03).float().mean().item():.3f}"
            )
            save_study()
            tabulate(out)
    this["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save_study()
    return tabulate(out)


def reevaluate(
    start: PoseCNN,
    test_data: dict[str, Tensor],
    scene: SceneConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate the start network and every finished arm again, with the code as it is now.

    Each arm's weights come from its last training checkpoint (``seed<s>/checkpoints/<arm>.pt``,
    which must be its final epoch); its record keeps its history and gets new ``errors``,
    ``weight_change`` and ``eval_seconds``. For re-scoring a finished study after a change of the
    test-time ICP without training again. Returns :func:`tabulate`'s metrics.
    """
    from difficp._atomic import load_checkpoint
    from difficp_experiments.depth.evaluate import network_errors

    out = Path(out)
    t0 = time.time()
    errors = network_errors(start, test_data, scene, progress=progress)
    atomic_write_text(
        out / "start.json",
        json.dumps({"errors": _errors_json(errors), "eval_seconds": time.time() - t0}),
    )
    for path in sorted(out.glob("seed*/*.json")):
        rec = json.loads(path.read_text())
        state = load_checkpoint(path.parent / "checkpoints" / f"{rec['arm']}.pt")
        if state["epoch"] + 1 != rec["history"]["config"]["epochs"]:
            raise ValueError(f"the checkpoint of {path} is not its final epoch")
        model = copy_model(start)
        model.load_state_dict(state["model"])
        t0 = time.time()
        errors = network_errors(model, test_data, scene, progress=progress)
        rec.update(
            errors=_errors_json(errors),
            weight_change=weight_change(model, start),
            eval_seconds=time.time() - t0,
        )
        atomic_write_text(path, json.dumps(rec))
        log(f"[study] re-evaluated seed {rec['seed']} {rec['arm']}")
    return tabulate(out)


def _arm_order(arm: str) -> int:
    return ARMS.index(arm) if arm in ARMS else len(ARMS)


def _describe(errors: np.ndarray) -> dict:
    """Success rates and median error of ``(n,)`` errors, each with its bootstrap 95% interval."""
    d: dict = {}
    for name, thr in THRESHOLDS.items():
        d[f"success_{name}"] = float(np.mean(errors < thr))
        d[f"success_{name}_ci"] = list(rate_ci(errors < thr))
    d["median_error_m"] = float(np.median(errors))
    d["median_error_m_ci"] = list(median_ci(errors))
    return d


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else None,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def load_runs(out: Path) -> tuple[dict | None, dict[tuple[int, str], dict]]:
    """``(start record or None, {(seed, arm): finished record})`` found under ``out``."""
    out = Path(out)
    start = json.loads((out / "start.json").read_text()) if (out / "start.json").is_file() else None
    runs = {}
    for path in sorted(out.glob("seed*/*.json")):
        rec = json.loads(path.read_text())
        runs[(int(rec["seed"]), rec["arm"])] = rec
    return start, runs


def summarize_study(start: dict, runs: dict[tuple[int, str], dict]) -> dict:
    """The ``metrics.json`` content from the start network's and the finished arms' errors.

    ``runs``: per seed and arm: success at 3 / 30 cm and median error (raw and +ICP) with
    bootstrap 95% intervals over the test samples, the weight change, and the samples whose 3 cm
    (and 30 cm) outcome changed vs the start network. ``arms``: per arm, the mean / std / min /
    max of those over its seeds, and a bootstrap interval over samples of the seed-mean success
    rate. ``comparisons``: for icp-vs-pose and both-vs-pose, per seed a McNemar test (``a_only``
    = the first arm succeeds where pose fails), and over the seeds both finished the difference
    in seed-mean success rate with its bootstrap interval over samples.
    """
    err0 = {k: np.asarray(v) for k, v in start["errors"].items()}
    rows, success = _run_rows(err0, runs)
    table: dict = {"start": {k: _describe(err0[k]) for k in KINDS}, "runs": rows}
    table["arms"] = {arm: _arm_summary(rows, arm, success) for arm in ARMS if _has_arm(rows, arm)}
    table["comparisons"] = _comparisons(runs, success)
    table["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95}
    table["n"] = int(err0["raw"].size)
    return table


# per (seed, arm, kind, threshold): the (N,) boolean success of every test sample
_Success = dict[tuple[int, str, str, str], np.ndarray]


def _run_rows(
    err0: dict[str, np.ndarray], runs: dict[tuple[int, str], dict]
) -> tuple[list[dict], _Success]:
    """One row per finished (seed, arm), in seed then arm order, and the per-sample successes."""
    rows: list[dict] = []
    success: _Success = {}
    for (seed, arm), rec in sorted(runs.items(), key=lambda kv: (kv[0][0], _arm_order(kv[0][1]))):
        err = {k: np.asarray(v) for k, v in rec["errors"].items()}
        row: dict = {
            "seed": seed,
            "arm": arm,
            "weight_change": rec["weight_change"],
            "train_seconds": rec["train_seconds"],
            "eval_seconds": rec["eval_seconds"],
            "steps": sum(1 for _ in rec["history"]["epochs"]) * rec["history"]["config"]["steps"],
        }
        for k in KINDS:
            row[k] = _describe(err[k])
            row[k]["flips"] = {}
            for name, thr in THRESHOLDS.items():
                row[k]["flips"][name] = outcome_flips(err0[k] < thr, err[k] < thr)
                success[(seed, arm, k, name)] = err[k] < thr
        rows.append(row)
    return rows, success


def _has_arm(rows: list[dict], arm: str) -> bool:
    return any(r["arm"] == arm for r in rows)


def _arm_summary(all_rows: list[dict], arm: str, success: _Success) -> dict:
    """Mean / std / min / max over the arm's seeds, and the seed-mean success's interval."""
    rows = [r for r in all_rows if r["arm"] == arm]
    agg: dict = {"seeds": [r["seed"] for r in rows]}
    agg["weight_change"] = _spread([r["weight_change"] for r in rows])
    for k in KINDS:
        agg[k] = {"median_error_m": _spread([r[k]["median_error_m"] for r in rows])}
        for name in THRESHOLDS:
            key = f"success_{name}"
            per_sample = np.mean([success[(r["seed"], arm, k, name)] for r in rows], axis=0)
            agg[k][key] = {**_spread([r[k][key] for r in rows]), "ci": list(mean_ci(per_sample))}
            agg[k][f"flips_{name}"] = {
                d: _spread([r[k]["flips"][name][d] for r in rows]) for d in ("gained", "lost")
            }
    return agg


def _comparisons(runs: dict[tuple[int, str], dict], success: _Success) -> list[dict]:
    """For each of :data:`COMPARISONS` over the seeds both arms finished: the seed-mean success
    difference with its bootstrap interval over samples, and a McNemar test per seed."""
    comparisons = []
    for a, b in COMPARISONS:
        seeds = sorted(s for s, arm in runs if arm == a and (s, b) in runs)
        for k in KINDS:
            for name in THRESHOLDS:
                if not seeds:
                    continue
                diff = np.mean(
                    [
                        success[(s, a, k, name)].astype(float)
                        - success[(s, b, k, name)].astype(float)
                        for s in seeds
                    ],
                    axis=0,
                )
                comparisons.append(
                    {
                        "a": a,
                        "b": b,
                        "kind": k,
                        "threshold": name,
                        "seeds": seeds,
                        "success_difference": float(diff.mean()),
                        "success_difference_ci": list(mean_ci(diff)),
                        "mcnemar": {
                            str(s): mcnemar(success[(s, a, k, name)], success[(s, b, k, name)])
                            for s in seeds
                        },
                    }
                )
    return comparisons


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci: list[float], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    return "[" + fmt.format(scale * ci[0]) + ", " + fmt.format(scale * ci[1]) + "]"


def markdown_tables(metrics: dict) -> str:
    """The results tables of ``README.md`` from :func:`summarize_study`'s metrics."""
    lines = [
        "Per run (success in %, bootstrap 95% interval over the test samples; median error in "
        "cm raw, mm +ICP; flips = test samples whose 3 cm outcome changed vs the start network, "
        "gained/lost):",
        "",
        "| arm | seed | raw 3 cm | raw 30 cm | raw median (cm) | +ICP 3 cm | +ICP 30 cm "
        "| +ICP median (mm) | ‖θ−θ₀‖/‖θ₀‖ | flips raw | flips +ICP | train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def outcome(run: dict) -> str:
        """The cells raw 3 cm ... +ICP median (mm) of the start or of a run."""
        cells = []
        for kind, scale, digits in (("raw", 100, 1), ("icp", 1000, 2)):
            d = run[kind]
            cells += [
                f"{_pct(d['success_3cm'])} {_ci(d['success_3cm_ci'])}",
                _pct(d["success_30cm"]),
                f"{scale * d['median_error_m']:.{digits}f}",
            ]
        return " | ".join(cells)

    # study.json names the start "<checkpoint>:<network>[ (seed s)]"
    start_name = str(metrics.get("study", {}).get("meta", {}).get("start", ":nn"))
    start_name = start_name.rsplit(":", 1)[-1]
    lines.append(f"| start (`{start_name}`) | – | {outcome(metrics['start'])} | 0 | – | – | – |")
    for r in metrics["runs"]:
        fr, fi = r["raw"]["flips"]["3cm"], r["icp"]["flips"]["3cm"]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {outcome(r)} | {r['weight_change']:.4f} "
            f"| +{fr['gained']}/−{fr['lost']} | +{fi['gained']}/−{fi['lost']} "
            f"| {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "Per arm over its seeds (mean ± sd over seeds; the interval is a bootstrap over test "
        "samples of the seed-mean success):",
        "",
        "| arm | seeds | raw 3 cm | raw 30 cm | +ICP 3 cm | +ICP 30 cm | +ICP median (mm) "
        "| ‖θ−θ₀‖/‖θ₀‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pm(d: dict, scale: float = 100.0, digits: int = 1) -> str:
        sd = "" if d["std"] is None else f" ± {scale * d['std']:.{digits}f}"
        return f"{scale * d['mean']:.{digits}f}{sd}"

    for arm, a in metrics["arms"].items():
        row = [arm, ",".join(map(str, a["seeds"]))]
        for k in KINDS:
            for name in THRESHOLDS:
                d = a[k][f"success_{name}"]
                row.append(f"{pm(d)} {_ci(d['ci'])}")
        row.append(pm(a["icp"]["median_error_m"], 1000, 2))
        row.append(pm(a["weight_change"], 1, 4))
        lines.append("| " + " | ".join(row) + " |")
    if metrics["comparisons"]:
        lines += [
            "",
            "Paired comparisons on the same test samples (difference in success, percentage "
            "points, seed-mean with its bootstrap interval; McNemar per seed: samples only A / "
            "only B succeeds, p):",
            "",
            "| A vs B | evaluated | threshold | A − B (pp) | McNemar per seed |",
            "|---|---|---|---|---|",
        ]
        for c in metrics["comparisons"]:
            tests = "; ".join(
                f"s{s}: {t['a_only']}/{t['b_only']}, p={t['p_value']:.2g}"
                for s, t in c["mcnemar"].items()
            )
            kind = "+ICP" if c["kind"] == "icp" else "raw"
            lines.append(
                f"| {c['a']} vs {c['b']} | {kind} | {c['threshold']} | "
                f"{100 * c['success_difference']:+.1f} {_ci(c['success_difference_ci'])} "
                f"| {tests} |"
            )
    return "\n".join(lines) + "\n"


def tabulate(out: Path) -> dict:
    """Summarise whatever has finished under ``out`` into ``metrics.json`` and the tables file
    ``tables.md``; returns the metrics (``{}`` before the start network was evaluated)."""
    out = Path(out)
    start, runs = load_runs(out)
    if start is None:
        return {}
    metrics = summarize_study(start, runs)
    study = out / "study.json"
    if study.is_file():
        metrics["study"] = json.loads(study.read_text())
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    atomic_write_text(out / "tables.md", markdown_tables(metrics))
    return metrics
