"""Benchmark: fair comparisons on a busy machine (issue #14), with the guard on and off.

    python bench/bench_fairness.py [--budget 4] [--calibrate 8] [--edits 6] [--repeats 3] [--hogs 3] [--alone 2]

Part 1, calibration. The baseline train.py trains `--calibrate` times back to back on the machine
as it is, then as many times with our own CPU hog (`--hogs` spinning processes) on for every other
run. From these runs come the numbers behind fairness.py's thresholds:
  speed   how far apart the tokens/s of two back-to-back runs are on the machine as it is (SPEED
          must stay above it, or a quiet machine would look changed);
  slope   how much val_bpb moves per 1 % of speed (MARGIN: what a speed change too small for
          SPEED to catch can still move);
  tie     how far apart the val_bpb of two runs is beyond what their speed gap explains, for
          steady runs (TIE) and for runs whose speed jumped about from step to step (TIE_UNSTEADY);
  jitter  how much the speed of each run varied from step to step (UNSTEADY).

Part 2, the loop. A workspace whose baseline trains with the hog on; then `--edits` edits while
the hog comes and goes (on ~15 s, off ~25 s, seeded, the same schedule for both modes): all but
one change nothing but a comment, so keeping one is a false keep; the third is a real
improvement at this budget (DEPTH 2 -> 1: a third of the parameters, twice the steps; 2.3-2.9 %
lower val_bpb than the baseline beside it on a steady machine, more under load), which should be
kept. Guard on
(`recheck=True`, the default) and off (`recheck=False`, upstream's rule), `--repeats` loops
each, alternating. Reports false keeps, whether the improvement was kept, and extra runs (per
experiment, per kept change), medians over the loops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("AUTORESEARCH_QUICK", "1")  # quick preset: seconds on a CPU

from autoresearch_lib import data, loop  # noqa: E402
from autoresearch_lib.agents import ScriptedAgent  # noqa: E402
from autoresearch_lib.baseline import render_train_py  # noqa: E402
from autoresearch_lib.config import make_settings  # noqa: E402
from autoresearch_lib.fairness import (MARGIN, SPEED, TIE, TIE_UNSTEADY, UNSTEADY,  # noqa: E402
                                       jitter)
from autoresearch_lib.runner import run_training  # noqa: E402
from autoresearch_lib.workspace import Workspace  # noqa: E402

HERE = Path(__file__).resolve().parent


class Hog:
    """`n` processes that spin on the CPU; paused and resumed with SIGSTOP / SIGCONT.

    Each in a session of its own: Linux shares the CPU between sessions first (autogroup), and
    the runner starts training in a session of its own, so n processes in one session would
    cost training at most half the CPU, however large n is.
    """

    def __init__(self, n: int):
        spin = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
                      for _ in range(n)]
        self.on = True

    def set(self, on: bool) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT if on else signal.SIGSTOP)
        self.on = on

    def close(self) -> None:
        for p in self.procs:
            p.kill()  # SIGKILL ends a stopped process too
            p.wait()


class Schedule(threading.Thread):
    """Turns a Hog on and off: on for ~on_s, off for ~off_s (±50 %, seeded), until stopped."""

    def __init__(self, hog: Hog, seed: int, on_s: float = 15.0, off_s: float = 25.0):
        super().__init__(daemon=True)
        self.hog, self.rng, self.on_s, self.off_s = hog, random.Random(seed), on_s, off_s
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.hog.set(not self.hog.on)
            mean = self.on_s if self.hog.on else self.off_s
            if self.done.wait(mean * self.rng.uniform(0.5, 1.5)):
                return


# ---------------------------------------------------------------- part 1: calibration

def train_once(settings, root: Path, n: int) -> dict:
    r = run_training(render_train_py("quick"), settings, root / f"calib{n:03d}")
    if not r.ok:
        raise RuntimeError(f"calibration run {n} crashed: {r.reason}\n{r.error_tail}")
    return {"val": r.val_bpb, "tps": r.tokens_per_second, "steps": r.num_steps,
            "jitter": jitter(r.log_path)}


def calibrate(settings, root: Path, n: int, hogs: int) -> dict:
    quiet = [train_once(settings, root, i) for i in range(n)]
    mixed = []
    for i in range(n):
        hog = Hog(hogs) if i % 2 else None
        try:
            mixed.append({**train_once(settings, root, n + i), "hog": bool(hog)})
        finally:
            if hog:
                hog.close()
    return {"quiet": quiet, "mixed": mixed, **analyse(quiet, mixed)}


def analyse(quiet: list[dict], mixed: list[dict]) -> dict:
    """The spreads and the slope that the thresholds rest on (relative numbers)."""
    pairs = list(itertools.pairwise(quiet))  # back to back, machine as it is
    speed_gaps = [abs(b["tps"] / a["tps"] - 1) for a, b in pairs]
    # val_bpb against log(tokens/s) over every run: a straight line fits the range measured
    runs = quiet + mixed
    xs, ys = [math.log(r["tps"]) for r in runs], [r["val"] for r in runs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    # any two runs: how far apart their val_bpb is beyond what their speed gap explains
    # (MARGIN/SPEED per unit of log speed), steady (both) or not; the tie bands must cover it
    ties = {"steady": [], "unsteady": []}
    for a, b in itertools.combinations(runs, 2):
        kind = "steady" if max(a["jitter"], b["jitter"]) <= UNSTEADY else "unsteady"
        allowance = MARGIN / SPEED * abs(math.log(b["tps"] / a["tps"]))
        ties[kind].append(abs(b["val"] / a["val"] - 1) - allowance)
    out = {"speed_gap_median": statistics.median(speed_gaps), "speed_gap_max": max(speed_gaps),
           "val_per_speed_pct": -slope / my / 100,  # relative val change per 1 % more speed
           "steady_runs": sum(r["jitter"] <= UNSTEADY for r in runs), "runs": len(runs)}
    for kind, gaps in ties.items():
        out[f"tie_{kind}_pairs"] = len(gaps)
        out[f"tie_{kind}_median"] = statistics.median(gaps) if gaps else None
        out[f"tie_{kind}_max"] = max(gaps) if gaps else None
    return out


# ---------------------------------------------------------------- part 2: the loop

IMPROVEMENT = ("DEPTH 2 -> 1", {"DEPTH": 1})  # a real gain at the quick preset's budget
REAL_AT = 2  # its place among the edits


def edits(n: int) -> list:
    """Edits that change nothing but a comment (whatever they score is the machine's doing),
    with the one real improvement at REAL_AT."""
    comments = [(lambda state, i=i: (f"comment {i}", state.train_py + f"\n# comment {i}\n"))
                for i in range(n)]
    return comments[:REAL_AT] + [IMPROVEMENT] + comments[REAL_AT + 1:]


def one_loop(root: Path, budget: float, n: int, hogs: int, recheck: bool, seed: int) -> dict:
    """One loop: baseline with the hog on, then n edits while it comes and goes (hogs=0: no hog
    at all, the machine as it is)."""
    ws = Workspace.create(root / f"loop-{'on' if recheck else 'off'}-{hogs}-{seed}", preset="quick",
                          budget=budget, tag="bench")
    hog = Hog(hogs)  # on for the baseline
    schedule = Schedule(hog, seed)
    t0 = time.time()
    try:
        loop.step(ws, ScriptedAgent([]))
        if hogs:
            schedule.start()
        done = loop.run(ws, ScriptedAgent(edits(n)), max_experiments=n, recheck=recheck)
    finally:
        schedule.done.set()
        if schedule.is_alive():
            schedule.join()
        hog.close()
    cost = loop.recheck_cost(done)
    real = [e for e in done if e.description == IMPROVEMENT[0]]
    return {"recheck": recheck, "hog": bool(hogs), "seed": seed, "experiments": len(done),
            "false_keeps": sum(e.status == "keep" and e.description != IMPROVEMENT[0] for e in done),
            "real_kept": int(bool(real) and real[0].status == "keep"),
            "crashes": sum(e.status == "crash" for e in done),
            "extra_runs": cost["extra_runs"], "rechecks": cost["rechecks"],
            "extra_per_experiment": cost["extra_runs"] / max(1, len(done)),
            "extra_per_keep": cost["extra_runs"] / cost["kept"] if cost["kept"] else None,
            "minutes": (time.time() - t0) / 60,
            "rows": [{k: r[k] for k in ("status", "val_bpb", "tok_per_sec", "description", "reason")}
                     for r in ws.results()]}


# ---------------------------------------------------------------- report

def med(rows: list[dict], key: str):
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=4.0, help="training seconds per run")
    parser.add_argument("--calibrate", type=int, default=8, help="runs per calibration series (0: skip)")
    parser.add_argument("--edits", type=int, default=6, help="edits per loop (one real improvement)")
    parser.add_argument("--repeats", type=int, default=3, help="loops per mode")
    parser.add_argument("--hogs", type=int, default=3, help="spinning processes in the hog")
    parser.add_argument("--alone", type=int, default=0,
                        help="also this many loops with the guard on and no hog: the machine as it is")
    parser.add_argument("--json", help="write the raw numbers here (default: bench/results/...)")
    args = parser.parse_args()

    import torch

    started = dt.datetime.now()
    print(f"# bench_fairness: {started:%Y-%m-%d %H:%M} | {platform.platform()} | {os.cpu_count()} "
          f"CPU cores | torch {torch.__version__} | load average at start {os.getloadavg()[0]:.2f} | "
          f"budget {args.budget:g}s, hog {args.hogs} processes\n", flush=True)
    settings = make_settings("quick", budget=args.budget)
    data.prepare(settings, verbose=False)
    out = {"date": f"{started:%Y-%m-%d}", "machine": platform.platform(), "cpus": os.cpu_count(),
           "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibrate:
            c = out["calibration"] = calibrate(settings, Path(tmp), args.calibrate, args.hogs)
            print("## calibration (baseline train.py)\n")
            print(f"- tokens/s of back-to-back runs, machine as it is: median gap "
                  f"{c['speed_gap_median']:.1%}, largest {c['speed_gap_max']:.1%}")
            print(f"- val_bpb moves {c['val_per_speed_pct']:.3%} per 1 % of speed (fit over "
                  f"{c['runs']} runs, hog on for every other one of the second half)")
            print(f"- steady runs (speed varied <= {UNSTEADY:.0%} from step to step): "
                  f"{c['steady_runs']} of {c['runs']}")
            for kind, band in (("steady", TIE), ("unsteady", TIE_UNSTEADY)):
                print(f"- val_bpb of two {kind} runs, beyond what their speed gap explains "
                      f"({c[f'tie_{kind}_pairs']} pairs): median {pct(c[f'tie_{kind}_median'])}, "
                      f"largest {pct(c[f'tie_{kind}_max'])} (tie band {band:.1%})")
            print(flush=True)
        loops = []
        for i in range(args.repeats):
            for recheck in (True, False):
                loops.append(one_loop(Path(tmp), args.budget, args.edits, args.hogs, recheck, seed=i))
                print(f"loop {i} recheck={recheck}: " + ", ".join(
                    f"{k} {fmt(v)}" for k, v in loops[-1].items() if k not in ("recheck", "seed", "rows"))
                    + " | " + " ".join(r["status"] for r in loops[-1]["rows"]), flush=True)
        for i in range(args.alone):
            loops.append(one_loop(Path(tmp), args.budget, args.edits, 0, True, seed=i))
            print(f"loop {i} alone: " + ", ".join(
                f"{k} {fmt(v)}" for k, v in loops[-1].items() if k not in ("recheck", "seed", "rows"))
                + " | " + " ".join(r["status"] for r in loops[-1]["rows"]), flush=True)
        out["loops"] = loops
    print(f"\n## the loop: {args.edits} edits while the load comes and goes ({args.repeats} loops "
          "per mode; medians, and totals in brackets)\n")
    print("| guard | false keeps | improvement kept | extra runs | extra runs per experiment | "
          "extra runs per kept change | minutes per loop |\n|---|---|---|---|---|---|---|")
    modes = [(True, True, "on (default)"), (False, True, "off (--no-recheck)"),
             (True, False, "on, no hog: the machine as it is")]
    for recheck, hogged, name in modes:
        rows = [r for r in loops if r["recheck"] is recheck and r["hog"] is hogged]
        if not rows:
            continue
        total = {k: sum(r[k] for r in rows) for k in ("false_keeps", "experiments", "real_kept",
                                                      "extra_runs")}
        print(f"| {name} | "
              f"{fmt(med(rows, 'false_keeps'))} ({total['false_keeps']} of "
              f"{total['experiments'] - len(rows)}) | {total['real_kept']} of {len(rows)} | "
              f"{fmt(med(rows, 'extra_runs'))} ({total['extra_runs']}) | "
              f"{fmt(med(rows, 'extra_per_experiment'))} | {fmt(med(rows, 'extra_per_keep'))} | "
              f"{fmt(med(rows, 'minutes'))} |")
    out["load_end"] = os.getloadavg()[0]
    path = Path(args.json or HERE / "results" / f"fairness-{started:%Y-%m-%d}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nload average at the end {out['load_end']:.2f}; raw numbers: {path}")


if __name__ == "__main__":
    main()
