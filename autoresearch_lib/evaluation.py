"""evaluate: score a trained checkpoint (val_bpb) and sample text from it.

A checkpoint holds the weights, the model config and the source of the train.py that defined
the model, so the model can be rebuilt exactly, whatever the agent changed in it.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, harness
from .config import Settings


@dataclass
class EvalResult:
    val_bpb: float | None  # bits per byte on the fixed validation tokens (None if not asked)
    samples: list[str] = field(default_factory=list)  # generated texts, prompt included
    checkpoint: str = ""

    def __str__(self) -> str:
        head = f"val_bpb {self.val_bpb:.4f}" if self.val_bpb is not None else "samples"
        return head + "".join(f"\n--- sample {i + 1} ---\n{s}" for i, s in enumerate(self.samples))


def load_model(checkpoint: str | Path, device: str = "auto"):
    """(model, settings, prepared data) rebuilt from a checkpoint written by the harness."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train with checkpoint=True first.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not payload.get("train_py"):
        raise ValueError(f"{path} holds no train.py source, so its model cannot be rebuilt.")
    module = types.ModuleType("train_snapshot")  # not __main__, so training does not start
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(payload["train_py"], f"{path}:train.py", "exec"), module.__dict__)
    model = module.GPT(module.GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=False)  # buffers are rebuilt, not saved
    dev = harness.detect_device(device)
    settings = Settings(**payload["settings"])
    return model.to(dev).eval(), settings, data.prepare(settings, verbose=False)


@torch.no_grad()
def sample(model, enc, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None) -> str:
    """Generate text after `prompt` (BOS first), one token at a time, recomputing the context."""
    device = next(model.parameters()).device
    bos = enc.n_vocab - 1
    ids = torch.tensor([[bos] + enc.encode_ordinary(prompt)], device=device)
    max_len = model.config.sequence_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[:, -1, :].float()
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, -1)
            next_id = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        if next_id.item() == bos:  # the model ended the document
            break
        ids = torch.cat([ids, next_id], dim=1)
    return enc.decode(ids[0, 1:].tolist())


def evaluate(checkpoint: str | Path, prompt: str = "", num_samples: int = 1,
             max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 42, bpb: bool = True, device: str = "auto") -> EvalResult:
    """val_bpb of a checkpoint on the fixed validation set, and `num_samples` text samples."""
    model, settings, prepared = load_model(checkpoint, device)
    val_bpb = None
    if bpb:
        dev = next(model.parameters()).device
        rows = harness.validation_rows(prepared, settings)
        mixed = lambda: harness.autocast(dev, harness.detect_precision(dev))
        val_bpb = harness.evaluate_bpb(model, rows, prepared.token_bytes(), dev, autocast=mixed)
    enc = prepared.tokenizer()
    gen = torch.Generator().manual_seed(seed)
    samples = [sample(model, enc, prompt, max_new_tokens, temperature, top_k, gen)
               for _ in range(num_samples)]
    return EvalResult(val_bpb=val_bpb, samples=samples, checkpoint=str(checkpoint))
