"""Plots: the research progress chart (upstream's style) and training loss curves.

The chart works for any task: `metric` names results.tsv's second column (by default the one
the rows have: val_bpb for GPT), and `direction` says which way is better, so the running best
goes down when minimizing and up when maximizing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def metric_of(rows: list[dict]) -> str:
    """The metric the rows hold: results.tsv's second column (val_bpb for GPT training)."""
    return list(rows[0])[1] if rows else "val_bpb"


def summary(rows: list[dict], metric: str | None = None, direction: str = "minimize") -> dict:
    """Counts and the best result of a run's results.tsv rows (improvement > 0: it got better).

    `recheck` rows (the best trained again, for a fair comparison) are counted apart: they are
    not experiments.
    """
    metric = metric or metric_of(rows)
    rechecks = sum(r["status"] == "recheck" for r in rows)
    rows = [r for r in rows if r["status"] != "recheck"]
    kept = [r for r in rows if r["status"] == "keep"]
    ok = [r for r in rows if r["status"] != "crash"]
    pick = max if direction == "maximize" else min
    best = pick((r[metric] for r in kept), default=None)
    first = kept[0][metric] if kept else None
    gain = (best - first if direction == "maximize" else first - best) if kept else 0.0
    return {"experiments": len(rows), "kept": len(kept), "crashed": len(rows) - len(ok),
            "keep_rate": len(kept) / len(rows) if rows else 0.0, "baseline": first, "best": best,
            "improvement": gain, "rechecks": rechecks}


def axis_label(metric: str, direction: str = "minimize") -> str:
    """The y-axis label: what the number is, and which way is better."""
    what = "validation bits per byte" if metric == "val_bpb" else metric
    return f"{what} ({'higher' if direction == 'maximize' else 'lower'} is better)"


def progress_chart(rows: list[dict], ax=None, label: str | None = None, color: str = "#2ca02c",
                   annotate: bool = True, metric: str | None = None, direction: str = "minimize"):
    """Discarded experiments as grey dots, kept ones as green dots, the running best as a step line,
    re-checks of the best (trained again for a fair comparison) as orange rings.

    Crashes are left out (their metric is 0). Pass `ax` and `label` to draw two runs on one chart.
    A parallel loop's waves (results.tsv's `wave` column) are shaded, one band per wave.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5))
    metric = metric or metric_of(rows)
    xs = [i for i, r in enumerate(rows) if r["status"] != "crash"]
    disc = [(i, rows[i][metric]) for i in xs if rows[i]["status"] == "discard"]
    kept = [(i, rows[i][metric]) for i in xs if rows[i]["status"] == "keep"]
    rechecked = [(i, rows[i][metric]) for i in xs if rows[i]["status"] == "recheck"]
    if disc:
        ax.scatter(*zip(*disc), c="#bbbbbb", s=18, alpha=0.8, zorder=2,
                   label=None if label else "discarded")
    if rechecked:
        ax.scatter(*zip(*rechecked), facecolors="none", edgecolors="#d9822b", s=40, zorder=3,
                   label=None if label else "best, trained again")
    if kept:
        ax.scatter(*zip(*kept), c=color, s=50, edgecolors="black", linewidths=0.5, zorder=4,
                   label=f"{label} (kept)" if label else "kept")
        pick = max if direction == "maximize" else min
        steps_x, steps_y, best = [], [], kept[0][1]
        for i, v in kept:
            best = pick(best, v)
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
    _shade_waves(rows, ax)
    s = summary(rows, metric, direction)
    ax.set_xlabel("experiment #")
    ax.set_ylabel(axis_label(metric, direction))
    ax.set_title(f"Autoresearch progress: {s['experiments']} experiments, "
                 f"{max(0, s['kept'] - 1)} kept improvements")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return ax


def _shade_waves(rows: list[dict], ax) -> None:
    """A light band behind the rows of each wave of a parallel loop, labelled w1, w2, ..."""
    spans: dict = {}
    for i, r in enumerate(rows):
        if r.get("wave") not in (None, ""):
            first, last = spans.get(r["wave"], (i, i))
            spans[r["wave"]] = (min(first, i), max(last, i))
    for n, (first, last) in enumerate(sorted(spans.items(), key=lambda kv: kv[1])):
        wave, (a, b) = first, last
        ax.axvspan(a - 0.4, b + 0.4, color="#1f77b4", alpha=0.06 if n % 2 else 0.12, lw=0, zorder=0,
                   label=None if n else "a wave (parallel runs)")
        ax.annotate(f"w{wave}", ((a + b) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center",
                    va="top", fontsize=7, color="#1f77b4")


def save_progress_chart(rows: list[dict], path: str | Path, metric: str | None = None,
                        direction: str = "minimize") -> Path:
    """Draw the progress chart and write it to a PNG."""
    fig, ax = plt.subplots(figsize=(10, 5))
    progress_chart(rows, ax=ax, metric=metric, direction=direction)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curve(losses: list[tuple[int, float]], ax=None, label: str | None = None,
               color: str | None = None):
    """Training loss against step, from a TrainResult's `losses` (pass `ax` to draw several runs)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot(*zip(*losses), label=label, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return ax



