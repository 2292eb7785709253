"""
The baseline training script: a small GPT, its optimizer and its training loop, in one file.

This is the file the agent edits. Everything fixed (data, tokenizer, time budget, the val_bpb
metric, device and precision) lives in autoresearch_lib.harness, which this script imports.
Run it with `python train.py` (settings come from settings.json / $AUTORESEARCH_SETTINGS).
Model: as karpathy/autoresearch — RMSNorm, rotary embeddings, QK-norm, grouped-query attention
with sliding windows, ReLU² MLP, value embeddings with gates, residual and x0 scalars,
soft-capped logits. Optimizer: as karpathy/autoresearch — Muon (Polar Express, NorMuon, cautious
weight decay, momentum warm-up) for the matrices, AdamW for the rest, time-based schedules.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# ---------------------------------------------------------------------------------------------
# Hyperparameters: edit these directly (a preset writes its starting values here)

# model shape
DEPTH = 8  # number of transformer blocks
ASPECT_RATIO = 64  # model width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # width of one attention head
QUERIES_PER_KV_HEAD = 1  # grouped-query attention: query heads sharing one key/value head (1: none)
VE_GATE_CHANNELS = 32  # how many input channels drive each value-embedding gate
WINDOW_PATTERN = "SSSL"  # per layer: L = full causal attention, S = half-length sliding window
ATTENTION_KERNEL = "auto"  # "fa4", "flex" or "mask" (see attention_kernel()); auto: the fastest this card has
LOGIT_SOFTCAP = 15.0  # logits are squashed into (-LOGIT_SOFTCAP, LOGIT_SOFTCAP)
# optimization
TOTAL_BATCH_SIZE = 524288  # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 128  # rows per forward/backward pass
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, the output head
MATRIX_LR = 0.04  # Muon, every matrix inside the blocks
SCALAR_LR = 0.5  # AdamW, the per-layer residual scalars
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0  # fraction of the time budget spent warming the learning rate up
WARMDOWN_RATIO = 0.5  # fraction of the time budget spent decaying it
FINAL_LR_FRAC = 0.0  # learning rate at the end, as a fraction of the peak
# Muon
MUON_MOMENTUM = 0.95  # Nesterov momentum of the matrices' gradients
MUON_MOMENTUM_START = 0.85  # momentum rises from this value ...
MUON_MOMENTUM_WARMUP_STEPS = 300  # ... to MUON_MOMENTUM over this many steps (0: no warm-up)
POLAR_EXPRESS = True  # orthogonalize with Polar Express's coefficients (False: classic Newton-Schulz)
NORMUON_BETA2 = 0.95  # NorMuon: even out each neuron's step size by its update RMS (None: off)
WEIGHT_DECAY = 0.2  # Muon's decoupled weight decay
CAUTIOUS_WEIGHT_DECAY = True  # decay a weight only where its update also pulls it towards zero
WEIGHT_DECAY_FINAL_FRAC = 0.0  # weight decay falls linearly to this fraction of WEIGHT_DECAY


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads, fewer than n_head for grouped-query attention (None: n_head)
    n_embd: int = 512
    window_pattern: str = "SSSL"
    ve_gate_channels: int = 32

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head


def norm(x):
    """RMSNorm without a learned scale."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer, n_layer):
    """Value embeddings on alternate layers, always including the last."""
    return layer % 2 == (n_layer - 1) % 2


def apply_rotary(x, cos, sin):
    """Rotate pairs of channels by a position-dependent angle (rotary position embedding)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def sliding_window(w):
    """Query q may look at key k if k is not in the future and at most w - 1 tokens back."""
    def mask(b, h, q, k):
        return (k <= q) & (q - k < w)
    return mask


def attention_kernel(device, head_dim=HEAD_DIM):
    """How attention runs. "fa4": every layer through FlashAttention 4 (the optional flash-attn-4
    package; Hopper and Blackwell cards; heads of 8-256 channels, a multiple of 8), windows
    included: the fastest (8 % faster steps than "flex" on an H200). Otherwise full layers use
    PyTorch's SDPA and the sliding windows either "flex" (FlexAttention: skips the blocks outside
    the window; CUDA on Ampere or newer in practice, a T4's Triton kernels run out of shared
    memory) or "mask" (SDPA with an explicit boolean mask: any card, e.g. a T4 or a CPU)."""
    if ATTENTION_KERNEL != "auto":
        return ATTENTION_KERNEL
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if capability < (8, 0):
        return "mask"
    fa4_fits = capability[0] in (9, 10) and head_dim % 8 == 0 and 8 <= head_dim <= 256
    return "fa4" if fa4_fits and fa4_installed() else "flex"


@functools.cache
def compiled_flex_attention():
    """FlexAttention is fast only compiled. Inside the compiled training step it is traced with the
    model; the uncompiled model (evaluation, sampling) calls this compiled copy. Made on first use:
    importing torch.compile's machinery takes ~2 s, which a run on a CPU never needs."""
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def fa4_installed():
    """Is flash-attn-4 (pip install flash-attn-4) here, with the two functions this file calls?"""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
        return True
    except ImportError:
        return False


