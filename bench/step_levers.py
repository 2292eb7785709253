"""Levers on a training step of the h100 preset, applied to a loaded train.py module so that
bench/profile_gpu.py --lever NAME can time each against the unedited script in one call.
All were tried on an H200 and none was kept (docs/benchmarks.md, fifth, sixth, eighth and ninth
sessions): none made a step faster by more than noise, and some made it slower; nd-tiling and
tile-reductions compile for longer than 225 s (never finished), and quack-mlp-tuned fails with
quack 0.6.5 and nvidia-cutlass-dsl 4.8.1. They stay here, runnable, as the record.

    qkv         q, k and v from one matmul with the three weights concatenated (the same
                three parameters, so the optimizer sees the same matrices)
    muon        Muon's update compiled with torch.compile (one graph per stack of matrices)
    softcap-sigmoid  the soft-cap as LOGIT_SOFTCAP * (2 sigmoid(2x / LOGIT_SOFTCAP) - 1), the same
                function as LOGIT_SOFTCAP * tanh(x / LOGIT_SOFTCAP) in cheaper GPU instructions
                (Triton's tanh is a long libdevice routine; its sigmoid is one fast exp)
    tuning      Inductor's coordinate-descent tuning of its own (element-wise and reduction)
                kernels' block sizes: slower compilation, possibly faster kernels
    fast-math   Inductor's use_fast_math (flush-to-zero exp in its kernels)
    two-pass-lse  the loss's log-sum-exp in two passes instead of Inductor's online softmax
    combo-kernels      Inductor's horizontal fusion of independent kernels into one launch
    aggressive-fusion  Inductor fuses nodes even when they share no memory accesses
    multi-kernel       Inductor picks, per reduction, between its persistent and looped kernels by timing both
    nd-tiling          Inductor tiles element-wise kernels in 2-D (prefer_nd_tiling)
    tile-reductions    Inductor tiles reductions in 2-D too
    tma-gemm    the matmuls through Inductor's Triton templates as well as cuBLAS (max_autotune_gemm,
                persistent TMA kernels on Hopper), each shape timed, with the element-wise work
                around them fused into the Triton templates' epilogues where that wins
    quack-mlp   the MLP through quack's CuTe-DSL GEMMs (a dependency of flash-attn-4): ReLU²
                computed in the first matmul's epilogue and its derivative in the backward's,
                instead of separate element-wise passes over the 4x-wide hidden activations
                (tile configs from quack's heuristic)
    quack-mlp-tuned  the same with quack's autotuner picking each GEMM's tile configs
    cublaslt    every matmul through cuBLASLt instead of cuBLAS (PyTorch's preferred_blas_library)
"""

import functools

import torch
import torch.nn.functional as F


def fused_qkv(m):
    """One matmul for q, k and v (FlashAttention 4 path only: the one being tuned)."""

    def forward(self, x, ve, cos, sin, mask):
        B, T, C = x.shape
        w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        q, k, v = F.linear(x, w).split([self.c_q.out_features, self.c_k.out_features, self.c_v.out_features], -1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = m.norm(m.apply_rotary(q, cos, sin)), m.norm(m.apply_rotary(k, cos, sin))
        assert isinstance(mask, int), "the qkv lever is written for ATTENTION_KERNEL = 'fa4'"
        y = torch.ops.autoresearch.fa4(q, k, v, mask)[0]
        return self.c_proj(y.reshape(B, T, C))

    m.CausalSelfAttention.forward = forward


def compiled_muon(m):
    """Muon.update's arithmetic as one compiled function; the step's scalars go in as 0-d CPU
    tensors, so changing them every step does not recompile."""

    def update_math(params, grads, momentum_buffer, second_moment, lr, momentum, weight_decay):
        g = torch.stack([t.float() for t in grads])
        momentum_buffer.lerp_(g, 1 - momentum)
        U = m.orthogonalize(g.lerp(momentum_buffer, momentum))
        if m.NORMUON_BETA2 is not None:
            U = m.normuon(U, second_moment, m.NORMUON_BETA2)
        W = torch.stack(params)
        decay = weight_decay * W
        if m.CAUTIOUS_WEIGHT_DECAY:
            decay = decay * (U * W >= 0)
        W.sub_(lr * (U + decay))
        torch._foreach_copy_(params, list(W))

    compiled = torch.compile(update_math, dynamic=False)
    scalars = {}

    def update(self, params, group):
        rows, cols = params[0].shape
        state = self.state[params[0]]
        if not state:
            state["momentum"] = torch.zeros(len(params), rows, cols, device=params[0].device)
            moment_shape = (rows, 1) if rows >= cols else (1, cols)
            state["second_moment"] = torch.zeros(len(params), *moment_shape, device=params[0].device)
        values = dict(lr=group["lr"] * max(1.0, rows / cols) ** 0.5, momentum=group["momentum"],
                      weight_decay=group["weight_decay"])
        for k, v in values.items():
            scalars.setdefault(k, torch.tensor(0.0)).fill_(v)
        compiled(params, [p.grad for p in params], state["momentum"], state["second_moment"],
                 scalars["lr"], scalars["momentum"], scalars["weight_decay"])

    m.Muon.update = update


def quack_mlp(m, tuned=False):
    """The MLP as one custom op over quack's GEMMs with the activation in their epilogues."""
    from quack.gemm_interface import gemm, gemm_act, gemm_dact

    @torch.library.custom_op("bench::relu2_mlp", mutates_args=())
    def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, post = gemm_act(x, w1.T, activation="relu_sq", tuned=tuned)
        return gemm(post, w2.T, tuned=tuned), pre

    @mlp.register_fake
    def _(x, w1, w2):
        return x.new_empty(x.size(0), w2.size(0)), x.new_empty(x.size(0), w1.size(0))

    @torch.library.custom_op("bench::relu2_mlp_backward", mutates_args=())
    def backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dout = dout.contiguous()
        dpre, post = gemm_dact(dout, w2, pre, activation="relu_sq", tuned=tuned)
        return gemm(dpre, w1, tuned=tuned), gemm(dpre.T, x, tuned=tuned), gemm(dout.T, post, tuned=tuned)

    @backward.register_fake
    def _(dout, x, w1, w2, pre):
        return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])

    def differentiate(ctx, dout, dpre):
        return backward(dout, *ctx.saved_tensors)

    mlp.register_autograd(differentiate, setup_context=setup_context)

    def forward(self, x):
        B, T, C = x.shape
        w1, w2 = self.c_fc.weight.to(x.dtype), self.c_proj.weight.to(x.dtype)
        return torch.ops.bench.relu2_mlp(x.reshape(B * T, C), w1, w2)[0].view(B, T, C)

    m.MLP.forward = forward


