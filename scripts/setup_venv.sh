#!/usr/bin/env bash
# Create (or reuse) the virtualenv in $VENV and install the kit with its test tools.
# torch is chosen with care: an existing torch is kept (Colab's, yours); with an NVIDIA GPU the
# default (CUDA) build is installed; on a CPU-only machine the CPU build is used, never the
# multi-GB CUDA one: a local CPU wheel if pip can find one offline, else PyTorch's CPU index.
# On a Hopper or Blackwell card it adds FlashAttention 4 (the `hopper` extra).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$PY" -c 'import torch' 2>/dev/null; then
  echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing torch with CUDA"
  pip_install "torch>=2.5"
else
  echo "setup: no NVIDIA GPU, installing a CPU build of torch"
  # a CPU wheel pip can find without an index (e.g. a local wheel folder), then its dependencies
  if pip_install --no-index --no-deps "torch==$TORCH_CPU_VERSION" 2>/dev/null; then
    pip_install "torch==$TORCH_CPU_VERSION"
  else
    pip_install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_install -e ".[test]"
# Hopper or datacenter Blackwell (sm90, sm100): FlashAttention 4, optional (train.py falls back to FlexAttention)
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10))' 2>/dev/null; then
  echo "setup: Hopper/Blackwell GPU found, installing FlashAttention 4 (flash-attn-4)"
  if ! pip_install -e ".[hopper]"; then
    echo "setup: flash-attn-4 did not install; train.py uses FlexAttention instead"
  elif ! "$PY" scripts/check_flash_attention_4.py; then
    echo "setup: removing flash-attn-4 (it installed but does not run here); train.py uses FlexAttention instead"
    "$PY" -m pip uninstall --quiet --yes flash-attn-4
  fi
fi
echo "setup: ready ($("$PY" -c 'import torch, autoresearch_lib; print("torch", torch.__version__)'))"