@functools.cache
def register_flash_attention_4():
    """FlashAttention 4 as a PyTorch custom op, torch.ops.autoresearch.fa4: (q, k, v) in (B, T,
    heads, head_dim), a causal window of `window` tokens (T or more: plain causal) -> (the output,
    same layout; the log-sum-exp per row). torch.compile keeps a custom op in its graph as one
    call (the package's own autograd.Function would break the graph), and the op's backward runs
    the package's backward kernel. It compiles its kernels on first use (seconds) and caches them
    on disk when the runner says where. Registered by build_masks(), outside the compiled graph."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    def left(window, T):
        return window - 1 if window < T else None  # keys at most window - 1 tokens back

    @torch.library.custom_op("autoresearch::fa4", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, *_ = _flash_attn_fwd(q, k, v, causal=True, window_size_left=left(window, q.size(1)), return_lse=True)
        return out.contiguous(), lse.contiguous()  # as register_fake says (a no-op: it makes them so)

    @attention.register_fake
    def _(q, k, v, window):
        B, T, H, _ = q.shape
        return q.new_empty(B, T, H, v.size(-1)), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op("autoresearch::fa4_backward", mutates_args=())
    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, window_size_left=left(window, q.size(1)))
        return tuple(g.contiguous() for g in grads)

    @backward.register_fake
    def _(dout, q, k, v, out, lse, window):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, ctx.window = inputs
        ctx.save_for_backward(q, k, v, *output)

    def differentiate(ctx, dout, dlse):
        return *backward(dout, *ctx.saved_tensors, ctx.window), None

    attention.register_autograd(differentiate, setup_context=setup_context)


def softcap(logits):
    """Squash logits smoothly into (-LOGIT_SOFTCAP, LOGIT_SOFTCAP), in float32."""
    return LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(logits), light on memory: the forward keeps only the 16-bit
    logits and one log-sum-exp per row; the backward recomputes the float32 soft-capped logits
    (8 GB per micro-batch at the h100 size) and lets autograd differentiate softcap() itself,
    so the gradient stays right whatever softcap() computes. Compiled, it fuses into a few passes."""

    @staticmethod
    def forward(ctx, logits, targets):
        z = softcap(logits)
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - z.gather(-1, targets[:, None]).squeeze(-1)).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        z, softcap_backward = torch.func.vjp(softcap, logits)  # recompute z, and how to go back through it
        is_target = torch.arange(z.size(-1), device=z.device) == targets[:, None]
        dz = (torch.exp(z - lse[:, None]) - is_target.float()) * (grad / len(targets))  # softmax - one-hot
        return softcap_backward(dz)[0], None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate = (nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # mix in the value embedding, gated per head by the input
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        if isinstance(mask, int):  # FlashAttention 4, a causal window of `mask` tokens
            half = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # its only types
            y = torch.ops.autoresearch.fa4(*(t.to(half) for t in (q, k, v)), mask)[0].to(v.dtype)
            return self.c_proj(y.reshape(B, T, C))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_kv_head < self.n_head  # each key/value head serves several query heads
        if mask is None:  # full causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):  # sliding window as an explicit boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # sliding window as a FlexAttention BlockMask: skips the masked-out blocks
            flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
            y = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(norm(x), ve, cos, sin, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_layer, n_embd = config.n_layer, config.n_embd
        head_dim = n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(n_layer))
        self.lm_head = nn.Linear(n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(n_layer))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * head_dim)
            for i in range(n_layer) if has_value_embedding(i, n_layer)})
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.sequence_len).float(), freqs)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self.windows = self.window_sizes()
        self.mask_cache = {}  # (T, device) -> each layer's mask: built once, reused by every step

    def window_sizes(self):
        long, pattern = self.config.sequence_len, self.config.window_pattern.upper()
        sizes = [{"L": long, "S": long // 2}[pattern[i % len(pattern)]] for i in range(self.config.n_layer)]
        sizes[-1] = long  # the last layer always sees the whole context
        return sizes

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform bound with std n_embd^-0.5
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matrix parameter + attention (as in nanochat)."""
        n_matrix = sum(p.numel() for n, p in self.named_parameters()
                       if p.dim() == 2 and "wte" not in n and "value_embeds" not in n)
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * n_matrix + attn

    def masks(self, T, device):
        """Per layer, the window as its kernel takes it: for "fa4", its size (an int); else None
        (plain causal) for a full window, a FlexAttention BlockMask for "flex", a boolean matrix
        for "mask" (SDPA). Built once per length and device; main() builds them before
        compiling, so the compiled graph only looks them up (building them inside would break
        the graph in two)."""
        device = torch.device(device)
        if device.index is None and device.type in ("cuda", "mps"):  # "cuda" is the card "cuda:0"
            device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" else 0)
        key = (T, device)
        if key not in self.mask_cache:
            self.mask_cache[key] = self.build_masks(T, key[1])
        return self.mask_cache[key]

    @torch.compiler.disable
    def build_masks(self, T, device):
        built, kernel = {}, attention_kernel(device, self.config.n_embd // self.config.n_head)
        if kernel == "fa4":
            register_flash_attention_4()
            return [min(w, T) for w in self.windows]
        for w in set(self.windows):
            if w < T:
                window = sliding_window(w)
                if kernel == "flex":
                    built[w] = create_block_mask(window, None, None, T, T, device=device)
                else:
                    i = torch.arange(T, device=device)
                    built[w] = window(None, None, i[:, None], i[None, :])
        return [built.get(w) for w in self.windows]

    def forward(self, idx, targets=None):
        """Token ids (B, T) → soft-capped logits (B, T, vocab), the harness's input for the metric;
        with targets (B, T): the mean cross-entropy, for training."""
        T, device = idx.size(1), idx.device.type
        # the residual stream in the autocast precision (bf16/fp16 on a GPU): half the memory traffic
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        x = x0 = norm(self.wte(idx).to(dtype))
        cos, sin = self.cos[:, :T].to(dtype), self.sin[:, :T].to(dtype)
        for i, (block, mask) in enumerate(zip(self.blocks, self.masks(T, idx.device))):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, mask)
        logits = self.lm_head(norm(x))
        if targets is None:
            return softcap(logits)
        logits, targets = logits.flatten(0, 1), targets.flatten()
        if torch.compiler.is_compiling():  # compiled (a GPU): the memory-light, fused version
            return SoftcappedCrossEntropy.apply(logits, targets)
        return F.cross_entropy(softcap(logits), targets)  # eager (CPU, MPS): PyTorch's is faster


# ---------------------------------------------------------------------------------------------
# Optimizer: Muon for the matrices inside the blocks, AdamW for everything else

# Muon's orthogonalization runs five steps of X <- a X + (b A + c A^2) X with A = X X^T. Classic
# Newton-Schulz uses one (a, b, c) for all five; Polar Express (Amsel et al., 2025) uses the
# coefficients optimal for each step, so the singular values land closer to 1.
NEWTON_SCHULZ_COEFFS = [(3.4445, -4.7750, 2.0315)] * 5
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(G):
    """Push the singular values of each matrix in the stack G towards 1 (Muon's update direction)."""
    X = G.bfloat16() if G.is_cuda and torch.cuda.get_device_capability()[0] >= 8 else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: A = X X^T is the smaller square
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # every singular value below 1
    for a, b, c in POLAR_EXPRESS_COEFFS if POLAR_EXPRESS else NEWTON_SCHULZ_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).float()


def normuon(U, second_moment, beta2):
    """NorMuon: orthogonalization evens out an update's directions, not its neurons. Divide each
    neuron's update (a row, or a column of a wide matrix) by the running RMS of its past updates,
    then restore the update's overall norm, so no neuron learns much faster than the others."""
    mean_square = U.square().mean(dim=-1 if U.size(-2) >= U.size(-1) else -2, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    scaled = U * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (U.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, an orthogonalized (and NorMuon-balanced) update, then decoupled weight
    decay; same-shape matrices are updated together as one stack."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for shape in {p.shape: None for p in params}:  # a dict keeps the order: deterministic
                self.update([p for p in params if p.shape == shape], group)

    def update(self, params, group):
        rows, cols = params[0].shape
        state = self.state[params[0]]  # one state for the whole stack, kept with its first matrix
        if not state:
            state["momentum"] = torch.zeros(len(params), rows, cols, device=params[0].device)
            moment_shape = (rows, 1) if rows >= cols else (1, cols)
            state["second_moment"] = torch.zeros(len(params), *moment_shape, device=params[0].device)
        grads = torch.stack([p.grad.float() for p in params])
        state["momentum"].lerp_(grads, 1 - group["momentum"])
        U = orthogonalize(grads.lerp(state["momentum"], group["momentum"]))  # Nesterov
        if NORMUON_BETA2 is not None:
            U = normuon(U, state["second_moment"], NORMUON_BETA2)
        W = torch.stack(params)
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices take larger steps
        decay = group["weight_decay"] * W
        if CAUTIOUS_WEIGHT_DECAY:  # only where the update already moves the weight towards zero
            decay = decay * (U * W >= 0)
        W.sub_(lr * (U + decay))
        torch._foreach_copy_(params, list(W))


def make_optimizers(model, fused):
    width_scale = (model.config.n_embd / 768) ** -0.5  # AdamW rates were tuned at width 768
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * width_scale),
        dict(params=[model.wte.weight, *model.value_embeds.parameters()], lr=EMBEDDING_LR * width_scale),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=fused)
    muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY)
    for group in adamw.param_groups + muon.param_groups:
        group["initial_lr"] = group["lr"]
    return adamw, muon


def lr_multiplier(progress):
    """Warm up, hold, then warm down linearly to FINAL_LR_FRAC, by fraction of time used."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def muon_momentum(step):
    """Lower momentum for the first steps, while gradients change fast, then MUON_MOMENTUM."""
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0) if MUON_MOMENTUM_WARMUP_STEPS else 1.0
    return MUON_MOMENTUM_START + frac * (MUON_MOMENTUM - MUON_MOMENTUM_START)


def weight_decay(progress):
    """WEIGHT_DECAY at the start, falling linearly to WEIGHT_DECAY * WEIGHT_DECAY_FINAL_FRAC."""
    return WEIGHT_DECAY * (1 - progress * (1 - WEIGHT_DECAY_FINAL_FRAC))


# ---------------------------------------------------------------------------------------------
# Training


def model_config(seq_len, vocab_size):
    """The model's shape from the hyperparameters above (the width rounded up to whole heads)."""
    width = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    n_head = width // HEAD_DIM
    return GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head,
                     n_kv_head=max(1, n_head // QUERIES_PER_KV_HEAD), n_embd=width,
                     window_pattern=WINDOW_PATTERN, ve_gate_channels=VE_GATE_CHANNELS)


def main():
    from autoresearch_lib import harness

    run = harness.setup()
    config = model_config(run.seq_len, run.vocab_size)
    with run.device:  # parameters are made on the device itself, not on the CPU and copied over
        model = GPT(config)
    model.init_weights()
    adamw, muon = make_optimizers(model, fused=run.device.type == "cuda")
    model.masks(run.seq_len, run.device)  # the attention masks, built before compiling (see masks())
    # compiled on CUDA (the loss with the model, so soft-cap and cross-entropy fuse); else the model
    compiled_model = run.compile(model)

    tokens_per_pass = DEVICE_BATCH_SIZE * run.seq_len
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * seq_len"
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_pass
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | width {config.n_embd} | "
          f"depth {DEPTH} | heads {config.n_head} (kv {config.n_kv_head}) | grad accumulation {grad_accum} | "
          f"attention {attention_kernel(run.device, config.n_embd // config.n_head)}", flush=True)

    loader = run.train_loader(DEVICE_BATCH_SIZE)
    x, y, epoch = next(loader)
    run.begin(model, tokens_per_step=TOTAL_BATCH_SIZE)
    step = 0
    while not run.done:
        for _ in range(grad_accum):
            with run.autocast():
                loss = compiled_model(x, y)
            run.scaler.scale(loss / grad_accum).backward()
            x, y, epoch = next(loader)
        lrm = lr_multiplier(run.progress)
        for group in adamw.param_groups + muon.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = weight_decay(run.progress)
        run.scaler.step(adamw)
        run.scaler.step(muon)
        run.scaler.update()
        model.zero_grad(set_to_none=True)
        step += 1
        run.step_done(loss.detach(), lrm=lrm, epoch=epoch)

    run.finish(model, config)


if __name__ == "__main__":
    main()
