"""train.py before/after on the CPU: val_bpb of variants of the baseline, interleaved runs.

    python bench/bench_trainpy_cpu.py [--budget 120] [--repeats 3] [--before REF]
                                      [--variant 'name:CONST=value,CONST=value' ...]
                                      [--steps N [--first-seed 42]] [--only NAME ...]

Each variant is the `cpu` preset's train.py: "before" is train.py at git REF (default HEAD),
"after" the working tree's, and every --variant the working tree's with some UPPERCASE constants
set (one lever switched off, say). Runs go variant by variant in turns (A, B, C, A, B, C, ...)
so that load on a shared machine hits all of them alike. Prints every run and the medians, and
writes bench/results/trainpy-cpu-DATE.json.

With --steps N each run trains exactly N optimizer steps in this process instead (schedules by
step / N rather than by time, seed = 42 + repeat), then scores the same validation rows: a
comparison of the optimizers per step that the machine's load cannot tilt.
"""

import argparse
import ast
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import autoresearch_lib as ar
from autoresearch_lib.baseline import render_train_py, set_constant
from autoresearch_lib.config import get_preset

ROOT = Path(__file__).resolve().parent.parent


def before_script(ref):
    """train.py at git `ref` with the cpu preset's starting values (those it knows)."""
    source = subprocess.run(["git", "show", f"{ref}:autoresearch_lib/baseline/train.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name, value in get_preset("cpu").hparams.items():
        try:
            source = set_constant(source, name, value)
        except KeyError:
            pass
    return source


def variant_script(spec):
    """'name:CONST=value,...' -> (name, the working tree's cpu train.py with those constants)."""
    name, _, assignments = spec.partition(":")
    source = render_train_py("cpu")
    for assignment in filter(None, assignments.split(",")):
        const, _, value = assignment.partition("=")
        source = set_constant(source, const.strip(), ast.literal_eval(value.strip()))
    return name, source


def load_module(name, source):
    path = ROOT / "runs" / f"bench_trainpy_{name.replace('-', '_')}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fixed_steps_run(name, source, steps, i, first_seed=42):
    """Train `steps` optimizer steps of the variant in this process, then val_bpb."""
    from autoresearch_lib import data, harness
    from autoresearch_lib.config import make_settings

    m = load_module(name, source)
    settings = make_settings("cpu", seed=first_seed + i)
    prepared = data.prepare(settings, verbose=False)
    torch.manual_seed(settings.seed)
    width = -(-m.DEPTH * m.ASPECT_RATIO // m.HEAD_DIM) * m.HEAD_DIM
    config = (m.model_config(settings.seq_len, prepared.vocab_size) if hasattr(m, "model_config") else
              m.GPTConfig(sequence_len=settings.seq_len, vocab_size=prepared.vocab_size, n_layer=m.DEPTH,
                          n_head=width // m.HEAD_DIM, n_embd=width, window_pattern=m.WINDOW_PATTERN))
    model = m.GPT(config)
    model.init_weights()
    optimizers = list(m.make_optimizers(model, fused=False))
    loader = data.make_dataloader(prepared.tokens("train"), prepared.vocab_size - 1, m.DEVICE_BATCH_SIZE,
                                  settings.seq_len, seed=settings.seed)
    grad_accum = m.TOTAL_BATCH_SIZE // (m.DEVICE_BATCH_SIZE * settings.seq_len)
    t0 = time.time()
    for step in range(steps):
        for _ in range(grad_accum):
            x, y, _ = next(loader)
            (model(x, y) / grad_accum).backward()
        lrm = m.lr_multiplier(step / steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        if hasattr(m, "muon_momentum"):  # the schedules train.py's loop sets
            for group in optimizers[1].param_groups:
                group["momentum"] = m.muon_momentum(step)
                group["weight_decay"] = m.weight_decay(step / steps)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    rows = harness.validation_rows(prepared, settings)
    val_bpb = harness.evaluate_bpb(model, rows, prepared.token_bytes(), torch.device("cpu"))
    row = dict(variant=name, ok=True, val_bpb=val_bpb, steps=steps, seed=settings.seed,
               seconds=time.time() - t0, tokens_per_second=steps * m.TOTAL_BATCH_SIZE / (time.time() - t0),
               load_avg=os.getloadavg()[0])
    print(json.dumps(row), flush=True)
    return row


def one_run(name, source, budget, i):
    run_dir = ROOT / "runs" / f"bench-trainpy-{name}-{i}-{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_variant.py").write_text(source)
    r = ar.train(preset="cpu", budget=budget, script=run_dir / "train_variant.py", run_dir=run_dir,
                 checkpoint=False)
    row = dict(variant=name, ok=r.ok, val_bpb=r.val_bpb, tokens_per_second=r.tokens_per_second,
               steps=r.num_steps, load_avg=os.getloadavg()[0])
    print(json.dumps(row), flush=True)
    if not r.ok:
        print(r.error_tail, flush=True)
    return row


def main(budget, repeats, before, variants, steps=None, only=None, first_seed=42):
    scripts = [("before", before_script(before)), ("after", render_train_py("cpu"))]
    scripts += [variant_script(v) for v in variants]
    scripts = [(name, source) for name, source in scripts if not only or name in only]
    if steps:
        rows = [fixed_steps_run(name, source, steps, i, first_seed) for i in range(repeats)
                for name, source in scripts]
    else:
        rows = [one_run(name, source, budget, i) for i in range(repeats) for name, source in scripts]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    how = f"{steps} steps" if steps else f"budget {budget:g}s"
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine}, cpu preset, {how}\n")
    print("| variant | val_bpb (each run) | median | median tokens/s |")
    print("|---|---|---|---|")
    for name, _ in scripts:
        mine = [r for r in rows if r["variant"] == name and r["ok"]]
        if mine:
            bpbs = ", ".join(f"{r['val_bpb']:.4f}" for r in mine)
            print(f"| {name} | {bpbs} | {statistics.median(r['val_bpb'] for r in mine):.4f} | "
                  f"{statistics.median(r['tokens_per_second'] for r in mine):,.0f} |")
    kind = f"steps{steps}" if steps else f"{budget:g}s"
    out = ROOT / "bench" / "results" / f"trainpy-cpu-{kind}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine, "budget": budget, "steps": steps, "before": before,
                               "variants": variants, "runs": rows}, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=120)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", default="HEAD")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--steps", type=int, help="train exactly this many steps in-process instead")
    p.add_argument("--only", nargs="*", help="run only these variants (by name)")
    p.add_argument("--first-seed", type=int, default=42, help="with --steps: seeds from here up")
    a = p.parse_args()
    main(a.budget, a.repeats, a.before, a.variant, a.steps, a.only, a.first_seed)
