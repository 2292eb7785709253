"""autoresearch-kit: teach and drive autonomous ML research.

Four verbs:
    prepare   corpus → BPE tokenizer → token files          (data.py)
    train     run a train.py for a fixed time budget        (runner.py + harness.py)
    evaluate  val_bpb of a checkpoint, and text samples     (evaluation.py)
    loop      the agent's keep/discard research loop        (loop.py)

>>> import autoresearch_lib as ar
>>> result = ar.train(preset="cpu", budget=60)
>>> print(result.val_bpb)
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from . import config, data
from .config import PRESETS, Settings, make_settings, quick_mode
from .data import DataError, Prepared
from .runner import Progress, TrainResult

__all__ = ["prepare", "train", "evaluate", "loop", "Settings", "Prepared", "TrainResult",
           "EvalResult", "Progress", "DataError", "PRESETS", "make_settings", "quick_mode"]


def prepare(dataset: str | None = None, text: str | None = None, val_text: str | None = None,
            vocab_size: int | None = None, preset: str = "auto", cache_dir: str | None = None,
            verbose: bool = True) -> Prepared:
    """Get a corpus ready: load it, train (or reuse) the BPE tokenizer, write the token files.

    dataset: "shakespeare" (embedded, default), "text" (your own: pass text=file or folder,
    optionally val_text=...), "tinystories" or "climbmix" (downloaded from Hugging Face).
    """
    settings = make_settings(preset, dataset=dataset, text=text, val_text=val_text,
                             vocab_size=vocab_size, cache_dir=cache_dir)
    return data.prepare(settings, verbose=verbose)


def train(preset: str = "auto", budget: float | None = None, script: str | Path | None = None,
          text: str | None = None, val_text: str | None = None, dataset: str | None = None,
          run_dir: str | Path | None = None, on_progress=None, on_line=None,
          checkpoint: bool = True, timeout: float | None = None, **overrides) -> TrainResult:
    """Train a train.py for a fixed wall-clock budget in a subprocess; return its result.

    preset: "cpu", "small-gpu", "small-data", "h100", "quick" or "auto" (sized for this machine).
    script: a train.py to run (default: the baseline, with the preset's hyperparameters).
    on_progress: called with a `Progress` (step, loss, tok/s, MFU, time left) as training runs.
    Any other keyword overrides a fixed setting (vocab_size=..., seq_len=..., eval_tokens=...).
    """
    from .baseline import render_train_py
    from .runner import run_training

    settings = make_settings(preset, budget=budget, text=text, val_text=val_text,
                             dataset=dataset, **overrides)
    run_dir = Path(run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if checkpoint:
        settings.checkpoint = str(run_dir / "model.pt")
    data.prepare(settings)  # here, so a bad corpus fails with a clear message before any run
    script_text = Path(script).read_text() if script else render_train_py(settings.preset)
    return run_training(script_text, settings, run_dir, on_progress=on_progress,
                        on_line=on_line, timeout=timeout)


def __getattr__(name):
    # imported on first use: they pull in torch (seconds), which `import autoresearch_lib` avoids
    if name in ("evaluate", "EvalResult"):
        return getattr(importlib.import_module(".evaluation", __name__), name)
    if name == "loop":
        return importlib.import_module(".loop", __name__)
    raise AttributeError(f"module 'autoresearch_lib' has no attribute {name!r}")
