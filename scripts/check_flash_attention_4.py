"""Does FlashAttention 4 run on this machine? scripts/setup_venv.sh runs this after installing it.

    python scripts/check_flash_attention_4.py

flash-attn-4 can install fine and still fail when its kernels compile or load (a driver too old
for its CUDA toolchain, say). train.py's ATTENTION_KERNEL = "auto" picks it whenever it imports,
so such a machine would crash every run. This runs a tiny forward and backward through the
custom op train.py itself uses, with a sliding window and plain causal, and compares them with
PyTorch's attention. Exit status 0 if both match; otherwise it says what failed and exits 1,
and setup_venv.sh uninstalls flash-attn-4, so "auto" picks FlexAttention instead.
"""

import sys

import torch
import torch.nn.functional as F

from autoresearch_lib.baseline import as_module, render_train_py


def main() -> int:
    if not torch.cuda.is_available():
        print("check: no CUDA GPU here, so FlashAttention 4 cannot run")
        return 1
    train_py = as_module(render_train_py("h100"))
    if not train_py.fa4_installed():
        print("check: flash-attn-4 is not installed, or lacks the two functions train.py calls")
        return 1
    train_py.register_flash_attention_4()
    torch.manual_seed(0)
    B, T, H, D = 2, 256, 2, 128
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    i = torch.arange(T, device="cuda")
    for window in (64, T):
        try:
            got = torch.ops.autoresearch.fa4(q, k, v, window)[0]
            got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - whatever broke, the verdict is the same
            print(f"check: FlashAttention 4 failed to run here: {type(e).__name__}: {str(e)[:500]}")
            return 1
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                              attn_mask=allowed).transpose(1, 2)
        want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
        gap = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                  for a, b in zip((got, *got_grads), (want, *want_grads)))
        if not gap < 0.05:  # bf16 rounding is ~0.01
            print(f"check: FlashAttention 4 runs but gives wrong results here (window {window}: "
                  f"largest relative gap {gap:.3g} from PyTorch's attention)")
            return 1
    print("check: FlashAttention 4 runs and matches PyTorch's attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
