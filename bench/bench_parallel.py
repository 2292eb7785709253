"""Parallel loop benchmark: experiments per hour and tokens/s, one at a time vs waves on Ray.

    python bench/bench_parallel.py [--preset quick] [--budget 5] [--experiments 6] [--parallel 2]
                                   [--repeats 2] [--ray-address ADDR] [--only-parallel]

For each setting (parallel 1, then N) a fresh workspace runs the offline agent for
`experiments` experiments after its baseline (fair comparisons off, so every experiment is one
run and the two loops do the same amount of training). Reported per setting, median over
`repeats`: experiments per hour (wall clock from the first candidate to the last row, the
baseline excluded) and the candidates' median tokens/s. On a GPU machine with N GPUs, parallel
N should give ~N times the experiments per hour at the same tokens/s per run (one GPU each);
on a CPU, N runs share the cores, so each is slower. "alone": how many waves' leaders trained
again alone before their keep could be decided (loop.py), a cost that waves pay and a serial
loop does not. Writes bench/results/parallel-DATE.json.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from autoresearch_lib import loop
from autoresearch_lib.agents import OfflineAgent
from autoresearch_lib.workspace import Workspace


def one(preset, budget, experiments, parallel, address):
    path = Path(tempfile.mkdtemp(prefix="bench-parallel-")) / "ws"
    ws = Workspace.create(path, preset=preset, budget=budget)
    loop.run(ws, OfflineAgent(), max_experiments=1, recheck=False)  # the baseline, not timed
    t0 = time.time()
    loop.run(ws, OfflineAgent(), max_experiments=experiments, recheck=False, parallel=parallel,
             ray_address=address)
    seconds = time.time() - t0
    rows = ws.results()[1:]
    speeds = [r["tok_per_sec"] for r in rows if r["status"] != "crash" and r["tok_per_sec"]]
    return {"parallel": parallel, "experiments": len(rows), "seconds": seconds,
            "per_hour": 3600 * len(rows) / seconds,
            "tok_per_sec": statistics.median(speeds) if speeds else 0.0,
            "devices": sorted({str(r.get("device")) for r in rows}),
            "crashes": sum(r["status"] == "crash" for r in rows),
            "alone": sum(str(r["reason"]).startswith("judged on a run alone") for r in rows)}


def main(args):
    runs = {args.parallel: []} if args.only_parallel else {1: [], args.parallel: []}
    for _ in range(args.repeats):
        for n in runs:  # interleaved, so a change in the machine's load hits both alike
            runs[n].append(one(args.preset, args.budget, args.experiments, n, args.ray_address))
            print(json.dumps(runs[n][-1]), flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("per_hour", "tok_per_sec", "seconds")}
           for n, rs in runs.items()}
    print(f"\n| loop | experiments/hour | tokens/s per run |\n|---|---|---|")
    for n, m in med.items():
        print(f"| parallel {n} | {m['per_hour']:.0f} | {m['tok_per_sec']:,.0f} |")
    if 1 in med:
        serial, par = med[1], med[args.parallel]
        print(f"\nratio: {par['per_hour'] / serial['per_hour']:.2f}x experiments/hour, "
              f"{par['tok_per_sec'] / serial['tok_per_sec']:.2f}x tokens/s per run")
    out = Path(__file__).parent / "results" / f"parallel-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.node(),
                               "cpus": os.cpu_count(), "runs": runs, "medians": med}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--budget", type=float, default=5)
    p.add_argument("--experiments", type=int, default=6)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ray-address")
    p.add_argument("--only-parallel", action="store_true", help="skip the serial loop (A/B of two versions' waves)")
    main(p.parse_args())
