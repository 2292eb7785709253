"""The sandbox on a GPU: does training see the GPU through it, and what does it cost?

    python bench/bench_sandbox_gpu.py [--preset small-gpu] [--budget 20] [--pairs 2] [--out rows.json]

One warm-up run (prepares the data, fills the compile cache), then `--pairs` pairs of whole
experiments (runner.run_training: training + scoring), unsandboxed and sandboxed, interleaved.
Prints one JSON row per run: tokens/s, start-up (measured by the runner, from outside), scoring
time, wall time, val_bpb, and what the run saw as its device.
"""

import argparse
import json
import os
import time

from autoresearch_lib.baseline import render_train_py
from autoresearch_lib.config import make_settings
from autoresearch_lib.runner import run_training


def one(preset, budget, mode, tag):
    os.environ["AUTORESEARCH_SANDBOX"] = mode
    settings = make_settings(preset, budget=budget, dataset="shakespeare", eval_tokens=2**18)
    r = run_training(render_train_py(preset), settings, f"runs/sandbox-gpu-{tag}")
    row = dict(tag=tag, sandbox=r.sandbox, status=r.status, reason=r.reason, device=r.device,
               precision=r.precision, tokens_per_second=r.tokens_per_second,
               startup_seconds=round(r.startup_seconds, 2), eval_seconds=round(r.eval_seconds, 2),
               wall_seconds=round(r.wall_seconds, 2), val_bpb=r.val_bpb, num_steps=r.num_steps)
    print(json.dumps(row), flush=True)
    if not r.ok:
        print(r.error_tail, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small-gpu")
    ap.add_argument("--budget", type=float, default=20)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    t0 = time.time()
    rows = [one(args.preset, 10, "auto", "warmup")]
    for i in range(args.pairs):
        rows += [one(args.preset, args.budget, "0", f"plain-{i}"),
                 one(args.preset, args.budget, "auto", f"sandboxed-{i}")]
    print(f"total {time.time() - t0:.0f}s", flush=True)
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
