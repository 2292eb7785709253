"""The model server: runs an experiment's trained model for the scorer, and nothing else.

    python -m autoresearch_lib.model_server TRAIN_PY CHECKPOINT

Started by scoring.py inside the sandbox, so the model's code (train.py, which the agent wrote)
can read no file but these two and reach no network. It imports torch, then waits for
`{"op": "load"}` on stdin before it runs any of the model's code: the scorer starts its checker
early but lets the model load there only once the other server is gone (see scoring.py). Then
it rebuilds the model — `GPT(GPTConfig(**config))` from train.py's source, weights from the
checkpoint, loaded with `weights_only=True` so loading runs no code from it — says
`{"ready": true, "precision": ...}` and answers requests on stdin, one JSON header line plus
raw bytes each, on stdout:

    {"op": "nll", "shape": [B, T+1]} + int64 rows  ->  float32 (B, T): -log p(row[t+1] | row[:t+1])
    {"op": "logits", "shape": [B, L], "positions": [p1..pB]} + int64 rows  ->  float32 (B, vocab)

The server holds no validation data and no secret; nothing it answers is trusted as such:
scoring.py checks it (see there).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from . import harness
from .baseline import as_module


def load(train_py: str, checkpoint: str, device: torch.device):
    """The model of a checkpoint, rebuilt from train.py's source (not run as __main__)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module = as_module(open(train_py, encoding="utf-8").read())
    model = module.GPT(module.GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=False)  # buffers are rebuilt, not saved
    return model.to(device).eval()


def read_request(stream) -> tuple[dict, np.ndarray] | None:
    line = stream.readline()
    if not line:
        return None
    header = json.loads(line)
    shape = header["shape"]
    data = stream.read(8 * int(np.prod(shape)))
    return header, np.frombuffer(data, dtype=np.int64).reshape(shape)


@torch.no_grad()
def answer(model, header: dict, rows: np.ndarray, device, dtype) -> np.ndarray:
    if header["op"] == "nll":
        batch = torch.from_numpy(rows.copy()).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with harness.autocast(device, dtype):
            logits = model(x)
        if tuple(logits.shape[:2]) != tuple(y.shape):
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, "
                             f"expected (batch, seq_len, vocab) = {tuple(y.shape)} + (vocab,)")
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return nll.view(y.shape).cpu().numpy().astype(np.float32)
    if header["op"] == "logits":
        x = torch.from_numpy(rows.copy()).to(device)
        with harness.autocast(device, dtype):
            logits = model(x)
        positions = torch.as_tensor(header["positions"], device=device)
        return logits[torch.arange(len(x), device=device), positions].float().cpu().numpy()
    raise ValueError(f"unknown request {header['op']!r}")


def warm_up(device: torch.device) -> None:
    """What the baseline model's code would otherwise wait for once told to load, done before:
    the checker waits while the scorer works, so this costs it nothing. None of it is the
    model's code: torch.compile's machinery (train.py's @torch.compiler.disable imports it, ~1 s),
    the card's context, FlashAttention 4's package where it is installed (~1.3 s)."""
    import torch._dynamo  # noqa: F401

    if device.type == "cuda":
        torch.zeros(1, device=device)
        with contextlib.suppress(ImportError):
            import flash_attn.cute.interface  # noqa: F401


def main(train_py: str, checkpoint: str, device_name: str = "auto") -> None:
    # answers go to a private copy of stdout; whatever the model code prints goes to the log
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    device = harness.detect_device(device_name)
    dtype = harness.detect_precision(device)
    warm_up(device)
    if json.loads(requests.readline() or "{}").get("op") != "load":  # the scorer went away first
        return
    model = load(train_py, checkpoint, device)
    answers.write((json.dumps({"ready": True, "precision": str(dtype)}) + "\n").encode())
    answers.flush()
    while (request := read_request(requests)) is not None:
        out = answer(model, *request, device, dtype)
        answers.write((json.dumps({"shape": list(out.shape)}) + "\n").encode())
        answers.write(np.ascontiguousarray(out, dtype=np.float32).tobytes())
        answers.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
