"""The parallel loop's GPU path on a real card: what Ray costs a run, and one experiment per GPU.

    python bench/bench_ray_gpu.py [--preset small-gpu] [--budget 20] [--pairs 2]

1. The same train.py is trained `pairs` times directly (runner.run_training) and `pairs` times
   as a Ray task asking for one GPU (parallel.Engine), alternately: tokens/s of each, and the
   ratio of the medians (goal: within 3 %).
2. A wave of 2 candidates with `loop.run(parallel=2)` on this machine: with one GPU the second
   must start only after the first ended (never two on one card); with two or more they run
   together. Prints when each started and ended, and where (host, GPU).
Writes the numbers as JSON lines to stdout and to --out.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from autoresearch_lib import loop
from autoresearch_lib.agents import OfflineAgent
from autoresearch_lib.parallel import Engine
from autoresearch_lib.runner import run_training
from autoresearch_lib.workspace import Workspace


def emit(out, **row):
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(args):
    root = Path(tempfile.mkdtemp(prefix="bench-ray-gpu-"))
    ws = Workspace.create(root / "ws", preset=args.preset, budget=args.budget)
    settings, text = ws.settings, ws.train_py
    engine = Engine(2)
    emit(args.out, what="engine", describe=engine.describe())
    speeds = {"direct": [], "ray": []}
    for i in range(args.pairs):
        for how in ("direct", "ray"):
            run = run_training if how == "direct" else engine.executor
            r = run(text, settings, root / f"{how}{i}", log_path=root / f"{how}{i}.log")
            assert r.ok, (how, r.reason, r.error_tail)
            speeds[how].append(r.tokens_per_second)
            emit(args.out, what="run", how=how, tok_per_sec=r.tokens_per_second, steps=r.num_steps,
                 val_bpb=r.val_bpb, startup_s=r.startup_seconds, device=r.device, sandbox=r.sandbox)
    engine.close()
    d, r = statistics.median(speeds["direct"]), statistics.median(speeds["ray"])
    emit(args.out, what="ray_vs_direct", direct=d, ray=r, ratio=r / d)

    times = {}

    def on_event(e):
        if e.kind == "started":
            times.setdefault(e.data["slot"], {})["start"] = time.time()
            times[e.data["slot"]]["where"] = f"{e.data['host']} {e.data['device']}"
        elif e.kind == "result" and "slot" in e.data:
            times.setdefault(e.data["slot"], {})["end"] = time.time()

    loop.run(ws, OfflineAgent(), max_experiments=1, recheck=False)  # the baseline
    t0 = time.time()
    loop.run(ws, OfflineAgent(), max_experiments=2, parallel=2, recheck=False, on_event=on_event)
    for slot, t in sorted(times.items()):
        emit(args.out, what="wave_run", slot=slot, where=t.get("where"),
             start=round(t["start"] - t0, 1), end=round(t["end"] - t0, 1))
    rows = ws.results()
    emit(args.out, what="rows", rows=[{k: r[k] for k in ("status", "val_bpb", "tok_per_sec", "device",
                                                          "wave", "sandbox")} for r in rows])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-gpu")
    p.add_argument("--budget", type=float, default=20)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out")
    main(p.parse_args())
