"""The harness: the fixed part of every experiment, imported by train.py.

train.py (which the agent edits) owns the model, the optimizer and the training step. The
harness owns everything that must stay the same between experiments so that their val_bpb can
be compared: the device and precision, the data, the wall-clock budget and the final report.
Usage, in train.py:

    run = harness.setup()                       # settings, device, precision, data
    loader = run.train_loader(batch_size)
    run.begin(model, tokens_per_step)          # start the training clock
    while not run.done:                         # the budget is measured here, not by train.py
        ... forward / backward / optimizer step ...
        run.step_done(loss, lrm=lr_multiplier)  # timing, progress line, NaN check
    run.finish(model, config)                   # checkpoint + the training summary

Under the runner the harness runs *inside the experiment's process*, so nothing it measures can
be trusted against a train.py written to cheat (Python hides nothing from code in the same
process). Its checks catch honest mistakes early and explain them; the guarantees come from
outside: the runner's sandbox and wall clock, and val_bpb computed by the runner from the saved
checkpoint, in separate processes (scoring.py). Run directly (`python train.py`), `finish`
also evaluates the model here and prints val_bpb, as upstream's script does.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .config import MODEL_FILE, Settings, make_settings

SETTINGS_ENV = "AUTORESEARCH_SETTINGS"  # path of the settings.json the runner wrote
RUNNER_ENV = "AUTORESEARCH_RUNNER"  # set when the runner started this process
# warm-up steps that may stay off the budget (compilation happens in the first ones)
MAX_EXCLUDED_STEPS = {"cuda": 3}  # other devices: 1
# when the experiment was asked for: the runner passes it; else the harness's import time
T_PROCESS_START = float(os.environ.get("AUTORESEARCH_T0", time.time()))
T_HARNESS_IMPORTED = time.time()  # train.py imports torch first, so torch's import is before this


def process_started() -> float | None:
    """When this Python process started (time.time() scale), from /proc; None where unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    started = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    return started if T_PROCESS_START - 1 <= started <= T_HARNESS_IMPORTED else None

