"""The figure: success rate against initial distance, per method and threshold."""

from __future__ import annotations

from pathlib import Path

COLOURS = {
    "nn": "tab:blue",
    "icp": "tab:orange",
    "icp_point_to_plane": "tab:gray",
    "nn_icp": "tab:green",
    "nn_then_icp": "tab:red",
}
LABELS = {
    "nn": "nn",
    "icp": "icp (refinement schedule from identity)",
    "icp_point_to_plane": "icp point-to-plane (weaker)",
    "nn_icp": "nn_icp (end to end)",
    "nn_then_icp": "nn_then_icp (ICP at test only)",
}


def plot_metrics(metrics: dict, path: Path, title: str | None = None) -> None:
    """Plot ``metrics`` (the ``metrics.json`` dict) to ``path`` (PNG).

    Colour = method; solid = success at 3 cm, dashed = success at 30 cm; x = centre of the
    initial-distance bin (the last, open-ended bin is drawn at lo + 0.05); empty bins skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=120)
    for name, m in metrics["methods"].items():
        for thr, style in (("3cm", "-"), ("30cm", "--")):
            xs, ys = [], []
            for b in m["bins"]:
                if b["n"] == 0 or b[f"success_{thr}"] is None:
                    continue
                hi = b["hi"] if b["hi"] is not None else b["lo"] + 0.1
                xs.append((b["lo"] + hi) / 2)
                ys.append(b[f"success_{thr}"])
            ax.plot(
                xs,
                ys,
                style,
                color=COLOURS.get(name),
                marker="o",
                markersize=3,
                label=f"{LABELS.get(name, name)} @ {thr}",
            )
    ax.set_xlabel("initial distance: body RMSE under the true motion (m)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Depth-map registration of a body, n = {metrics.get('n', '?')}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_study(metrics: dict, path: Path) -> None:
    """Plot the matched-budget study (:func:`~difficp_experiments.depth.study.tabulate`'s
    metrics) to ``path`` (PNG): success at 3 cm, network alone (left) and + test-time ICP
    (right); one point per seed with its bootstrap 95% interval over the test samples, the start
    network as a horizontal line with its interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(metrics["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=120)
    titles = ("network alone", "+ test-time ICP")
    for ax, kind, title in zip(axes, ("raw", "icp"), titles, strict=True):
        start = metrics["start"][kind]
        lo, hi = start["success_3cm_ci"]
        ax.axhspan(100 * lo, 100 * hi, color="0.85", label="start network (95% CI)")
        ax.axhline(100 * start["success_3cm"], color="0.4", lw=1)
        for x, arm in enumerate(arms):
            rows = [r for r in metrics["runs"] if r["arm"] == arm]
            for j, r in enumerate(rows):
                d = r[kind]
                y = 100 * d["success_3cm"]
                err = [[y - 100 * d["success_3cm_ci"][0]], [100 * d["success_3cm_ci"][1] - y]]
                ax.errorbar(
                    x + 0.12 * (j - (len(rows) - 1) / 2),
                    y,
                    yerr=err,
                    fmt="o",
                    color=f"C{x}",
                    ms=4,
                    capsize=2,
                )
        ax.set_xticks(range(len(arms)), arms)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("success at 3 cm (%)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Matched-budget fine-tuning from nn, n = {metrics.get('n', '?')} test samples, "
        "one point per seed",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
