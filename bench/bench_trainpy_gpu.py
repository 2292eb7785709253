"""train.py on a GPU: ours against upstream's on the same card, start-up broken down, other paths.

    python bench/bench_trainpy_gpu.py ours [--preset h100] [--budget 60] [--set CONST=value ...] [--script F]
                                           [--dtype fp16] [--cache DIR] [--label NAME] [--out FILE]
    python bench/bench_trainpy_gpu.py upstream PATH/TO/upstream/train.py [--budget 60] [--cache DIR]

`ours` runs the kit's train.py (a preset's, with constants changed by --set) through
`autoresearch_lib.train`. `upstream` runs karpathy/autoresearch's train.py, read from PATH (it is
not part of this repository), with two stand-ins: FlashAttention-3 becomes
`F.scaled_dot_product_attention(..., is_causal=True)` (every layer full causal: SDPA has no
window) and prepare.py's data becomes random tokens of vocabulary 8192, sequence 2048.

Both time every line the training process prints (seconds since the process was asked for), so
start-up splits into: imports and data checks, model build, first step (compilation), warm-up.
--cache points torch.compile's caches (inductor, Triton) at DIR: an empty DIR is a cold start, a
DIR an earlier run filled is a warm one. Each run prints one JSON row and appends it to --out.
"""

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANDOM_VOCAB, SEQ_LEN = 8192, 2048


