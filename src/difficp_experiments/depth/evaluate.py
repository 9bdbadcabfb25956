"""Evaluation of the four methods: errors, success rates, success-vs-initial-distance bins."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from difficp_experiments.depth.data import SceneConfig, rmse_between
from difficp_experiments.depth.methods import (
    icp_baseline_config,
    make_clouds,
    refine_schedule,
    run_icp,
    run_schedule,
)
from difficp_experiments.depth.model import PoseCNN

# ``icp``: the test-time refinement schedule run from the identity (the strongest ICP without a
# network); ``icp_point_to_plane``: the weaker point-to-plane ICP from the identity (better of the
# projective and nearest variants), kept for comparison with the original experiment.
METHODS = ("nn", "icp", "icp_point_to_plane", "nn_icp", "nn_then_icp")
THRESHOLDS = {"3cm": 0.03, "30cm": 0.30}
# Initial-distance bins (m): 10 cm wide up to 1.2 m, then everything beyond. The sampler
# reaches about 1.45 m.
BIN_EDGES = [round(0.1 * i, 1) for i in range(13)] + [math.inf]
ICP_VARIANTS = ("projective", "nearest")


@torch.no_grad()
def method_errors(
    nets: dict[str, PoseCNN],
    data: dict[str, Tensor],
    scene: SceneConfig,
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, Tensor]:
    """``(N,)`` final errors (body RMSE, m) per method (and per ICP variant) on ``data``.

    ``data`` is a collated batch of :class:`~difficp_experiments.depth.data.DepthPairs` items.
    Keys: ``nn``, ``nn_icp``, ``nn_then_icp``, ``icp_projective``, ``icp_nearest`` (point-to-plane
    ICP from the identity) and ``icp_schedule`` (the refinement schedule from the identity).
    """
    n = data["depth"].shape[0]
    out: dict[str, list[Tensor]] = {}
    refine = refine_schedule()
    for i in tqdm(range(0, n, chunk), desc="evaluate", disable=not progress, leave=False):
        b = {k: v[i : i + chunk] for k, v in data.items()}
        clouds = make_clouds(b["icp_depth"], scene)
        est = {"nn": nets["nn"](b["depth"])}
        est["nn_then_icp"] = run_schedule(clouds, b["icp_depth"], scene, refine, est["nn"])
        est["nn_icp"] = run_schedule(
            clouds, b["icp_depth"], scene, refine, nets["nn_icp"](b["depth"])
        )
        for corr in ICP_VARIANTS:
            est[f"icp_{corr}"] = run_icp(clouds, b["icp_depth"], scene, icp_baseline_config(corr))
        # The test-time refinement schedule alone, from the identity (the ``icp`` row): it
        # separates what the network contributes from what the better ICP schedule contributes.
        est["icp_schedule"] = run_schedule(clouds, b["icp_depth"], scene, refine)
        for k, T in est.items():
            out.setdefault(k, []).append(rmse_between(b["body"], T, b["transform"]))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def network_errors(
    net: PoseCNN,
    data: dict[str, Tensor],
    scene: SceneConfig,
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, Tensor]:
    """``(N,)`` errors (body RMSE, m) of one network on ``data``: ``raw`` (the network alone) and
    ``icp`` (its estimate refined by :func:`refine_schedule`, the ``nn_then_icp`` method)."""
    net = net.eval()
    refine = refine_schedule()
    out: dict[str, list[Tensor]] = {"raw": [], "icp": []}
    n = data["depth"].shape[0]
    for i in tqdm(range(0, n, chunk), desc="evaluate", disable=not progress, leave=False):
        b = {k: v[i : i + chunk] for k, v in data.items()}
        T = net(b["depth"])
        refined = run_schedule(make_clouds(b["icp_depth"], scene), b["icp_depth"], scene, refine, T)
        out["raw"].append(rmse_between(b["body"], T, b["transform"]))
        out["icp"].append(rmse_between(b["body"], refined, b["transform"]))
    return {k: torch.cat(v) for k, v in out.items()}


def success_bins(errors: np.ndarray, init: np.ndarray) -> list[dict]:
    """Per initial-distance bin: edges, count and success rates (None for an empty bin)."""
    rows = []
    for lo, hi in itertools.pairwise(BIN_EDGES):
        sel = (init >= lo) & (init < hi)
        row: dict = {"lo": lo, "hi": None if math.isinf(hi) else hi, "n": int(sel.sum())}
        for name, thr in THRESHOLDS.items():
            row[f"success_{name}"] = float((errors[sel] < thr).mean()) if sel.any() else None
        rows.append(row)
    return rows


def summarize(errors: dict[str, Tensor], init_rmse: Tensor) -> dict:
    """The ``metrics.json`` content.

    ``methods`` holds exactly :data:`METHODS`, each with ``success_3cm``, ``success_30cm``
    (fractions), ``bins``, plus ``median_error_m``. ``icp`` is the test-time refinement schedule
    run from the identity (``variant`` "schedule"); ``icp_point_to_plane`` is the better (by 3 cm
    success, then 30 cm) of the projective and nearest point-to-plane variants from the identity,
    whose own numbers are under ``icp_variants``.
    """
    init = init_rmse.numpy()

    def stats(err: Tensor) -> dict:
        e = err.numpy()
        d: dict[str, Any] = {f"success_{k}": float((e < t).mean()) for k, t in THRESHOLDS.items()}
        d["median_error_m"] = float(np.median(e))
        d["bins"] = success_bins(e, init)
        return d

    variants = {corr: stats(errors[f"icp_{corr}"]) for corr in ICP_VARIANTS}
    best = max(
        ICP_VARIANTS, key=lambda c: (variants[c]["success_3cm"], variants[c]["success_30cm"])
    )
    methods = {
        "nn": stats(errors["nn"]),
        "icp": dict(stats(errors["icp_schedule"]), variant="schedule"),
        "icp_point_to_plane": dict(variants[best], variant=best),
        "nn_icp": stats(errors["nn_icp"]),
        "nn_then_icp": stats(errors["nn_then_icp"]),
    }
    return {
        "methods": methods,
        "icp_variants": variants,
        "n": len(init),
        "initial_distance_median_m": float(np.median(init)),
    }