# Dense peak TFLOP/s of common cards, for MFU: (bf16/fp16 tensor-core peak).
PEAK_TFLOPS = {
    "H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 NVL": 835, "H100 PCIe": 756,
    "H100": 756, "GH200": 989, "B200": 2250, "A100": 312, "A800": 312, "A10G": 125, "A10": 125,
    "L40S": 362, "L40": 181, "L4": 121, "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155,
    "V100": 125, "T4": 65, "P100": 19,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of the card in use (None on CPU/MPS or an unknown card: no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # ordered: the most specific names first
        if key in name:
            return tflops * 1e12
    return None


def detect_device(preference: str = "auto") -> torch.device:
    """cuda → mps → cpu, unless settings or AUTORESEARCH_DEVICE ask for one."""
    preference = os.environ.get("AUTORESEARCH_DEVICE", preference)
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def detect_precision(device: torch.device) -> torch.dtype:
    """bf16 on CUDA capability ≥ 8.0; fp16 (with loss scaling) on older CUDA; fp32 elsewhere.

    Not torch.cuda.is_bf16_supported(): on a T4 it answers True through slow emulation.
    On CPU bf16 autocast measured slower than fp32 on ordinary x86 cores, so fp32 it is.
    """
    override = os.environ.get("AUTORESEARCH_DTYPE")
    if override:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[override]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def load_settings() -> Settings:
    """The settings the runner wrote, else ./settings.json, else the preset for this machine."""
    path = os.environ.get(SETTINGS_ENV) or ("settings.json" if Path("settings.json").exists() else None)
    return Settings.from_json(path) if path else make_settings("auto")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes (a no-op context in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def validation_rows(prepared: data.Prepared, settings: Settings) -> torch.Tensor:
    """The fixed validation set: the first rows of an unshuffled packing of the val split."""
    return torch.from_numpy(data.validation_rows(prepared, settings.seq_len, settings.eval_tokens))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or exploded; the runner records the run as a crash."""


class IntegrityError(RuntimeError):
    """The run broke a rule the metric depends on (causality, the budget, the data)."""


def fail(code: str, message: str) -> None:
    """Print the one line the runner reads to classify a failed run: `FAIL <code>: <message>`.

    The runner maps the code (see runner.FAIL_REASONS), never the wording, to the reason in
    results.tsv, so a message can be reworded freely.
    """
    print(f"FAIL {code}: {message}", flush=True)


@torch.no_grad()
def causality_probe(model, row: torch.Tensor, device, autocast=contextlib.nullcontext) -> None:
    """Change the tokens after position t and check the logits up to t stay the same.

    A model that looks ahead (at the very tokens it must predict) would score a wonderful
    val_bpb without learning anything; this catches it before it is evaluated.
    """
    x = row[None, :-1].to(device)
    t = x.size(1) // 2
    other = x.clone()
    other[:, t + 1:] = torch.randint_like(other[:, t + 1:], 0, int(x.max()) + 1)
    with autocast():
        a, b = model(x)[:, :t + 1].float(), model(other)[:, :t + 1].float()
    scale = a.abs().max().item() + 1e-6
    if not torch.allclose(a, b, rtol=0, atol=1e-3 * scale):
        raise IntegrityError(f"non-causal: changing tokens after position {t} changed the logits "
                             f"at positions up to {t} (by up to {(a - b).abs().max().item():.3g}). "
                             "A position may only look at itself and earlier tokens.")


def setup(settings: Settings | None = None) -> "Run":
    """Read the fixed settings, seed everything, pick device and precision, load the data."""
    if os.environ.get(RUNNER_ENV):
        watch_parent()
    return Run(settings or load_settings())


def watch_parent() -> None:
    """Exit if the runner that started us dies (e.g. the loop was SIGKILLed): no orphan runs."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class Run:
    """One training run's fixed infrastructure (see the module docstring for the life cycle)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.device = detect_device(settings.device)
        self.dtype = detect_precision(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(self.device)
        # under the runner: the training files it prepared (the validation tokens are not there)
        self.data = (data.open_prepared(settings.prepared) if settings.prepared
                     else data.prepare(settings, verbose=False))
        self.vocab_size = self.data.vocab_size
        self.bos = self.vocab_size - 1
        self.seq_len = settings.seq_len
        # fp16 needs loss scaling so small gradients don't underflow; bf16 and fp32 don't
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens, self.training_seconds = 0, 0, 0.0
        self.timed_tokens = 0  # tokens of the steps that count against the budget
        print(f"device: {self.device} ({self.device_name}) | precision: {self.precision} | "
              f"budget: {settings.budget:g}s | data: {settings.dataset}, "
              f"{self.data.train_tokens:,} train tokens, vocab {self.vocab_size}", flush=True)
        self.t_setup_done = time.time()

    # ------------------------------------------------------------------ device and precision
    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return {"mps": "Apple GPU", "cpu": f"{os.cpu_count()} CPU cores"}.get(self.device.type, "?")

    def autocast(self):
        """Mixed precision for the forward pass (a no-op context in fp32)."""
        return autocast(self.device, self.dtype)

    def compile(self, model):
        """torch.compile where it pays (CUDA); elsewhere the model itself.

        The runner keeps torch.compile's caches between experiments, so a train.py compiled
        before starts in seconds. AOTAutograd's cache skips graphs holding a custom
        autograd.Function (train.py's loss) unless allowed: allowed, a warm start compiles in
        5 s instead of 12-15 s (H200). Dynamo traces the function's forward and backward into the
        graph, so an edit to either changes the cache key."""
        if self.device.type == "cuda" and os.environ.get("AUTORESEARCH_COMPILE", "1") != "0":
            import torch._functorch.config

            torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
            return torch.compile(model, dynamic=False)
        return model

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    # ------------------------------------------------------------------ data
    def train_loader(self, batch_size: int):
        """(inputs, targets, epoch) batches of (batch_size, seq_len) from the training split."""
        return data.make_dataloader(self.data.tokens("train"), self.bos, batch_size, self.seq_len,
                                    self.device, seed=self.settings.seed)

    # ------------------------------------------------------------------ the clock
    def begin(self, model, tokens_per_step: int, exclude_steps: int | None = None) -> None:
        """Start the training clock. The first steps (compilation, warm-up) don't count, but
        never more than MAX_EXCLUDED_STEPS of them, whatever train.py asks for."""
        self.model_flops = getattr(model, "estimate_flops", lambda: None)()
        self.tokens_per_step = tokens_per_step
        most = MAX_EXCLUDED_STEPS.get(self.device.type, 1)
        self.exclude_steps = most if exclude_steps is None else max(0, min(int(exclude_steps), most))
        self.peak = peak_flops(self.device)
        self._t_last = self.t_begin = time.time()
        self.t_first_step = None
        self.excluded_seconds, self.last_dt = 0.0, 0.0
        self._t_printed = 0.0
        self.t_training_start = None  # set once the excluded steps are done

    @property
    def progress(self) -> float:
        """Fraction of the budget used, 0 → 1: drives the learning-rate schedule."""
        return min(1.0, self.training_seconds / self.settings.budget)

    @property
    def done(self) -> bool:
        return self.training_seconds >= self.settings.budget

    def step_done(self, loss, lrm: float = 1.0, epoch: int | None = None) -> None:
        """Call after every optimizer step: measures time, checks the loss, prints progress."""
        loss = float(loss)  # waits for the device, so the timing below is honest
        self.sync()
        now = time.time()
        dt, self._t_last = now - self._t_last, now
        self.step += 1
        self.tokens += self.tokens_per_step
        self.last_dt = dt
        if self.step > self.exclude_steps:
            self.training_seconds += dt
            self.timed_tokens += self.tokens_per_step
        else:  # compilation and warm-up: not on the budget
            self.excluded_seconds += dt
            self.t_training_start = now
            self.t_first_step = self.t_first_step or now
        if not math.isfinite(loss) or loss > 100:
            fail("nan_loss", f"training diverged, loss={loss} at step {self.step}")
            raise TrainingDiverged(f"loss is {loss} at step {self.step}")
        self.epoch = epoch if epoch is not None else getattr(self, "epoch", 1)
        if self.step <= 5 or now - self._t_printed >= 1.0 or self.done:
            self._t_printed = now
            self._print_progress(loss, lrm, dt)
        if self.step == self.exclude_steps:  # the clock starts now: say where the time went
            print(self.startup_line(), flush=True)

    def _print_progress(self, loss: float, lrm: float, dt: float) -> None:
        tok_s = self.tokens_per_step / max(dt, 1e-9)
        mfu = self.mfu(tok_s)
        remaining = max(0.0, self.settings.budget - self.training_seconds)
        print(f"step {self.step:05d} ({100 * self.progress:.1f}%) | loss: {loss:.6f} | "
              f"lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {tok_s:,.0f} | "
              f"mfu: {mfu:.1f}% | epoch: {self.epoch} | remaining: {remaining:.0f}s", flush=True)

    def startup_line(self) -> str:
        """Where the start-up went, from the ask to the end of the warm-up steps, e.g.
        `start-up: 9.8s = launch 0.3 + python and imports 3.1 + device and data 1.2 + model 0.6 +
        first step (compilation) 4.0 + warm-up 0.6`. Everything before the clock starts counts
        against no budget, but it is paid by every experiment."""
        started = process_started()
        parts = ([("launch", started - T_PROCESS_START), ("python and imports", T_HARNESS_IMPORTED - started)]
                 if started else [("launch, python and imports", T_HARNESS_IMPORTED - T_PROCESS_START)])
        parts += [("device and data", self.t_setup_done - T_HARNESS_IMPORTED),
                  ("model", self.t_begin - self.t_setup_done),
                  ("first step" + (" (compilation)" if self.device.type == "cuda" else ""),
                   self.t_first_step - self.t_begin),
                  ("warm-up", self.t_training_start - self.t_first_step)]
        total = self.t_training_start - T_PROCESS_START
        return f"start-up: {total:.1f}s = " + " + ".join(f"{name} {max(0.0, t):.1f}" for name, t in parts)

    def mfu(self, tokens_per_second: float) -> float:
        """Model FLOPs utilisation in percent of the card's peak (0 where unknown, e.g. CPU)."""
        if not self.peak or not self.model_flops:
            return 0.0
        return 100 * self.model_flops * tokens_per_second / self.peak

    # ------------------------------------------------------------------ the metric
    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 32) -> float:
        """evaluate_bpb on the fixed validation rows (run directly only: under the runner the
        validation tokens are not even visible here, and scoring.py scores the checkpoint)."""
        rows = validation_rows(self.data, self.settings)
        causality_probe(model, rows[0], self.device, self.autocast)
        return evaluate_bpb(model, rows, self.data.token_bytes(), self.device, batch_size,
                            self.autocast)

    # ------------------------------------------------------------------ the report
    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.device.type == "mps":
            return torch.mps.driver_allocated_memory() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: peak RSS

    def check_clock(self) -> None:
        """The harness measured the training time; refuse a run that trained past the budget."""
        budget = self.settings.budget
        if self.training_seconds > budget + self.last_dt + 0.01 * budget:  # one step may cross it
            fail("over_budget", f"trained {self.training_seconds:.1f}s, past the {budget:g}s "
                 "budget: train.py must stop when run.done is True.")
            raise IntegrityError("over budget")
        outside = time.time() - self.t_begin - self.training_seconds - self.excluded_seconds
        if outside > 0.1 * budget + 10:
            fail("off_clock", f"{outside:.0f}s passed between training steps without "
                 "run.step_done(): all training must be on the harness's clock.")
            raise IntegrityError("off the clock")

    def finish(self, model, config=None, eval_batch_size: int = 32) -> float | None:
        """Check the clock, save the model, print the summary block (and, run directly, val_bpb).

        Under the runner this ends the process: the runner scores model.pt in a separate process.
        """
        model.eval()
        if not hasattr(self, "t_begin"):
            fail("off_clock", "run.begin() was never called: the training clock never started.")
            raise IntegrityError("off the clock")
        self.check_clock()
        under_runner = bool(os.environ.get(RUNNER_ENV))
        path = MODEL_FILE if under_runner else (self.settings.checkpoint or MODEL_FILE)
        save_checkpoint(path, model, config, self.settings)
        val_bpb = None if under_runner else self.evaluate(model, eval_batch_size)
        t_end = time.time()
        startup = (self.t_training_start or t_end) - T_PROCESS_START
        num_params = sum(p.numel() for p in model.parameters())
        tok_s = self.timed_tokens / self.training_seconds if self.training_seconds else 0.0
        train_tokens_seen = self.tokens / max(1, self.data.train_tokens)
        summary = {
            **({} if val_bpb is None else {"val_bpb": f"{val_bpb:.6f}"}),
            "training_seconds": f"{self.training_seconds:.1f}",
            "total_seconds": f"{t_end - T_PROCESS_START:.1f}",
            "peak_vram_mb": f"{self.peak_memory_mb():.1f}",
            "mfu_percent": f"{self.mfu(tok_s):.2f}",
            "total_tokens_M": f"{self.tokens / 1e6:.1f}",
            "num_steps": f"{self.step}",
            "num_params_M": f"{num_params / 1e6:.3f}",
            "flops_per_token": f"{self.model_flops or 0:.6g}",
            "depth": f"{getattr(config, 'n_layer', '?')}",
            "startup_seconds": f"{startup:.1f}",
            "tokens_per_second": f"{tok_s:.0f}",
            "epochs": f"{train_tokens_seen:.2f}",
            "device": self.device_name.replace(" ", "_"),
            "precision": self.precision,
            # the fixed settings as this process saw them: the runner checks them against its own
            "budget": f"{self.settings.budget:g}",
            "dataset": self.settings.dataset,
        }
        lines = ["---", *(f"{key + ':':<20}{value}" for key, value in summary.items())]
        print("\n".join(lines), flush=True)
        if under_runner:  # a child of the runner: skip the slow interpreter teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return val_bpb


def evaluate_bpb(model, rows: torch.Tensor, token_bytes, device, batch_size: int = 32,
                 autocast=contextlib.nullcontext) -> float:
    """Bits per byte of `model` on fixed token rows: the one metric every experiment reports.

    The model only returns logits; the cross-entropy is computed here, summed in nats over every
    target that is a real token (special tokens have 0 bytes and are skipped), and divided by
    ln(2) × the number of bytes those targets stand for. Because it is per byte of text, not per
    token, models with different vocabularies can be compared.
    """
    token_bytes = torch.as_tensor(token_bytes, device=device)
    total_nats, total_bytes = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = model(x)
        if logits.shape[:2] != y.shape:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, "
                             f"expected (batch, seq_len, vocab) = {tuple(y.shape)} + (vocab,)")
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nbytes = token_bytes[y.flatten()]
        total_nats += (nats * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    model.train(was_training)
    return total_nats / (math.log(2) * total_bytes)


def save_checkpoint(path, model, config, settings: Settings) -> None:
    """Weights + config + the train.py source that defines the model (evaluate rebuilds it).

    Plain tensors, numbers and text only, so it loads with torch.load(weights_only=True):
    loading a checkpoint never runs code from it.
    """
    script = Path(sys.argv[0]).read_text() if sys.argv and sys.argv[0].endswith(".py") else None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = asdict(config) if is_dataclass(config) else config
    payload = {"state_dict": state, "config": config, "train_py": script,
               "settings": asdict(settings)}
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
