"""Presets and fixed settings: how big a run is, sized for the hardware it runs on.

Two kinds of knobs live in this kit:
- *fixed settings* (`Settings`): budget, data, vocabulary, evaluation. The harness reads them;
  the agent can never change them, so every experiment is measured the same way.
- *hyperparameters*: the UPPERCASE block at the top of train.py. The agent owns those. A preset
  only chooses their starting values, written into the baseline train.py when it is rendered.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

QUICK_ENV = "AUTORESEARCH_QUICK"
# Where the kit is published: the notebooks' Colab install cell and badges use this address.
# A placeholder until the kit is published there: change it here, and
# `python scripts/execute_notebooks.py --fix-setup` rewrites the notebooks' install cells and badges.
REPO_URL = "https://github.com/autoresearch-kit/autoresearch-kit"
MODEL_FILE = "model.pt"  # what a run saves in its folder (harness) and the runner then scores


def quick_mode() -> bool:
    """True when AUTORESEARCH_QUICK=1: everything runs in seconds on a CPU."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def describe_machine() -> str:
    """One line saying which mode and hardware a notebook ran in, e.g.
    "quick mode (preset 'quick') on CPU (2 cores, float32), torch 2.13.0+cpu"."""
    import torch

    from .harness import detect_device, detect_precision  # imported here: it pulls in torch

    device = detect_device()
    if device.type == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type.upper()} ({os.cpu_count()} cores"
    dtype = str(detect_precision(device)).removeprefix("torch.")
    mode = "quick" if quick_mode() else "full"
    return f"{mode} mode (preset {auto_preset()!r}) on {where}, {dtype}), torch {torch.__version__}"


@dataclass
class Settings:
    """The fixed part of an experiment, written to settings.json and read by the harness."""

    preset: str = "cpu"  # name of the preset these settings came from
    budget: float = 120.0  # training seconds (start-up and compilation excluded)
    dataset: str = "shakespeare"  # "shakespeare" (embedded), "text", "tinystories", "climbmix"
    text: str | None = None  # the user's training text: a file or folder (dataset="text")
    val_text: str | None = None  # optional separate validation text: a file or folder
    vocab_size: int = 2048  # BPE vocabulary, special tokens included
    seq_len: int = 256  # tokens per row, for training and evaluation
    eval_tokens: int = 2**17  # validation tokens scored by evaluate_bpb
    device: str = "auto"  # "auto" (cuda → mps → cpu), or force "cuda", "mps", "cpu"
    seed: int = 42
    # seconds a run may take on top of its budget (start-up, last step, saving the model);
    # None: the preset's default (runner.startup_allowance). The runner's outside clock kills a
    # run at budget + this, so it is also the most extra training a cheating train.py can hide.
    startup_limit: float | None = None
    cache_dir: str | None = None  # where tokenizers and token files go (default ~/.cache/autoresearch)
    checkpoint: str | None = None  # where the trained model is kept (None: don't keep it)
    prepared: str | None = None  # set by the runner: the prepared training data the harness opens

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "Settings":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)


