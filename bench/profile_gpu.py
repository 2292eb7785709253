"""Where does a training step of the h100 preset spend its time? (a GPU tool, not a test)

    python bench/profile_gpu.py [--windows SSSL L] [--profile]

Builds the baseline model at the h100 preset's size on random tokens and times forward +
backward + optimizer steps for each attention window pattern; --profile prints the top CUDA
kernels of one step.
"""

import argparse
import importlib.util
import sys
import time

import torch
import torch.nn.functional as F

from autoresearch_lib.baseline import TRAIN_PY, render_train_py


def load_train_module():
    path = "/tmp/train_h100.py"
    open(path, "w").write(render_train_py("h100"))
    spec = importlib.util.spec_from_file_location("train_h100", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_h100"] = module
    spec.loader.exec_module(module)
    return module


def bench(m, pattern, steps=10, profile=False, B=128, T=2048, V=8192, mode=None):
    torch.manual_seed(0)
    width = m.DEPTH * m.ASPECT_RATIO
    cfg = m.GPTConfig(sequence_len=T, vocab_size=V, n_layer=m.DEPTH, n_head=width // m.HEAD_DIM,
                      n_embd=width, window_pattern=pattern)
    model = m.GPT(cfg).cuda()
    model.init_weights()
    opts = m.make_optimizers(model, fused=True)
    loss_fn = torch.compile(lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten()), dynamic=False,
                            mode=mode)
    x = torch.randint(0, V, (B, T), device="cuda")
    def step():
        for _ in range(2):  # 2^19 tokens per step = 2 micro-batches
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(x, x)
            (loss / 2).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss
    t0 = time.time()
    for _ in range(3):
        step().item()
    compile_s = time.time() - t0
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.time() - t0) / steps
    print(f"windows {pattern}: {dt * 1000:.0f} ms/step, {2 * B * T / dt:,.0f} tok/s "
          f"(compile+warm-up {compile_s:.0f}s)", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", nargs="+", default=["SSSL", "L"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tune", action="store_true", help="inductor coordinate-descent tuning")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    a = ap.parse_args()
    m = load_train_module()
    if a.tune:
        torch._inductor.config.coordinate_descent_tuning = True
    for w in a.windows:
        bench(m, w, steps=a.steps, profile=a.profile, mode=a.mode)
