"""A lever measured and not kept: the MLP's matmuls in float8 (bench/profile_gpu.py --float8).

On an H200 at the h100 preset's size (width 512) it made a training step 16 % slower, not
faster (docs/benchmarks.md): the float8 matmuls took 117 ms per step instead of 141, but finding
each tensor's largest value and casting it added 50 ms of reductions and 21 ms of element-wise
kernels. On wider models, where the matmuls dominate, it may pay; this file keeps it runnable.

    from float8_mlp import use_float8_mlp  # with bench/ on sys.path
    use_float8_mlp(train_py)  # train_py: a loaded train.py module; every MLP now runs in float8
"""

import torch
import torch.nn.functional as F


def to_float8(t, dtype):
    """t in float8 and the scale back (t ≈ t8 * scale): one scale for the whole tensor, chosen so
    that its largest magnitude lands on float8's largest value."""
    scale = t.detach().abs().amax().float().clamp_min(1e-30) / torch.finfo(dtype).max
    return (t.float() / scale).to(dtype), scale


class Float8Linear(torch.autograd.Function):
    """x @ w.T with all three matmuls (forward, and the backward's two) on float8 tensor cores:
    twice bf16's FLOP/s on a Hopper card. x and w go to e4m3 (more precision), the gradient to
    e5m2 (more range). torch._scaled_mm takes its second operand column-major, hence the .t()s;
    compiled, each cast and transpose fuses into one pass over the tensor."""

    @staticmethod
    def forward(ctx, x, w):
        x8, sx = to_float8(x, torch.float8_e4m3fn)
        w8, sw = to_float8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, sx, w8, sw)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = to_float8(grad, torch.float8_e5m2)
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=grad.dtype)
        dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=sg, scale_b=sx,
                              out_dtype=torch.float32)
        return dx, dw


def use_float8_mlp(train_py):
    """Make every MLP of the train.py module `train_py` run its two matmuls in float8 (CUDA sm89+)."""

    def forward(self, x):
        h = F.relu(Float8Linear.apply(x.flatten(0, -2), self.c_fc.weight)).square()  # ReLU²
        return Float8Linear.apply(h, self.c_proj.weight).view_as(x)

    train_py.MLP.forward = forward