@dataclass
class Preset:
    """A size for one kind of hardware: fixed settings plus starting hyperparameters."""

    name: str
    description: str
    settings: dict = field(default_factory=dict)  # overrides of Settings fields
    hparams: dict = field(default_factory=dict)  # starting values of train.py's UPPERCASE block


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick",
        "a tiny model that trains in seconds on any CPU (AUTORESEARCH_QUICK=1, tests, demos)",
        settings=dict(budget=4.0, vocab_size=512, seq_len=64, eval_tokens=2**13),
        hparams=dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="L",
                     TOTAL_BATCH_SIZE=2**10, DEVICE_BATCH_SIZE=16, MATRIX_LR=0.02,
                     EMBEDDING_LR=0.3, UNEMBEDDING_LR=0.004, WARMDOWN_RATIO=0.3),
    ),
    "cpu": Preset(
        "cpu",
        "a laptop or CI CPU: ~1M parameters, fp32, a couple of minutes",
        settings=dict(budget=120.0, vocab_size=2048, seq_len=128, eval_tokens=2**16),
        hparams=dict(DEPTH=4, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="L",
                     TOTAL_BATCH_SIZE=2**12, DEVICE_BATCH_SIZE=32, MATRIX_LR=0.02,
                     EMBEDDING_LR=0.3, UNEMBEDDING_LR=0.004, WARMDOWN_RATIO=0.4),
    ),
    "small-gpu": Preset(
        "small-gpu",
        "a 16 GB T4-class GPU (Colab): fp16 with loss scaling, 5 minutes",
        settings=dict(budget=300.0, vocab_size=8192, seq_len=1024, eval_tokens=2**20, dataset="auto"),
        hparams=dict(DEPTH=6, ASPECT_RATIO=64, HEAD_DIM=64, WINDOW_PATTERN="L",
                     TOTAL_BATCH_SIZE=2**16, DEVICE_BATCH_SIZE=16),
    ),
    "small-data": Preset(
        "small-data",
        "any GPU, offline, on a few MB of text (the embedded Shakespeare): sized for ~3 epochs on an "
        "H100-class card, so val_bpb measures learning, not memorisation (slower card: raise the "
        "budget until the summary's epochs line reads ~3)",
        settings=dict(budget=3.0, vocab_size=2048, seq_len=256, eval_tokens=2**16, dataset="shakespeare"),
        hparams=dict(DEPTH=6, ASPECT_RATIO=64, HEAD_DIM=64, WINDOW_PATTERN="L",
                     TOTAL_BATCH_SIZE=2**15, DEVICE_BATCH_SIZE=128, WEIGHT_DECAY=0.8),
    ),
    "h100": Preset(
        "h100",
        "an A100/H100-class GPU at upstream's size: depth 8, seq 2048, vocab 8192, 2^19 tokens/step",
        settings=dict(budget=300.0, vocab_size=8192, seq_len=2048, eval_tokens=40 * 2**19,
                      dataset="auto"),
        hparams=dict(DEPTH=8, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL",
                     TOTAL_BATCH_SIZE=2**19, DEVICE_BATCH_SIZE=128),
    ),
}


def auto_preset() -> str:
    """Pick the preset for the hardware found here (and 'quick' when AUTORESEARCH_QUICK=1)."""
    if quick_mode():
        return "quick"
    import torch

    if torch.cuda.is_available():
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        major, _ = torch.cuda.get_device_capability(0)
        return "h100" if major >= 8 and total_gb >= 38 else "small-gpu"
    return "cpu"


def get_preset(name: str = "auto") -> Preset:
    """The preset called `name` ('auto' chooses for this machine)."""
    if name in (None, "", "auto"):
        name = auto_preset()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} or 'auto'")
    return PRESETS[name]


def make_settings(preset: str = "auto", **overrides) -> Settings:
    """Fixed settings of a preset, with any field overridden (None values are ignored)."""
    p = get_preset(preset)
    values = {"preset": p.name, **p.settings}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("text") and values.get("dataset") in (None, "auto", "shakespeare"):
        values["dataset"] = "text"
    if values.get("dataset") == "auto":  # GPU presets: TinyStories when online
        from .download import auto_dataset

        values["dataset"] = auto_dataset()
    return Settings(**values)


def cache_dir(settings: Settings | None = None) -> Path:
    """Where prepared data lives: settings.cache_dir, else $AUTORESEARCH_CACHE, else ~/.cache."""
    if settings is not None and settings.cache_dir:
        return Path(settings.cache_dir)
    env = os.environ.get("AUTORESEARCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "autoresearch"


def trusted_compile_cache() -> Path:
    """The compile caches only the kit's own runs write (runner._compile_cache says why):
    $AUTORESEARCH_COMPILE_CACHE/trusted, else <cache_dir>/compile/trusted."""
    return Path(os.environ.get("AUTORESEARCH_COMPILE_CACHE") or cache_dir() / "compile") / "trusted"


def compile_cache_env(folder: Path) -> dict[str, str]:
    """The variables that point torch.compile's caches (Inductor's, Triton's) and FlashAttention
    4's compiled kernels (train.py's "fa4") at `folder`."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton"),
            "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
            "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(folder / "flash_attn")}


def copy_compile_cache(trusted: Path, folder: Path) -> None:
    """Copy the trusted compile cache into `folder`. A kit run may be writing it at the same time
    (its temporary files come and go): a file that vanishes mid-copy is skipped, which costs at
    most a recompilation, not the run."""
    try:
        shutil.copytree(trusted, folder, symlinks=True, dirs_exist_ok=True, copy_function=shutil.copy2)
    except shutil.Error:  # raised at the end, after copying everything else
        pass
