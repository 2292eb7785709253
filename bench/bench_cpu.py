"""CPU benchmark: the `cpu` preset against a classic reference, same data, same wall-clock budget.

    python bench/bench_cpu.py [--budget 120] [--repeats 3]

The kit's `cpu` preset (BPE, the baseline train.py) and nanoGPT's documented CPU recipe
(character level; bench/nanogpt_char.py) each train for `budget` seconds on the same train
works and are scored in bits per byte on the same held-out works. Prints the median of
`repeats` runs of each and a markdown table; writes bench/results/cpu-DATE.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import autoresearch_lib as ar

sys.path.insert(0, str(Path(__file__).parent))
import nanogpt_char  # noqa: E402


def kit_run(budget):
    r = ar.train(preset="cpu", budget=budget, run_dir=f"runs/bench-cpu-{int(time.time())}",
                 checkpoint=False)
    assert r.ok, r.error_tail
    return dict(val_bpb=r.val_bpb, tokens_per_second=r.tokens_per_second, steps=r.num_steps,
                params_M=r.num_params_M, startup_seconds=r.startup_seconds)


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def main(budget, repeats):
    kit = [kit_run(budget) for _ in range(repeats)]
    ref = [nanogpt_char.main(budget, seed=1337 + i) for i in range(repeats)]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine}, budget {budget:g}s, median of {repeats}\n")
    print("| model | val_bpb | tokens/s | bytes/s | params |")
    print("|---|---|---|---|---|")
    bpt = ar.prepare(preset="cpu", verbose=False).bytes_per_token
    print(f"| kit `cpu` preset (BPE {ar.make_settings('cpu').vocab_size}) | "
          f"{median_of(kit, 'val_bpb'):.4f} | {median_of(kit, 'tokens_per_second'):,.0f} | "
          f"{median_of(kit, 'tokens_per_second') * bpt:,.0f} | {kit[0]['params_M']:.1f}M |")
    print(f"| nanoGPT char-level CPU recipe | {median_of(ref, 'val_bpb'):.4f} | "
          f"{median_of(ref, 'tokens_per_second'):,.0f} | {median_of(ref, 'tokens_per_second'):,.0f} | "
          f"{ref[0]['params_M']:.1f}M |")
    out = Path(__file__).parent / "results" / f"cpu-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "budget": budget, "kit": kit, "reference": ref}, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=120)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    main(a.budget, a.repeats)
