#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md's train.py section, on one card.
#
#   bench/trainpy_gpu_session.sh STAGE OUTDIR     (STAGE: first, second, levers, fa4, fa4-levers, step-levers, softcap, gaps, inductor, last, table)
#
# Each stage fits one 10-minute command. `first`: cold starts, the T4 path (fp16, windows through
# the mask kernel) and a rough sweep of small-data candidates, several at once. `second`: upstream
# and ours side by side (a short cold run fills each one's compile cache, then 60 s warm), the
# loss A/B, and the small-data preset alone on the card. `levers`: attention kernels alone, then
# whole steps in-process (bench/profile_gpu.py) with each window kernel, AOTAutograd's cache for
# the custom loss, and regional compilation, each cold then warm. `fa4` (flash-attn-4 installed):
# attention kernels alone, then whole steps with FlashAttention 4 and FlexAttention, cold and warm;
# `fa4-levers`, after it: a profiled step, the float8 MLP, max-autotune. `step-levers` and
# `softcap` (flash-attn-4 installed): bench/step_levers.py's levers against the unedited step.
# `gaps` (flash-attn-4 installed): how long the card idles inside a step (profile_gpu.py --gaps,
# Chrome trace kept), then the loss's two Inductor switches (fast-math, two-pass log-sum-exp).
# `inductor` (flash-attn-4 installed): Inductor's own switches (bench/step_levers.py; $LEVERS picks
# which) against the unedited step, which is timed before and after them.
# `last` (flash-attn-4 installed): the levers no earlier stage reached (quack's autotuned GEMMs for
# the MLP, cuBLASLt, Inductor's 2-D tiling; $LEVERS picks), each with a time limit ($LEVER_LIMIT s), between two unedited runs.
# `table`: the side-by-side table of docs/benchmarks.md in one call (start-up cold and three
# times warm, 60 s runs) and the T4 path.
# Needs the prepared Shakespeare caches in $AUTORESEARCH_CACHE (vocab 2048 and 8192, made with
# autoresearch_lib.prepare on any machine) and upstream's train.py at bench/.upstream/train.py
# (`git show HEAD:train.py` of karpathy/autoresearch; not part of this repository). flash-attn-4
# must be importable from a site folder (pip install, or a .pth file), not only from $PYTHONPATH:
# the runner gives the kit's runs a clean PYTHONPATH, and a run that can't import it silently falls
# back to FlexAttention. Each row of `ours` records the kernel it ran ("attention").
set -u
OUT=${2:?an output folder}
B="python3 bench/bench_trainpy_gpu.py"
STEPS="python3 bench/profile_gpu.py --windows SSSL"  # whole steps in-process (or --attention alone)
FA4_STEPS="$STEPS --cache-custom-functions --kernel fa4"
ROWS="$OUT/trainpy-rows.jsonl"  # written as the runs end: a stage cut short keeps its rows
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_capability())"

sweep() {  # several small-data candidates at once: a rough ranking (they share the card)
  $B ours --preset small-data --budget "$1" --label "sd-d4-b$1" --set DEPTH=4 --out "$ROWS" &
  $B ours --preset small-data --budget "$1" --label "sd-d6-b$1" --out "$ROWS" &
  $B ours --preset small-data --budget "$1" --label "sd-d6-wd0.8-b$1" --set WEIGHT_DECAY=0.8 --out "$ROWS" &
  $B ours --preset small-data --budget "$1" --label "sd-d8-b$1" --set DEPTH=8 --set HEAD_DIM=128 \
     --set TOTAL_BATCH_SIZE=65536 --out "$ROWS" &
  wait
}

cached() {  # torch.compile's and FlashAttention 4's on-disk caches in $1 (for profile_gpu.py runs)
  export TORCHINDUCTOR_CACHE_DIR=$1/inductor TRITON_CACHE_DIR=$1/triton \
         FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$1/flash_attn
}

