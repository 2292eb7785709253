"""Plots: the research progress chart (upstream's style) and training loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def summary(rows: list[dict]) -> dict:
    """Counts and the best result of a run's results.tsv rows.

    `recheck` rows (the best trained again, for a fair comparison) are counted apart: they are
    not experiments.
    """
    rechecks = sum(r["status"] == "recheck" for r in rows)
    rows = [r for r in rows if r["status"] != "recheck"]
    kept = [r for r in rows if r["status"] == "keep"]
    ok = [r for r in rows if r["status"] != "crash"]
    best = min((r["val_bpb"] for r in kept), default=None)
    first = kept[0]["val_bpb"] if kept else None
    return {"experiments": len(rows), "kept": len(kept), "crashed": len(rows) - len(ok),
            "keep_rate": len(kept) / len(rows) if rows else 0.0, "baseline": first, "best": best,
            "improvement": (first - best) if kept else 0.0, "rechecks": rechecks}


def progress_chart(rows: list[dict], ax=None, label: str | None = None, color: str = "#2ca02c",
                   annotate: bool = True):
    """Discarded experiments as grey dots, kept ones as green dots, the running best as a step line,
    re-checks of the best (trained again for a fair comparison) as orange rings.

    Crashes are left out (their val_bpb is 0). Pass `ax` and `label` to draw two runs on one chart.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5))
    xs = [i for i, r in enumerate(rows) if r["status"] != "crash"]
    disc = [(i, rows[i]["val_bpb"]) for i in xs if rows[i]["status"] == "discard"]
    kept = [(i, rows[i]["val_bpb"]) for i in xs if rows[i]["status"] == "keep"]
    rechecked = [(i, rows[i]["val_bpb"]) for i in xs if rows[i]["status"] == "recheck"]
    if disc:
        ax.scatter(*zip(*disc), c="#bbbbbb", s=18, alpha=0.8, zorder=2,
                   label=None if label else "discarded")
    if rechecked:
        ax.scatter(*zip(*rechecked), facecolors="none", edgecolors="#d9822b", s=40, zorder=3,
                   label=None if label else "best, trained again")
    if kept:
        ax.scatter(*zip(*kept), c=color, s=50, edgecolors="black", linewidths=0.5, zorder=4,
                   label=f"{label} (kept)" if label else "kept")
        steps_x, steps_y, best = [], [], float("inf")
        for i, v in kept:
            best = min(best, v)
            steps_x.append(i)
            steps_y.append(best)
        steps_x.append(max(xs))
        steps_y.append(best)
        ax.step(steps_x, steps_y, where="post", color=color, lw=2, alpha=0.7, zorder=3,
                label=f"{label}: running best" if label else "running best")
        if annotate:
            for i, v in kept[1:]:
                ax.annotate(str(rows[i]["description"])[:40], (i, v), fontsize=7, rotation=20,
                            xytext=(4, 4), textcoords="offset points", color="#333333")
    s = summary(rows)
    ax.set_xlabel("experiment #")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(f"Autoresearch progress: {s['experiments']} experiments, "
                 f"{max(0, s['kept'] - 1)} kept improvements")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return ax


def save_progress_chart(rows: list[dict], path: str | Path) -> Path:
    """Draw the progress chart and write it to a PNG."""
    fig, ax = plt.subplots(figsize=(10, 5))
    progress_chart(rows, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curve(losses: list[tuple[int, float]], ax=None, label: str | None = None):
    """Training loss against step, from a TrainResult's `losses`."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot(*zip(*losses), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return ax
