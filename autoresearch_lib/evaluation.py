"""evaluate: score a trained checkpoint (val_bpb) and sample text from it.

A checkpoint holds the weights, the model config and the source of the train.py that defined
the model, so the model can be rebuilt exactly, whatever the agent changed in it.
`evaluate` scores it as the loop does, with the model in sandboxed processes (scoring.py);
`load_model` rebuilds it *in this process*, for looking inside it in a notebook — only do that
with checkpoints you trust, since it runs the train.py saved in them.
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data, harness, sandbox, scoring
from .config import Settings
from .runner import FAIL_REASONS


@dataclass
class EvalResult:
    val_bpb: float | None  # bits per byte on the fixed validation tokens (None if not asked)
    samples: list[str] = field(default_factory=list)  # generated texts, prompt included
    checkpoint: str = ""

    def __str__(self) -> str:
        head = f"val_bpb {self.val_bpb:.4f}" if self.val_bpb is not None else "samples"
        return head + "".join(f"\n--- sample {i + 1} ---\n{s}" for i, s in enumerate(self.samples))


def unigram_bpb(prepared: data.Prepared, eval_tokens: int | None = None) -> float:
    """Bits per byte of a unigram model — each token's frequency in the training split, with
    add-one smoothing — on the validation tokens (the first `eval_tokens`, or all), `<|bos|>`
    skipped as the metric does. The first baseline a trained model must beat: it knows which
    tokens are common and nothing about context."""
    lengths = prepared.token_bytes()
    train, val = np.asarray(prepared.tokens("train")), np.asarray(prepared.tokens("val"))[:eval_tokens]
    probs = (np.bincount(train, minlength=prepared.vocab_size) + 1) / (len(train) + prepared.vocab_size)
    val = val[lengths[val] > 0]
    return float(-np.log2(probs[val]).sum() / lengths[val].sum())


def load_model(checkpoint: str | Path, device: str = "auto"):
    """(model, settings, prepared data) rebuilt from a checkpoint written by the harness."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train with checkpoint=True first.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not payload.get("train_py"):
        raise ValueError(f"{path} holds no train.py source, so its model cannot be rebuilt.")
    module = types.ModuleType("train_snapshot")  # not __main__, so training does not start
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(payload["train_py"], f"{path}:train.py", "exec"), module.__dict__)
    model = module.GPT(module.GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=False)  # buffers are rebuilt, not saved
    dev = harness.detect_device(device)
    settings = _settings(payload)
    return model.to(dev).eval(), settings, data.prepare(settings, verbose=False)


def _settings(payload: dict) -> Settings:
    """The fixed settings a checkpoint was trained under (where its data lives is found anew)."""
    known = Settings.__dataclass_fields__
    settings = Settings(**{k: v for k, v in payload["settings"].items() if k in known})
    settings.prepared = settings.checkpoint = None
    return settings


@torch.no_grad()
def sample(model, enc, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None) -> str:
    """Generate text after `prompt` from a model in this process (e.g. one from load_model)."""
    device = next(model.parameters()).device
    next_logits = lambda ids: model(torch.tensor([ids], device=device))[:, -1, :].cpu()
    return sample_with(next_logits, enc, prompt, max_new_tokens, temperature, top_k,
                       generator or torch.Generator(), model.config.sequence_len)


def evaluate(checkpoint: str | Path, prompt: str = "", num_samples: int = 1,
             max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 42, bpb: bool = True, device: str = "auto") -> EvalResult:
    """val_bpb of a checkpoint on the fixed validation set, and `num_samples` text samples.

    Scored exactly as the runner scores an experiment (scoring.py): the checkpoint's model runs
    in sandboxed model servers, never in this process, and its answers are spot-checked.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train with checkpoint=True first.")
    payload = torch.load(path, map_location="cpu", weights_only=True)  # runs no code from it
    if not payload.get("train_py"):
        raise ValueError(f"{path} holds no train.py source, so its model cannot be rebuilt.")
    settings = _settings(payload)
    settings.device = device
    prepared = data.prepare(settings, verbose=False)
    use_sandbox = sandbox.mode() == "bwrap"
    log: list[str] = []
    try:
        val_bpb = (scoring.score(payload["train_py"], path, settings, prepared, use_sandbox, log,
                                 timeout=600).val_bpb if bpb else None)
        samples = _samples(payload["train_py"], path, settings, prepared, use_sandbox, log,
                           prompt, num_samples, max_new_tokens, temperature, top_k, seed)
    except scoring.ScoringError as e:
        detail = "\n".join(log[-10:])
        reason = FAIL_REASONS.get(e.code, e.code)
        raise RuntimeError(f"could not evaluate {path} ({reason}): {e}\n{detail}".rstrip()) from None
    return EvalResult(val_bpb=val_bpb, samples=samples, checkpoint=str(checkpoint))


def _samples(train_py, path, settings, prepared, use_sandbox, log, prompt, num_samples,
             max_new_tokens, temperature, top_k, seed) -> list[str]:
    """Text from the model, one token at a time, each step a request to a model server."""
    if num_samples <= 0:
        return []
    enc = prepared.tokenizer()
    gen = torch.Generator().manual_seed(seed)
    with scoring.model_folder(train_py, path) as folder:
        server = scoring.ModelServer(folder, settings, use_sandbox, log, time.time() + 600, "sampler")
        with server.turn():  # (not beside another experiment's spot checks)
            server.load()
            next_logits = lambda ids: torch.from_numpy(
                server.ask("logits", np.asarray([ids]), positions=[len(ids) - 1]).copy())
            return [sample_with(next_logits, enc, prompt, max_new_tokens, temperature, top_k,
                                gen, settings.seq_len) for _ in range(num_samples)]


def sample_with(next_logits, enc, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int | None, generator: torch.Generator, max_len: int) -> str:
    """Generate text after `prompt` (BOS first); `next_logits(ids)` gives the logits (1, vocab)
    for the token after `ids`."""
    bos = enc.n_vocab - 1
    ids = [bos] + enc.encode_ordinary(prompt)
    for _ in range(max_new_tokens):
        logits = next_logits(ids[-max_len:]).float()
        if temperature <= 0:
            next_id = int(logits.argmax(-1))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits[logits < kth] = -float("inf")
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if next_id == bos:  # the model ended the document
            break
        ids.append(next_id)
    return enc.decode(ids[1:])