def loop_diagram(ax=None):
    """The research loop as boxes and arrows: propose → commit → train (fixed budget) → val_bpb →
    keep or reset → propose again, forever. For notebooks and slides."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    boxes = {  # name: (x, y, text, colour), in a 10 x 4 drawing
        "propose": (1.2, 3.0, "the agent edits\ntrain.py", "#dbe9f6"),
        "commit": (3.7, 3.0, "git commit", "#dbe9f6"),
        "train": (6.2, 3.0, "train for the\nfixed budget", "#fde9c9"),
        "measure": (8.7, 3.0, "measure\nval_bpb", "#fde9c9"),
        "better": (8.7, 1.0, "lower than\nthe best?", "#eeeeee"),
        "keep": (5.0, 1.0, "keep: the branch\nadvances", "#d5f0d5"),
        "reset": (1.2, 1.0, "reset: git reset\nto the best", "#f6d5d5"),
    }
    w, h = 2.0, 0.9
    for x, y, text, colour in boxes.values():
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    fc=colour, ec="#555555", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def arrow(a, b, text="", rad=0.0, dy=0.15):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, color="#444444",
                                     connectionstyle=f"arc3,rad={rad}", lw=1.2, shrinkA=2, shrinkB=2))
        if text:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, text, ha="center", fontsize=8, color="#444444")

    for a, b in [("propose", "commit"), ("commit", "train"), ("train", "measure")]:
        arrow((boxes[a][0] + w / 2 + 0.05, 3.0), (boxes[b][0] - w / 2 - 0.05, 3.0))
    arrow((8.7, 3.0 - h / 2 - 0.05), (8.7, 1.0 + h / 2 + 0.05))
    arrow((8.7 - w / 2 - 0.05, 1.0), (5.0 + w / 2 + 0.05, 1.0), "yes")
    arrow((8.7 - 0.3, 1.0 - h / 2 - 0.05), (1.2 + 0.3, 1.0 - h / 2 - 0.05), "no, or a crash", rad=-0.12, dy=-0.75)
    arrow((5.0 - 0.4, 1.0 + h / 2 + 0.05), (1.2 + 0.6, 3.0 - h / 2 - 0.05), rad=0.15)
    arrow((1.2, 1.0 + h / 2 + 0.05), (1.2, 3.0 - h / 2 - 0.05))
    ax.text(4.0, 2.0, "each experiment: a row in results.tsv,\nthen the loop starts again, forever",
            ha="left", va="center", fontsize=8, style="italic", color="#444444")
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.3, 3.6)
    ax.axis("off")
    return ax


def token_boundaries(pieces: list[str], ax=None, width: int = 64,
                     colours: tuple[str, ...] = ("#ffd591", "#91caff", "#b7eb8f", "#ffadd2")):
    """A passage drawn token by token, each on its own background colour, so the boundaries
    show. `pieces` are the tokens' texts in order; spaces are drawn as '·', lines wrap at
    `width` characters and at newlines."""
    rows, row, used = [], [], 0
    for i, piece in enumerate(pieces):
        for j, part in enumerate(piece.split("\n")):
            if j > 0 or (used + len(part) > width and row):
                rows.append(row)
                row, used = [], 0
            if part:
                row.append((part.replace(" ", "·"), colours[i % len(colours)]))
                used += len(part)
    rows.append(row)
    if ax is None:
        # a monospace character at 10 pt is 6 pt (1/12 inch) wide: one x unit per character
        fig = plt.figure(figsize=((width + 1) / 12, 0.3 * len(rows) + 0.2))
        ax = fig.add_axes((0, 0, 1, 1))  # the whole figure, so that x units match characters
    for y, row in enumerate(rows):
        x = 0
        for text, colour in row:
            ax.text(x, -y, text, family="monospace", fontsize=10, va="center",
                    bbox=dict(boxstyle="square,pad=0.02", fc=colour, ec="none"))
            x += len(text)
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    return ax
