"""Where does a training step of the h100 preset spend its time? (a GPU tool, not a test)

    python bench/profile_gpu.py [--windows SSSL L] [--steps 30] [--profile]
                                [--flex-options '{"BLOCK_M": 128}'] [--mode max-autotune-no-cudagraphs]
    python bench/profile_gpu.py --attention [--autotune]

The first form builds the baseline model at the h100 preset's size and times whole optimizer
steps as the harness does (the real packing loader on random documents, a device sync and the
loss read back after every step): median, mean and slowest step, and the optimizer step alone.
--profile prints the top CUDA kernels of one step and their total time by kind; --gaps TRACE
profiles the CPU too and reports how long the card sits idle between kernels, and why.

The second form times attention alone (forward + backward, batch 128 x 4 heads x 2048 x 128):
SDPA's full causal kernels against FlexAttention's half-length sliding window, with the
FlexAttention kernel options worth trying, and FlashAttention 4 (train.py's "fa4" kernel) if
flash-attn-4 is installed, checked against a dense mask.
"""

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.profiler import record_function

from autoresearch_lib import data
from autoresearch_lib.baseline import render_train_py

B, T, V = 128, 2048, 8192  # the h100 preset: 2 micro-batches of 128 x 2048 = 2^19 tokens per step


def load_train_module(script=None):
    path = "/tmp/train_h100.py"
    open(path, "w").write(open(script).read() if script else render_train_py("h100"))
    spec = importlib.util.spec_from_file_location("train_h100", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_h100"] = module
    spec.loader.exec_module(module)
    return module


def random_documents(n_tokens=20_000_000, seed=0):
    """Random tokens cut into documents of 100-3000 tokens, each starting with BOS (= V - 1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V - 1, n_tokens, dtype=np.int64).astype(np.uint16)
    starts = np.cumsum(rng.integers(100, 3000, n_tokens // 100))
    tokens[starts[starts < n_tokens]] = V - 1
    tokens[0] = V - 1
    return tokens


def step_times(step, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        float(step())  # the harness reads the loss back after every step: a device sync
        times.append(time.perf_counter() - t0)
    return times


def describe(label, times):
    med, mean = statistics.median(times), statistics.fmean(times)
    print(f"  {label}: median {med * 1000:.1f} ms ({2 * B * T / med:,.0f} tok/s) | mean {mean * 1000:.1f} ms "
          f"({2 * B * T / mean:,.0f} tok/s) | max {max(times) * 1000:.0f} ms", flush=True)
    return dict(median_ms=med * 1000, mean_ms=mean * 1000, max_ms=max(times) * 1000,
                median_tok_s=2 * B * T / med, mean_tok_s=2 * B * T / mean)


def bench_steps(m, pattern, steps, profile=False, mode=None, plain_loss=False, regional=False, float8=False, levers=(),
                gaps=None):
    torch.manual_seed(0)
    t_build = time.time()
    width = m.DEPTH * m.ASPECT_RATIO
    cfg = m.GPTConfig(sequence_len=T, vocab_size=V, n_layer=m.DEPTH, n_head=width // m.HEAD_DIM,
                      n_embd=width, window_pattern=pattern)
    with torch.device("cuda"):  # as train.py's main(): built on the card
        model = m.GPT(cfg)
    model.init_weights()
    opts = m.make_optimizers(model, fused=True)
    if plain_loss:  # F.cross_entropy on the soft-capped logits, instead of the model's own loss
        loss_fn = lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # noqa: E731
    elif regional:  # each block compiled on its own; identical blocks share the compiled code
        for block in model.blocks:
            block.compile(dynamic=False, mode=mode)
        loss_fn = model
    else:
        loss_fn = model  # model(x, y) is the loss
    if not regional:
        loss_fn = torch.compile(loss_fn, dynamic=False, mode=mode)
    model.masks(T, "cuda")  # as train.py's main(): built before the first compiled call
    loader = data.make_dataloader(random_documents(), V - 1, B, T, "cuda")
    x, y, _ = next(loader)
    t_built = time.time()

    def step():  # the phases are named for --gaps (record_function costs nothing unprofiled)
        nonlocal x, y
        for i in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16), record_function(f"phase: forward {i + 1}"):
                loss = loss_fn(x, y)
            with record_function(f"phase: backward {i + 1}"):
                (loss / 2).backward()
            with record_function(f"phase: loader {i + 1}"):
                x, y, _ = next(loader)
        with record_function("phase: optimizer"):
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.time()
    float(step())
    t1 = time.time()
    for _ in range(2):
        float(step())
    t3 = time.time()
    print(f"windows {pattern} ({m.ATTENTION_KERNEL}{', float8 MLP' if float8 else ''}{''.join(', ' + k for k in levers)})"
          f"{' (F.cross_entropy)' if plain_loss else ''}"
          f"{' regional' if regional else ''}: model and loader {t_built - t_build:.1f} s, step 1 "
          f"(compilation) {t1 - t0:.1f} s, steps 2-3 {t3 - t1:.1f} s", flush=True)
    names, seconds = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)  # by phase
    phases = {n: round(float(t), 2) for n, t in zip(names, seconds)}
    print("  compile phases (s):", phases, flush=True)
    result = dict(windows=pattern, kernel=m.ATTENTION_KERNEL, float8_mlp=float8, levers=list(levers), mode=mode, plain_loss=plain_loss,
                  regional=regional, compile_phases=phases, build_s=t_built - t_build, step1_s=t1 - t0, warmup_s=t3 - t1,
                  steps=describe("steps", step_times(step, steps)))
    # the optimizer alone, after one more backward
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (loss_fn(x, y) / 2).backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for o in opts:
        o.step()
    torch.cuda.synchronize()
    result["optimizer_ms"] = (time.perf_counter() - t0) * 1000
    print(f"  optimizer step alone: {result['optimizer_ms']:.1f} ms", flush=True)
    model.zero_grad(set_to_none=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            float(step())
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
        result["kernel_ms"] = kernel_categories(p)
    if gaps:
        result["gaps"] = idle_gaps(step, gaps)
    return result


def idle_gaps(step, trace_path, n_steps=3):
    """When is the card idle inside a step, and what was the CPU doing then? Profiles a few steps
    (CPU and CUDA), writes the Chrome trace to trace_path, and reports the idle time between
    kernels: in total per step, by the phase the CPU was in when it launched the kernel that ended
    the gap, and the longest gaps. A gap whose kernel was launched late (the launch call ends
    inside the gap) is the CPU's fault; one launched early is the card waiting on something else."""
    from torch.profiler import ProfilerActivity, profile as prof

    float(step())
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n_steps):
            with record_function("phase: step"):
                loss = step()
                with record_function("phase: read loss"):
                    float(loss)
    p.export_chrome_trace(trace_path)
    events = [e for e in json.load(open(trace_path))["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events  # Triton launches through the driver API
                if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    phases = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("phase: ")
                     and e["name"] != "phase: step"), key=lambda e: e["ts"])
    steps = [e for e in events if e.get("name") == "phase: step"]

    def phase_at(ts):
        inside = [e["name"][7:] for e in phases if e["ts"] <= ts <= e["ts"] + e["dur"]]
        return inside[-1] if inside else "between steps"

    gaps, by_phase, busy = [], {}, sum(k["dur"] for k in kernels)
    for before, after in zip(kernels, kernels[1:]):
        idle = after["ts"] - (before["ts"] + before["dur"])
        if idle <= 0:
            continue
        launch = launches.get(after["args"].get("correlation"))
        late = launch is not None and launch["ts"] + launch["dur"] > before["ts"] + before["dur"]
        phase = phase_at(launch["ts"] if launch else after["ts"])
        when = "launched late" if late else "launched in time" if launch else "launch not found"
        by_phase[f"{phase} ({when})"] = by_phase.get(f"{phase} ({when})", 0) + idle
        gaps.append(dict(us=idle, phase=phase, late=late, when=when, before=before["name"][:70],
                         after=after["name"][:70], launch_call=launch["name"] if launch else None))
    wall = sum(e["dur"] for e in steps) / len(steps)
    total = sum(g["us"] for g in gaps) / n_steps
    print(f"  idle gaps: step {wall / 1000:.1f} ms, kernels {busy / n_steps / 1000:.1f} ms, idle between kernels "
          f"{total / 1000:.1f} ms per step ({len(gaps) // n_steps} gaps)", flush=True)
    for key, us in sorted(by_phase.items(), key=lambda kv: -kv[1]):
        print(f"    {key:<48} {us / n_steps / 1000:7.2f} ms per step", flush=True)
    longest = sorted(gaps, key=lambda g: -g["us"])[:25]
    for g in longest:
        print(f"    {g['us']:8.0f} us  {g['phase']:<12} {g['when']:<17} "
              f"{g['before'][:40]} -> {g['after'][:40]} ({g['launch_call']})", flush=True)
    return dict(step_ms=wall / 1000, kernel_ms=busy / n_steps / 1000, idle_ms=total / 1000,
                by_phase_ms={k: v / n_steps / 1000 for k, v in by_phase.items()}, longest=longest)


