"""GPU benchmark: throughput, MFU, start-up and val_bpb of the GPU presets at a fixed budget.

    python bench/bench_gpu.py --budget 120 [--out results.json]

Runs the `h100` preset (upstream's size: depth 8, seq 2048, vocab 8192, 2^19 tokens/step) in
its natural precision (bf16 on Ampere/Hopper), then the fp16 path (loss scaling, as on a T4) on
the same card with the `small-gpu` preset, and prints one row each.
"""

import argparse
import json
import os

import torch

import autoresearch_lib as ar


def one(preset, budget, dtype=None):
    if dtype:
        os.environ["AUTORESEARCH_DTYPE"] = dtype
    else:
        os.environ.pop("AUTORESEARCH_DTYPE", None)
    r = ar.train(preset=preset, budget=budget, run_dir=f"runs/bench-{preset}-{dtype or 'auto'}",
                 checkpoint=False, on_progress=lambda p: None)
    row = dict(preset=preset, precision=r.precision, status=r.status, reason=r.reason,
               val_bpb=r.val_bpb, tokens_per_second=r.tokens_per_second, mfu_percent=r.mfu_percent,
               startup_seconds=r.startup_seconds, training_seconds=r.training_seconds,
               total_seconds=r.total_seconds, num_steps=r.num_steps, peak_vram_mb=r.peak_vram_mb,
               num_params_M=r.num_params_M, epochs=r.epochs, device=r.device)
    print(json.dumps(row), flush=True)
    if not r.ok:
        print(r.error_tail)
    return row


def main(budget, out, fp16_budget):
    print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
    rows = [one("h100", budget)]
    if fp16_budget:
        rows.append(one("small-gpu", fp16_budget, dtype="fp16"))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=120)
    p.add_argument("--fp16-budget", type=float, default=60)
    p.add_argument("--out")
    a = p.parse_args()
    main(a.budget, a.out, a.fp16_budget)
