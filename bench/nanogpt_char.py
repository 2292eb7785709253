"""A classic reference: nanoGPT's documented CPU recipe, character-level, on our split.

nanoGPT's README trains shakespeare_char on a CPU with: 4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW lr 1e-3 (β2 0.99, weight decay 0.1, 100 warm-up steps, cosine decay to 1e-4),
no dropout. This is our own small implementation of that recipe
(a GPT-2 style model: LayerNorm, learned positions, GELU MLP, tied embeddings), trained for a
fixed wall-clock budget on the same train/validation works as the kit, and scored in bits per
byte on the held-out works (the corpus is ASCII, so one character is one byte).

    python bench/nanogpt_char.py --budget 120
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch_lib import data
from autoresearch_lib.config import make_settings


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), n_head
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab, block=64, n_layer=4, n_head=4, d=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.Sequential(*[Block(d, n_head) for _ in range(n_layer)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as nanoGPT
        for name, p in self.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.head(self.ln_f(self.blocks(self.wte(idx) + self.wpe(pos))))


def encode(text, stoi):
    return torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long)


@torch.no_grad()
def val_bpb(model, val, block):
    """Bits per byte over the whole validation text, in non-overlapping blocks."""
    model.eval()
    n = (len(val) - 1) // block
    x = val[: n * block].view(n, block)
    y = val[1 : n * block + 1].view(n, block)
    nats = sum(F.cross_entropy(model(x[i:i + 256]).flatten(0, 1), y[i:i + 256].flatten(),
                               reduction="sum").item() for i in range(0, n, 256))
    return nats / (math.log(2) * n * block)


def main(budget=120.0, block=64, batch=12, lr=1e-3, seed=1337):
    torch.manual_seed(seed)
    train_docs, val_docs = data.load_corpus(make_settings("cpu"))
    train_text, val_text = "\n\n".join(train_docs), "\n\n".join(val_docs)
    assert train_text.isascii() and val_text.isascii()  # so characters are bytes
    chars = sorted(set(train_text))
    stoi = {c: i for i, c in enumerate(chars)}
    train, val = encode(train_text, stoi), encode(val_text, stoi)
    model = CharGPT(len(chars), block)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    steps, trained, t_last = 0, 0.0, time.time()
    while trained < budget:
        # nanoGPT's schedule: 100 warm-up steps, then cosine to lr/10 (here over the time budget)
        progress = trained / budget
        lr_now = lr * min(1.0, (steps + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        ix = torch.randint(len(train) - block - 1, (batch,))
        x = torch.stack([train[i:i + block] for i in ix])
        y = torch.stack([train[i + 1:i + block + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        now = time.time()
        if steps > 1:  # the first step (warm-up) is not counted, as in the kit's harness
            trained += now - t_last
        t_last = now
    result = dict(val_bpb=val_bpb(model, val, block), steps=steps, training_seconds=trained,
                  tokens_per_second=steps * batch * block / trained,
                  params_M=sum(p.numel() for p in model.parameters()) / 1e6)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--budget", type=float, default=120.0)
    main(p.parse_args().budget)
