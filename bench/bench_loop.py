"""Benchmark: what the research loop itself costs per experiment, beyond training.

    python bench/bench_loop.py [--experiments 6] [--budget 2] [--bookkeeping 50]

One experiment's wall time splits into
    propose    the agent's latency (the offline agent here: milliseconds)
    start-up   the training subprocess: interpreter, torch import, data, first (excluded) step
    training   the fixed budget
    eval       evaluate_bpb and the summary (total_seconds - training - start-up)
    overhead   everything else = wall - (total_seconds + propose), split into
      exit     the subprocess's exit after its summary (interpreter + torch teardown)
      loop     outside the subprocess: git commit, the run folder, the log copy, results.tsv,
               git reset
Part 1 runs real quick experiments with the offline agent through loop.run and times them
from the loop's events. Part 2 swaps training for an instant fake executor and times the pure
bookkeeping (commit, results.tsv, reset, reads) over many experiments. The goal: overhead
<= 3 s per experiment. total_seconds, training_seconds and startup_seconds come from the run's
summary, rounded to 0.1 s, so eval and overhead are good to about ±0.1 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("AUTORESEARCH_QUICK", "1")  # preset "auto" = quick: seconds on a CPU

from autoresearch_lib import data, loop  # noqa: E402
from autoresearch_lib.agents import OfflineAgent  # noqa: E402
from autoresearch_lib.runner import TrainResult  # noqa: E402
from autoresearch_lib.workspace import Workspace  # noqa: E402


class TimedAgent:
    """Wraps an agent and records how long each propose() took, by experiment number."""

    def __init__(self, agent):
        self.agent, self.name, self.latency = agent, agent.name, {}

    def propose(self, state):
        t0 = time.perf_counter()
        try:
            return self.agent.propose(state)
        finally:
            self.latency[state.experiment] = time.perf_counter() - t0


def timed_run(ws: Workspace, agent: TimedAgent, n: int, **kwargs) -> list[dict]:
    """Run n experiments; each one's wall time runs from the previous decision to its own."""
    rows, last = [], [time.perf_counter()]
    results: dict[int, TrainResult] = {}

    def on_event(event):
        if event.kind == "result":
            results[event.index] = event.data["result"]
        elif event.kind == "decision":
            now = time.perf_counter()
            exp = event.data["experiment"]
            rows.append({"index": exp.index, "description": exp.description, "status": exp.status,
                         "wall": now - last[0], "propose": agent.latency.get(exp.index, 0.0),
                         "result": results.get(exp.index)})
            last[0] = now

    loop.run(ws, agent, max_experiments=n, on_event=on_event, **kwargs)
    return rows


# ---------------------------------------------------------------- part 1: real experiments

def real_experiments(root: Path, n: int, budget: float) -> list[dict]:
    ws = Workspace.create(root / "real", preset="auto", budget=budget, tag="bench")
    data.prepare(ws.settings, verbose=False)  # the tokenizer and token files, before the clock
    rows = timed_run(ws, TimedAgent(OfflineAgent(seed=0)), n)
    for row in rows:
        r = row.pop("result")
        row.update(startup=r.startup_seconds, training=r.training_seconds, total=r.total_seconds,
                   eval=r.total_seconds - r.training_seconds - r.startup_seconds,
                   exit=r.wall_seconds - r.total_seconds)  # summary printed -> process gone
        row["overhead"] = row["wall"] - (row["total"] + row["propose"])
        row["loop"] = row["wall"] - r.wall_seconds - row["propose"]  # outside the subprocess
    return rows


# ---------------------------------------------------------------- part 2: bookkeeping only

def fake_executor(script_text, settings, run_dir, on_progress=None, on_line=None, timeout=None,
                  stop=None, log_path=None) -> TrainResult:
    """Trains nothing: a random val_bpb and a small log, in microseconds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Path(log_path or run_dir / "run.log")
    val_bpb = random.uniform(1.0, 1.1)
    log.write_text(f"fake\n---\nval_bpb: {val_bpb:.6f}\n")
    return TrainResult(status="ok", val_bpb=val_bpb, peak_vram_mb=100.0, num_steps=1,
                       run_dir=str(run_dir), log_path=str(log))


def timed_methods(ws: Workspace, names: list[str]) -> dict[str, list[float]]:
    """Replace ws.<name> by a timed wrapper for each name; returns name -> call durations."""
    spent = defaultdict(list)

    def wrap(name, method):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - t0)
        return timed

    for name in names:
        setattr(ws, name, wrap(name, getattr(ws, name)))
    return spent


def bookkeeping(root: Path, n: int) -> tuple[list[dict], dict[str, list[float]]]:
    random.seed(0)
    ws = Workspace.create(root / "fake", preset="auto", budget=1, tag="bench")
    spent = timed_methods(ws, ["commit", "append_result", "reset_to", "results", "head"])
    rows = timed_run(ws, TimedAgent(OfflineAgent(seed=0)), n, executor=fake_executor)
    for row in rows:
        row["bookkeeping"] = row["wall"] - row["propose"]
    return rows, spent


# ---------------------------------------------------------------- report

def median(rows, key) -> float:
    return statistics.median(r[key] for r in rows)


def table(rows: list[dict], columns: list[str]) -> str:
    cell = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=6, help="real quick experiments")
    parser.add_argument("--budget", type=float, default=2.0, help="training seconds each")
    parser.add_argument("--bookkeeping", type=int, default=50, help="fake experiments")
    args = parser.parse_args()

    import torch

    load = os.getloadavg()
    print(f"# bench_loop: {dt.date.today()} | {platform.platform()} | {os.cpu_count()} CPU cores | "
          f"python {platform.python_version()} | torch {torch.__version__} | "
          f"load average at start {load[0]:.2f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        real = real_experiments(Path(tmp), args.experiments, args.budget)
        fake, spent = bookkeeping(Path(tmp), args.bookkeeping)

    print(f"## {len(real)} real experiments (quick preset, budget {args.budget:g}s, offline agent); seconds\n")
    columns = ["index", "status", "wall", "propose", "startup", "training", "eval", "exit", "loop",
               "overhead"]
    print(table(real, columns))
    medians = {c: median(real, c) for c in columns[2:]}
    print(table([{"index": "median", "status": "", **medians}], columns))
    goal = "meets" if medians["overhead"] <= 3 else "MISSES"
    print(f"\nmedian overhead {medians['overhead']:.2f}s per experiment ({goal} the <= 3 s goal); "
          f"= the subprocess's exit after its summary ({medians['exit']:.2f}s, interpreter and torch "
          f"teardown) + the loop outside the subprocess ({medians['loop']:.2f}s)\n")

    n = len(fake)
    print(f"## bookkeeping only: {n} experiments with a fake (instant) executor; milliseconds\n")
    ops = [{"step": name, "calls": len(times), "ms per call": 1000 * statistics.median(times),
            "ms per experiment": 1000 * sum(times) / n} for name, times in spent.items()]
    ops.append({"step": "whole experiment (wall - propose), median", "calls": n,
                "ms per call": 1000 * median(fake, "bookkeeping"),
                "ms per experiment": 1000 * median(fake, "bookkeeping")})
    ops.append({"step": "offline agent's propose, median", "calls": n,
                "ms per call": 1000 * median(fake, "propose"),
                "ms per experiment": 1000 * median(fake, "propose")})
    print(table(ops, ["step", "calls", "ms per call", "ms per experiment"]))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
