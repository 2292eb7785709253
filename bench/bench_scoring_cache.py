"""Scoring on a GPU with and without the model servers' copies of the trusted compile cache.

    python bench/bench_scoring_cache.py [--preset h100] [--repeats 3] [--out rows.jsonl]

One whole experiment of the unedited preset (runner.run_training: it fills the trusted compile
cache, FlashAttention 4's kernels included), then its checkpoint scored again and again
(scoring.score, both model servers, the spot checks), alternating: each server with its own copy
of the trusted cache (what the runner does) and with none (each server compiles its kernels
itself). Prints one JSON row per scoring: seconds, val_bpb; and the size of the copied cache.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

from autoresearch_lib import data, sandbox, scoring
from autoresearch_lib.baseline import render_train_py
from autoresearch_lib.config import MODEL_FILE, make_settings, trusted_compile_cache
from autoresearch_lib.runner import run_training


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    settings = make_settings(a.preset, budget=5, dataset="shakespeare")
    script = render_train_py(a.preset)
    result = run_training(script, settings, "runs/scoring-cache")
    rows = [dict(what="experiment", status=result.status, sandbox=result.sandbox, val_bpb=result.val_bpb,
                 startup_seconds=round(result.startup_seconds, 2), eval_seconds=round(result.eval_seconds, 2))]
    print(json.dumps(rows[0]), flush=True)
    if not result.ok:
        raise SystemExit(result.error_tail)
    size = subprocess.run(["du", "-sh", str(trusted_compile_cache())], capture_output=True, text=True).stdout
    size = size.split()[0] if size else "none (no GPU: the servers get no cache)"
    print("trusted compile cache:", size, flush=True)
    prepared = data.prepare(settings, verbose=False)
    with_cache = scoring.private_compile_cache
    use_sandbox = sandbox.mode() == "bwrap"
    for repeat in range(a.repeats):
        for cached in (False, True):
            scoring.private_compile_cache = with_cache if cached else (lambda folders: None)
            t0 = time.time()
            scored = scoring.score(script, Path(result.run_dir) / MODEL_FILE, settings, prepared, use_sandbox, [],
                                   timeout=600)
            rows.append(dict(what="scoring", cached=cached, repeat=repeat, seconds=round(time.time() - t0, 2),
                             val_bpb=round(scored.val_bpb, 6), cache_size=size))
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