def kernel_categories(p):
    """CUDA time of one step by kind of kernel, in ms."""
    kinds = [("attention", ("flex", "attention", "fmha", "cudnn", "flash")),
             ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90")),
             ("embedding", ("embedding", "index", "sort", "radix", "scatter")),
             ("fused reduction (norms, loss)", ("triton_red", "triton_per")),
             ("fused element-wise", ("triton_poi",)), ("copies", ("copy", "memcpy", "memset", "fill"))]
    totals = {}
    for e in p.key_averages():
        if e.device_type.name != "CUDA":  # kernels only: CPU-side ops would count them twice
            continue
        t = getattr(e, "self_device_time_total", 0) / 1000
        name = e.key.lower()
        kind = next((k for k, words in kinds if any(w in name for w in words)), "other")
        totals[kind] = totals.get(kind, 0) + t
    for k, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<32} {t:8.1f} ms")
    return totals


# ------------------------------------------------------------------------------ attention alone

# Not here: ROWS_GUARANTEED_SAFE / BLOCKS_ARE_CONTIGUOUS. They time faster, but with this mask
# (torch 2.11, H200) they returned NaN or wrong outputs and gradients: always check correctness.
FLEX_OPTIONS = {
    "default": {},
    "tma": {"USE_TMA": True},
    "fwd 128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "fwd 128x64 w8 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "bwd 64x128 / 128x64 w8 s2": {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64,
                                   "num_warps": 8, "num_stages": 2},
    "bwd 32x128 / 128x32 w4 s3": {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32,
                                   "num_warps": 4, "num_stages": 3},
}