def use_cache(directory, which):
    """Point torch.compile's on-disk caches at `directory` (inherited by the child): for ours, the
    runner's root of per-script caches; for upstream, inductor's and Triton's folders."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        if which == "ours":
            os.environ["AUTORESEARCH_COMPILE_CACHE"] = str(directory)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(directory) / "inductor")
            os.environ["TRITON_CACHE_DIR"] = str(Path(directory) / "triton")


def first_time(lines, pattern):
    """Seconds at which the first line matching `pattern` appeared (None if none did)."""
    return next((t for t, line in lines if re.search(pattern, line)), None)


def steady_step_ms(lines, after_step):
    """Median step time in ms over the progress lines of steps > after_step."""
    times = []
    for _, line in lines:
        m = re.search(r"step (\d+).*?dt: (\d+)ms", line)
        if m and int(m[1]) > after_step:
            times.append(float(m[2]))
    return statistics.median(times) if times else None


def ours(args):
    import autoresearch_lib as ar
    from autoresearch_lib.baseline import render_train_py, set_constant

    source = Path(args.script).read_text() if args.script else render_train_py(args.preset)
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        source = set_constant(source, name, ast.literal_eval(value))
    if args.dtype:
        os.environ["AUTORESEARCH_DTYPE"] = args.dtype
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{args.preset}-"))
    (run_dir / "variant.py").write_text(source)
    lines, t0 = [], time.time()
    r = ar.train(preset=args.preset, budget=args.budget, script=run_dir / "variant.py",
                 run_dir=run_dir / "run", checkpoint=False, dataset=args.dataset,
                 on_line=lambda line: lines.append((time.time() - t0, line)))
    step_ms = steady_step_ms(lines, after_step=5)
    tokens_per_step = int(re.search(r"^TOTAL_BATCH_SIZE = (\S+)", source, re.MULTILINE)[1])
    return dict(
        status=r.status, reason=r.reason, val_bpb=r.val_bpb, precision=r.precision, device=r.device,
        tokens_per_second=r.tokens_per_second, steady_step_ms=step_ms,
        steady_tokens_per_second=tokens_per_step / step_ms * 1e3 if step_ms else None,
        peak_vram_mb=r.peak_vram_mb, steps=r.num_steps, epochs=r.epochs, params_M=r.num_params_M,
        startup_seconds=r.startup_seconds, total_seconds=r.total_seconds,
        t_setup_done=first_time(lines, r"^device: "), t_model_built=first_time(lines, r"^params: "),
        t_step1=first_time(lines, r"^step 00001"), t_step3=first_time(lines, r"^step 00003"),
        startup_line=next((line for _, line in lines if line.startswith("start-up:")), None),
        attention=next((m[1] for _, line in lines if (m := re.search(r"^params: .*\| attention (\w+)", line))), None),
        error_tail=None if r.ok else r.error_tail[-3000:])


def upstream(args):
    env = dict(os.environ, BENCH_BUDGET=str(args.budget), PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "_upstream_child", args.path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, pending = [], b""
    while chunk := proc.stdout.read1(65536):
        pending += chunk
        *done, pending = re.split(rb"[\r\n]", pending)  # upstream rewrites its progress line with \r
        lines += [(time.time() - t0, piece.decode(errors="replace")) for piece in done if piece.strip()]
    proc.wait()
    summary = {m[1]: float(m[2]) for _, line in lines if (m := re.match(r"^(\w+):\s+([\d.]+)$", line))}
    step_ms = steady_step_ms(lines, after_step=10)
    steps, seconds = summary.get("num_steps", 0), summary.get("training_seconds", 0)
    batch = 2**19
    return dict(
        status="ok" if proc.returncode == 0 else f"exit {proc.returncode}",
        tokens_per_second=(steps - 11) * batch / seconds if seconds else None,  # steps 0-10 untimed
        steady_step_ms=step_ms, steady_tokens_per_second=batch / step_ms * 1e3 if step_ms else None,
        peak_vram_mb=summary.get("peak_vram_mb"), steps=steps,
        t_model_built=first_time(lines, r"^Estimated FLOPs"), t_step1=first_time(lines, r"^step 00000"),
        t_step3=first_time(lines, r"^step 00002"), t_step10=first_time(lines, r"^step 00010"),
        total_seconds=summary.get("total_seconds"),
        error_tail=None if proc.returncode == 0 else "\n".join(line for _, line in lines[-30:]))


def upstream_child(path):
    """Run upstream's train.py with SDPA for FlashAttention-3 and random tokens for prepare.py."""
    import types

    import torch
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=True, window_size=None):  # (B, T, H, D) in and out
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)

    kernels = types.ModuleType("kernels")
    kernels.get_kernel = lambda repo: types.SimpleNamespace(
        flash_attn_interface=types.SimpleNamespace(flash_attn_func=flash_attn_func))

    class Tokenizer:
        @classmethod
        def from_directory(cls):
            return cls()

        def get_vocab_size(self):
            return RANDOM_VOCAB

    def make_dataloader(tokenizer, batch_size, seq_len, split):
        while True:
            row = torch.randint(0, RANDOM_VOCAB, (batch_size, seq_len + 1), device="cuda")
            yield row[:, :-1].contiguous(), row[:, 1:].contiguous(), 1  # upstream views targets flat

    prepare = types.ModuleType("prepare")
    prepare.MAX_SEQ_LEN, prepare.TIME_BUDGET = SEQ_LEN, float(os.environ["BENCH_BUDGET"])
    prepare.Tokenizer, prepare.make_dataloader = Tokenizer, make_dataloader
    prepare.evaluate_bpb = lambda model, tokenizer, batch_size: float("nan")  # throughput only
    sys.modules["kernels"], sys.modules["prepare"] = kernels, prepare
    import runpy

    runpy.run_path(path, run_name="__main__")


def main():
    if sys.argv[1:2] == ["_upstream_child"]:
        return upstream_child(sys.argv[2])
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["ours", "upstream"])
    p.add_argument("path", nargs="?", help="upstream's train.py")
    p.add_argument("--preset", default="h100")
    p.add_argument("--budget", type=float, default=60)
    p.add_argument("--script", help="a train.py to run instead of the preset's")
    p.add_argument("--set", action="append", default=[], help="CONST=value in train.py")
    p.add_argument("--dtype", help="AUTORESEARCH_DTYPE, e.g. fp16 for the T4 path")
    p.add_argument("--dataset", default="shakespeare")
    p.add_argument("--cache", help="torch.compile's cache folder (empty: a cold start)")
    p.add_argument("--label", default="")
    p.add_argument("--out")
    args = p.parse_args()
    use_cache(args.cache, args.which)
    import torch

    row = dict(label=args.label or args.which, which=args.which, preset=args.preset, budget=args.budget,
               set=args.set, dtype=args.dtype, cache=args.cache, date=time.strftime("%Y-%m-%d"),
               card=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               torch=torch.__version__)
    row.update(ours(args) if args.which == "ours" else upstream(args))
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