def check_quack_mlp(m):
    """Largest gaps of the quack MLP from the plain one (output, input grad, weight grads), bf16."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        mlp = m.MLP(m.GPTConfig(n_embd=512))
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    plain = m.MLP.forward
    results = []
    for forward in (plain, None):
        if forward is None:
            quack_mlp(m)
        x.grad = mlp.c_fc.weight.grad = mlp.c_proj.weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.MLP.forward(mlp, x[None])[0]
        out.float().square().mean().backward()
        results.append([out.detach().float(), x.grad.float(), mlp.c_fc.weight.grad, mlp.c_proj.weight.grad])
    gaps = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]
    print("  quack MLP vs plain, largest gap relative to the largest value (out, dx, dw1, dw2):",
          [f"{g:.2g}" for g in gaps], flush=True)
    m.MLP.forward = plain
    return gaps


def sigmoid_softcap(m):
    def softcap(logits):
        return m.LOGIT_SOFTCAP * (2 * torch.sigmoid(2 * logits.float() / m.LOGIT_SOFTCAP) - 1)

    m.softcap = softcap


def coordinate_descent_tuning(m):
    torch._inductor.config.coordinate_descent_tuning = True


def fast_math(m):
    """Inductor's fast-math switch (flush-to-zero exp, also inside the loss's online log-sum-exp)."""
    torch._inductor.config.use_fast_math = True


def two_pass_logsumexp(m):
    """The loss's log-sum-exp as a max pass then a sum pass, not Inductor's one-pass online softmax
    (which pays two exps per logit where two passes pay the soft-cap twice)."""
    torch._inductor.config.online_softmax = False


def cublaslt(m):
    torch.backends.cuda.preferred_blas_library("cublaslt")


def inductor_switch(**settings):
    """A lever that sets Inductor options (a sub-config's option as triton__multi_kernel)."""

    def lever(m):
        for name, value in settings.items():
            *path, leaf = name.split("__")
            config = torch._inductor.config
            for part in path:
                config = getattr(config, part)
            setattr(config, leaf, value)

    return lever


LEVERS = {"fast-math": fast_math, "two-pass-lse": two_pass_logsumexp, "softcap-sigmoid": sigmoid_softcap, "tuning": coordinate_descent_tuning, "qkv": fused_qkv, "muon": compiled_muon, "quack-mlp": quack_mlp,
          "quack-mlp-tuned": functools.partial(quack_mlp, tuned=True), "cublaslt": cublaslt,
          "combo-kernels": inductor_switch(combo_kernels=True),
          "aggressive-fusion": inductor_switch(aggressive_fusion=True),
          "multi-kernel": inductor_switch(triton__multi_kernel=1),
          "nd-tiling": inductor_switch(triton__prefer_nd_tiling=True),
          "tile-reductions": inductor_switch(triton__prefer_nd_tiling=True, triton__tile_reductions=True),
          "tma-gemm": inductor_switch(max_autotune_gemm=True, max_autotune_gemm_backends="ATEN,TRITON",
                                      triton__enable_persistent_tma_matmul=True)}