def time_fwd_bwd(fn, q, k, v, go, n=20):
    def once():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(go)
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        once()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1000


def bench_attention(autotune=False, sweep=False):
    from torch.nn.attention import flex_attention as fa
    print("FlexKernelOptions keys:", sorted(getattr(fa, "FlexKernelOptions", dict).__annotations__), flush=True)
    torch._dynamo.config.recompile_limit = 64  # one compilation per set of kernel options
    H, D, W = 4, 128, T // 2
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    causal_flops = 4 * B * H * D * T * (T + 1) / 2 * 3.5  # fwd + bwd (2.5x fwd), useful FLOPs only
    window_flops = 4 * B * H * D * (W * (W + 1) / 2 + (T - W) * W) * 3.5
    rows = {}

    def report(name, ms, flops):
        rows[name] = dict(ms=ms, tflops=flops / ms / 1e9)
        print(f"  {name:<40} {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s (useful)", flush=True)

    for name, backend in [("SDPA causal (default choice)", None), ("SDPA causal cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("SDPA causal flash", SDPBackend.FLASH_ATTENTION)]:
        def sdpa(q, k, v, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            report(name, time_fwd_bwd(sdpa, q, k, v, go), causal_flops)
        except Exception as e:  # noqa: BLE001 - a backend may be missing on this card
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")

    i = torch.arange(T, device="cuda")
    causal_mask = i[None, :] <= i[:, None]
    window_mask = causal_mask & (i[:, None] - i[None, :] < W)
    # the same inputs in (B, T, H, D), the layout FlashAttention takes
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    go_t = go.transpose(1, 2).contiguous()

    def gaps(name, fn, allowed):
        """Largest gaps of fn (B T H D in and out) from SDPA with the dense mask `allowed`: output, grads."""
        few = [t[:2].detach().requires_grad_() for t in (qt, kt, vt)]
        want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in few), attn_mask=allowed).transpose(1, 2)
        got = fn(*few)
        pairs = zip(torch.autograd.grad(got, few, go_t[:2]), torch.autograd.grad(want, few, go_t[:2]))
        found = rows[f"{name} gaps"] = [(got - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in pairs]
        print(f"  {name} vs dense mask: largest gap output {found[0]:.3g}, grads {max(found[1:]):.3g}", flush=True)

    # PyTorch's FlashAttention kernels with a window
    def flash(q, k, v, window=W):  # (B, T, H, D)
        return torch.ops.aten._flash_attention_forward(q, k, v, None, None, T, T, 0.0, True, False,
                                                       window_size_left=window - 1, window_size_right=0)[0]

    def flash_from_bhtd(q, k, v, window=W):  # as train.py's other kernels hold q, k, v: transposed views
        return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window).transpose(1, 2)

    try:
        gaps("flash window", flash, window_mask)
        report("flash window (aten, B T H D in)", time_fwd_bwd(flash_from_bhtd, q, k, v, go), window_flops)
        report("flash causal (aten)", time_fwd_bwd(lambda q, k, v: flash_from_bhtd(q, k, v, T + 1), q, k, v, go),
               causal_flops)
        report("flash window (aten, contiguous B T H D)", time_fwd_bwd(flash, qt, kt, vt, go_t), window_flops)
        report("flash window (aten) under torch.compile",
               time_fwd_bwd(torch.compile(flash_from_bhtd, dynamic=False), q, k, v, go), window_flops)
    except Exception as e:  # noqa: BLE001 - older torch: no window arguments
        print(f"  flash window: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    # FlashAttention 4 (flash-attn-4, if installed) through train.py's custom op
    m = load_train_module()
    if m.fa4_installed():
        m.register_flash_attention_4()

        def fa4(window):
            return lambda q, k, v: torch.ops.autoresearch.fa4(q, k, v, window)[0]

        t0 = time.time()
        for window in (W, T):
            time_fwd_bwd(fa4(window), qt, kt, vt, go_t, n=1)
        rows["fa4 first calls (kernel compilation) s"] = time.time() - t0
        print(f"  fa4: first calls (compiling its kernels) {time.time() - t0:.1f} s", flush=True)
        gaps(f"fa4 window {W}", fa4(W), window_mask)
        gaps(f"fa4 window {T}", fa4(T), causal_mask)
        report("fa4 window", time_fwd_bwd(fa4(W), qt, kt, vt, go_t), window_flops)
        report("fa4 causal", time_fwd_bwd(fa4(T), qt, kt, vt, go_t), causal_flops)
        report("fa4 window under torch.compile", time_fwd_bwd(torch.compile(fa4(W), dynamic=False), qt, kt, vt, go_t),
               window_flops)
    else:
        print("  fa4: flash-attn-4 is not installed", flush=True)

    window = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < W), None, None, T, T, device="cuda")
    causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    report("flex causal (default)", time_fwd_bwd(lambda q, k, v: compiled(q, k, v, block_mask=causal), q, k, v, go),
           causal_flops)
    for name, opts in FLEX_OPTIONS.items() if sweep else [("default", {})]:
        try:
            ms = time_fwd_bwd(lambda q, k, v: compiled(q, k, v, block_mask=window, kernel_options=opts), q, k, v, go)
            report(f"flex window {name}", ms, window_flops)
        except Exception as e:  # noqa: BLE001 - a config may not fit the card's shared memory
            print(f"  flex window {name}: failed: {type(e).__name__}: {str(e)[:200]}")
    if autotune:
        tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
        t0 = time.time()
        ms = time_fwd_bwd(lambda q, k, v: tuned(q, k, v, block_mask=window), q, k, v, go)
        report(f"flex window max-autotune ({time.time() - t0:.0f} s incl. tuning)", ms, window_flops)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", nargs="+", default=["SSSL", "L"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--flex-options", type=json.loads, default=None, help="FlexAttention kernel_options (JSON)")
    ap.add_argument("--plain-loss", action="store_true", help="also time F.cross_entropy as the loss")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--kernel", help="train.py's ATTENTION_KERNEL: fa4, flex or mask")
    ap.add_argument("--float8", action="store_true", help="the MLP's matmuls in float8 (bench/float8_mlp.py)")
    ap.add_argument("--lever", action="append", default=[], help="a lever of bench/step_levers.py (repeatable)")
    ap.add_argument("--cache-custom-functions", action="store_true",
                    help="AOTAutograd's cache also for graphs with a custom autograd.Function (the loss)")
    ap.add_argument("--regional", action="store_true", help="compile each block and the head, not the model")
    ap.add_argument("--attention", action="store_true", help="time attention kernels alone")
    ap.add_argument("--autotune", action="store_true", help="with --attention: also max-autotune FlexAttention")
    ap.add_argument("--sweep", action="store_true", help="with --attention: every FlexAttention option set")
    ap.add_argument("--script", help="a train.py at the h100 size to time instead of the baseline")
    ap.add_argument("--gaps", metavar="TRACE", help="also profile CPU and card: idle gaps, Chrome trace written here")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
    if a.attention:
        results = bench_attention(a.autotune, a.sweep)
    else:
        m = load_train_module(a.script)
        if a.flex_options is not None:
            m.flex_attention = functools.partial(flex_attention, kernel_options=a.flex_options)
        if a.kernel:
            m.ATTENTION_KERNEL = a.kernel
        if a.float8:
            from float8_mlp import use_float8_mlp  # bench/ is on the path: this script's folder

            use_float8_mlp(m)
        from step_levers import LEVERS, check_quack_mlp

        if "quack-mlp" in a.lever:
            check_quack_mlp(m)
        for lever in a.lever:
            LEVERS[lever](m)
        if a.cache_custom_functions:  # let AOTAutograd cache graphs holding an autograd.Function
            torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
        results = [bench_steps(m, w, a.steps, a.profile, a.mode, regional=a.regional, float8=a.float8, levers=a.lever,
                               gaps=a.gaps)
                   for w in a.windows]
        if a.plain_loss:
            results.append(bench_steps(m, a.windows[0], a.steps, a.profile, a.mode, plain_loss=True))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