case $1 in
levers)
  P=$STEPS
  $P --attention --out "$OUT/attention.json"
  n=0
  for variant in "--kernel flex" "--kernel flex --cache-custom-functions" "--kernel flex --cache-custom-functions --regional"; do
    n=$((n + 1))
    cached /tmp/cc-levers-$n
    $P $variant --steps 20  # cold
    $P $variant --steps 10  # warm
  done
  ;;
fa4)  # needs flash-attn-4 installed: FlashAttention 4 against FlexAttention, each cold then warm
  P="$STEPS --cache-custom-functions"
  cached /tmp/cc-attention
  $P --attention --out "$OUT/attention.json"
  for kernel in fa4 flex; do
    cached /tmp/cc-$kernel
    $P --kernel $kernel --steps 20 --out "$OUT/steps-$kernel-cold.json"
    $P --kernel $kernel --steps 20 --out "$OUT/steps-$kernel-warm.json"
  done
  ;;
fa4-levers)  # after `fa4` on the same machine: where a step goes, float8 MLP, max-autotune
  P=$FA4_STEPS
  cached /tmp/cc-fa4
  $P --steps 20 --profile --out "$OUT/fa4-bf16-warm.json"
  $P --steps 20 --float8 --out "$OUT/fa4-fp8-cold.json"
  $P --steps 20 --float8 --profile --out "$OUT/fa4-fp8-warm.json"
  cached /tmp/cc-max-autotune
  $P --steps 20 --mode max-autotune-no-cudagraphs --out "$OUT/fa4-maxautotune-cold.json"
  ;;
step-levers)  # needs flash-attn-4 (and so quack): bench/step_levers.py's levers against the unedited step
  P=$FA4_STEPS
  cached /tmp/cc-step-levers
  $P --steps 20 --profile --out "$OUT/base-cold.json"
  $P --steps 30 --out "$OUT/base-warm.json"
  for lever in qkv muon quack-mlp; do
    $P --steps 30 --lever $lever --out "$OUT/$lever.json"
  done
  $P --steps 30 --lever qkv --lever muon --lever quack-mlp --profile --out "$OUT/all.json"
  $P --steps 30 --out "$OUT/base-warm-2.json"
  ;;
gaps)  # needs flash-attn-4: idle time inside a step, then two Inductor switches for the loss
  P=$FA4_STEPS
  cached /tmp/cc-gaps
  $P --steps 20 --profile --gaps /tmp/trace-base.json --out "$OUT/base.json"
  gzip -c /tmp/trace-base.json > "$OUT/trace-base.json.gz"  # open in chrome://tracing or Perfetto
  for lever in two-pass-lse fast-math; do
    $P --steps 20 --profile --lever $lever --out "$OUT/$lever.json"
  done
  ;;
inductor)  # needs flash-attn-4: Inductor's switches against the unedited step, each compiled cold
  P=$FA4_STEPS
  cached /tmp/cc-inductor
  $P --steps 10 --out "$OUT/base-cold.json"
  $P --steps 30 --out "$OUT/base-1.json"
  for lever in ${LEVERS:-combo-kernels aggressive-fusion multi-kernel nd-tiling tile-reductions tma-gemm}; do
    $P --steps 30 --lever $lever --out "$OUT/$lever.json"
  done
  $P --steps 30 --out "$OUT/base-2.json"
  ;;
last)  # needs flash-attn-4: the levers not reached before (quack autotuned, 2-D tiling), each cold
  P=$FA4_STEPS
  cached /tmp/cc-last
  export QUACK_CACHE_DIR=/tmp/cc-last/quack
  $P --steps 10 --out "$OUT/base-cold.json"
  $P --steps 30 --out "$OUT/base-1.json"
  for lever in ${LEVERS:-cublaslt quack-mlp-tuned nd-tiling tile-reductions}; do
    timeout ${LEVER_LIMIT:-110} $P --steps 30 --lever $lever --out "$OUT/$lever.json"
  done
  $P --steps 30 --out "$OUT/base-2.json"
  ;;
