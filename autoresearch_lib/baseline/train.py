"""
The baseline training script: a small GPT, its optimizer and its training loop, in one file.

This is the file the agent edits. Everything fixed (data, tokenizer, time budget, the val_bpb
metric, device and precision) lives in autoresearch_lib.harness, which this script imports.
Run it with `python train.py` (settings come from settings.json / $AUTORESEARCH_SETTINGS).
Model: as karpathy/autoresearch — RMSNorm, rotary embeddings, QK-norm, ReLU² MLP, value
embeddings with gates, residual and x0 scalars, soft-capped logits; Muon + AdamW.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# ---------------------------------------------------------------------------------------------
# Hyperparameters: edit these directly (a preset writes its starting values here)

# model shape
DEPTH = 8  # number of transformer blocks
ASPECT_RATIO = 64  # model width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # width of one attention head
WINDOW_PATTERN = "SSSL"  # per layer: L = full causal attention, S = half-length sliding window
# optimization
TOTAL_BATCH_SIZE = 524288  # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 128  # rows per forward/backward pass
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, the output head
MATRIX_LR = 0.04  # Muon, every matrix inside the blocks
SCALAR_LR = 0.5  # AdamW, the per-layer residual scalars
WEIGHT_DECAY = 0.2  # Muon's decoupled weight decay
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0  # fraction of the time budget spent warming the learning rate up
WARMDOWN_RATIO = 0.5  # fraction of the time budget spent decaying it
FINAL_LR_FRAC = 0.0  # learning rate at the end, as a fraction of the peak
LOGIT_SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


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


def softcap(logits):
    """Squash logits smoothly into (-LOGIT_SOFTCAP, LOGIT_SOFTCAP), in float32."""
    return LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of soft-capped logits, written out so that it stays light on memory:
    the forward keeps only the (bf16) logits and one log-sum-exp per row, the backward recomputes
    the rest. The float32 soft-capped logits (8 GB per micro-batch at the h100 size) are never
    stored, which saves the GPU several passes over them."""

    @staticmethod
    def forward(ctx, logits, targets):
        z = softcap(logits)
        if LOGIT_SOFTCAP <= 40:  # z <= cap, so exp(z - cap) lies in (e^-80, 1]: one pass, no max needed
            lse = torch.exp(z - LOGIT_SOFTCAP).sum(dim=-1).log() + LOGIT_SOFTCAP
        else:
            lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - z.gather(-1, targets[:, None]).squeeze(-1)).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        z = softcap(logits)
        probs = torch.exp(z - lse[:, None])  # softmax
        is_target = torch.arange(z.size(-1), device=z.device) == targets[:, None]
        dz = torch.where(is_target, probs - 1, probs) * (grad / len(targets))
        return (dz * (1 - (z / LOGIT_SOFTCAP) ** 2)).to(logits.dtype), None  # through the tanh


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = nn.Linear(32, self.n_head, bias=False) if has_value_embedding(layer, config.n_layer) else None

    def forward(self, x, ve, cos, sin, mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # mix in the value embedding, gated per head by the input
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:  # full causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(mask, BlockMask):  # sliding window on CUDA: skips the masked-out blocks
            y = flex_attention(q, k, v, block_mask=mask)
        else:  # sliding window elsewhere: an explicit boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        self.wte = nn.Embedding(config.vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(n_layer))
        self.lm_head = nn.Linear(n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(n_layer))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, n_embd)
            for i in range(n_layer) if has_value_embedding(i, n_layer)})
        head_dim = n_embd // config.n_head
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.sequence_len).float(), freqs)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self.windows = self.window_sizes()

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
        """Per layer: None (plain causal) for a full window, else a sliding-window mask —
        a FlexAttention BlockMask on CUDA (fast, compiled), a boolean matrix elsewhere."""
        cache = self.__dict__.setdefault("_masks", {})
        for w in set(self.windows):
            if w < T and (T, w, device) not in cache:
                window = sliding_window(w)
                if device.type == "cuda":
                    cache[T, w, device] = create_block_mask(window, None, None, T, T, device=device)
                else:
                    i = torch.arange(T, device=device)
                    cache[T, w, device] = window(None, None, i[:, None], i[None, :])
        return [None if w >= T else cache[T, w, device] for w in self.windows]

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
        if torch.compiler.is_compiling():  # compiled (GPU): the fused, memory-light version
            return SoftcapCrossEntropy.apply(logits, targets)
        return F.cross_entropy(softcap(logits), targets)  # eager (CPU, MPS): PyTorch's is faster


if torch.cuda.is_available():
    GPT.masks = torch.compiler.disable(GPT.masks)  # build the masks outside the compiled graph
    # FlexAttention is fast only compiled; compiling it here too covers the uncompiled model
    # the harness evaluates (inside the compiled training step it is simply inlined)
    flex_attention = torch.compile(flex_attention, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Optimizer: Muon for the matrices inside the blocks, AdamW for everything else


def orthogonalize(G, steps=5):
    """Newton-Schulz iteration: push G's singular values towards 1 (Muon's update direction)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda and torch.cuda.get_device_capability()[0] >= 8 else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then an orthogonalized update; same-shape matrices are batched together."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for shape in {p.shape for p in params}:
                same = [p for p in params if p.shape == shape]
                grads = torch.stack([p.grad for p in same])
                bufs = torch.stack([self.state[p].setdefault("buf", torch.zeros_like(p)) for p in same])
                bufs.lerp_(grads, 1 - group["momentum"])
                update = orthogonalize(grads.lerp(bufs, group["momentum"]))  # nesterov
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for p, buf, u in zip(same, bufs, update):
                    self.state[p]["buf"].copy_(buf)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-group["lr"] * scale)


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
    muon = Muon(matrices, lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress):
    """Warm up, hold, then warm down linearly to FINAL_LR_FRAC, by fraction of time used."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


# ---------------------------------------------------------------------------------------------
# Training


def main():
    from autoresearch_lib import harness

    run = harness.setup()
    model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    config = GPTConfig(sequence_len=run.seq_len, vocab_size=run.vocab_size, n_layer=DEPTH,
                       n_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    model = GPT(config).to(run.device)
    model.init_weights()
    optimizers = make_optimizers(model, fused=run.device.type == "cuda")
    # the loss is compiled with the model on CUDA, so soft-cap and cross-entropy fuse
    train_loss = run.compile(model)  # model(x, y) is the loss

    tokens_per_pass = DEVICE_BATCH_SIZE * run.seq_len
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * seq_len"
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_pass
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | width {model_dim} | "
          f"depth {DEPTH} | grad accumulation {grad_accum}", flush=True)

    loader = run.train_loader(DEVICE_BATCH_SIZE)
    x, y, epoch = next(loader)
    run.begin(model, tokens_per_step=TOTAL_BATCH_SIZE)
    while not run.done:
        for _ in range(grad_accum):
            with run.autocast():
                loss = train_loss(x, y)
            run.scaler.scale(loss / grad_accum).backward()
            x, y, epoch = next(loader)
        lrm = lr_multiplier(run.progress)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            run.scaler.step(opt)
        run.scaler.update()
        model.zero_grad(set_to_none=True)
        run.step_done(loss.detach(), lrm=lrm, epoch=epoch)

    run.finish(model, config)


if __name__ == "__main__":
    main()
