#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md's train.py section, on one card.
#
#   bench/trainpy_gpu_session.sh STAGE OUTDIR     (STAGE: first or second)
#
# Each stage fits one 10-minute command. `first`: cold starts, the T4 path (fp16, windows through
# the mask kernel) and a rough sweep of small-data candidates, several at once. `second`: upstream
# and ours side by side (a short cold run fills each one's compile cache, then 60 s warm), the
# loss A/B, and the small-data preset alone on the card. `levers`: attention kernels alone, then
# whole steps in-process (bench/profile_gpu.py) with each window kernel, AOTAutograd's cache for
# the custom loss, and regional compilation, each cold then warm. `table`: the side-by-side table
# of docs/benchmarks.md in one call (start-up cold and three times warm, 60 s runs) and the T4 path.
# Needs the prepared Shakespeare caches in $AUTORESEARCH_CACHE (vocab 2048 and 8192, made with
# autoresearch_lib.prepare on any machine) and upstream's train.py at bench/.upstream/train.py
# (`git show HEAD:train.py` of karpathy/autoresearch; not part of this repository).
set -u
OUT=${2:?an output folder}
B="python3 bench/bench_trainpy_gpu.py"
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

case $1 in
levers)
  P="python3 bench/profile_gpu.py --windows SSSL"
  $P --attention --out "$OUT/attention.json"
  for variant in "--kernel flex" "--kernel flex --cache-custom-functions" "--kernel flex --cache-custom-functions --regional"; do
    export TORCHINDUCTOR_CACHE_DIR=/tmp/cc-levers-${#variant}/inductor TRITON_CACHE_DIR=/tmp/cc-levers-${#variant}/triton
    $P $variant --steps 20  # cold
    $P $variant --steps 10  # warm
  done
  unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
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