softcap)  # after `fa4`'s install: the soft-cap through sigmoid against tanh, warm, twice each;
  # then Inductor's coordinate-descent tuning, with either
  P=$FA4_STEPS
  cached /tmp/cc-softcap
  $P --steps 10 --out "$OUT/base-cold.json"
  $P --steps 10 --lever softcap-sigmoid --out "$OUT/sigmoid-cold.json"
  for n in 1 2; do
    $P --steps 30 --out "$OUT/base-$n.json"
    $P --steps 30 --lever softcap-sigmoid --profile --out "$OUT/sigmoid-$n.json"
  done
  for n in cold warm; do
    $P --steps 30 --lever tuning --out "$OUT/tuning-$n.json"
    $P --steps 30 --lever tuning --lever softcap-sigmoid --out "$OUT/tuning-sigmoid-$n.json"
  done
  ;;
table)
  $B upstream bench/.upstream/train.py --budget 5 --cache /tmp/cc-up --label upstream-cold --out "$ROWS"
  $B upstream bench/.upstream/train.py --budget 60 --cache /tmp/cc-up --label upstream-warm --out "$ROWS"
  $B ours --budget 5 --cache /tmp/cc-ours --label h100-cold --out "$ROWS"
  $B ours --budget 5 --cache /tmp/cc-ours --label h100-warm-5s --out "$ROWS"
  $B ours --budget 5 --cache /tmp/cc-ours --label h100-warm-5s-again --out "$ROWS"
  $B ours --budget 60 --cache /tmp/cc-ours --label h100-warm --out "$ROWS"
  $B ours --preset small-gpu --dtype fp16 --budget 10 --set "WINDOW_PATTERN='SSSL'" \
     --set "ATTENTION_KERNEL='mask'" --label t4-path-fp16-SSSL-mask --out "$ROWS"
  ;;
first)
  $B upstream bench/.upstream/train.py --budget 10 --cache /tmp/cc-up --label upstream-cold --out "$ROWS"
  $B ours --budget 10 --cache /tmp/cc-ours --label h100-cold --out "$ROWS"
  $B ours --preset small-gpu --dtype fp16 --budget 20 --set "WINDOW_PATTERN='SSSL'" \
     --set "ATTENTION_KERNEL='mask'" --label t4-path-fp16-SSSL-mask --out "$ROWS"
  sweep 10
  sweep 30
  ;;
second)
  $B upstream bench/.upstream/train.py --budget 5 --cache /tmp/cc-up --label upstream-cold --out "$ROWS"
  $B upstream bench/.upstream/train.py --budget 60 --cache /tmp/cc-up --label upstream-warm --out "$ROWS"
  $B ours --budget 5 --cache /tmp/cc-ours --label h100-cold --out "$ROWS"
  $B ours --budget 60 --cache /tmp/cc-ours --label h100-warm --out "$ROWS"
  # the loss as a recomputing checkpoint of F.cross_entropy instead of SoftcappedCrossEntropy
  [ -f bench/.upstream/train_checkpoint_loss.py ] && $B ours --budget 15 --cache /tmp/cc-ck \
     --script bench/.upstream/train_checkpoint_loss.py --label h100-checkpoint-loss-cold --out "$ROWS"
  for b in 3 6 10; do  # the small-data preset alone on the card, by budget (epochs)
    $B ours --preset small-data --budget $b --set WEIGHT_DECAY=0.8 --cache /tmp/cc-sd \
       --label "small-data-wd0.8-b$b" --out "$ROWS"
  done
  ;;
esac

[ -f "$ROWS" ] || exit 0  # the stage ran no bench_trainpy_gpu.py: its results are in $OUT
python3 - "$ROWS" <<'EOF'
import json, sys
keys = ["label", "status", "val_bpb", "tokens_per_second", "steady_tokens_per_second", "steady_step_ms",
        "peak_vram_mb", "steps", "epochs", "startup_seconds", "t_setup_done", "t_model_built",
        "t_step1", "t_step3", "t_step10", "startup_line"]
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(" | ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                     for k in keys if k in row))
    if row.get("error_tail"):
        print(row["error_tail"][-1500:])
EOF
