"""The runner: train one train.py in a subprocess, watch it, and say how it went.

Contract (kept serializable so a Ray executor can replace this one later): the text of train.py
and a `Settings` go in; a `TrainResult` and `run_dir/run.log` come out. The subprocess runs in
its own process group with cwd = run_dir and an environment without API keys; a hard timeout
kills the whole group.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import data
from .config import Settings
from .redact import without_secrets

PROGRESS_RE = re.compile(r"^step (\d+) \(([\d.]+)%\) \| (.*)$")
SUMMARY_RE = re.compile(r"^([a-z_A-Z]+):\s+(\S+)\s*$")
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "MemoryError",
               "DefaultCPUAllocator: can't allocate", "MPS backend out of memory")
# the last line of a Python error; a SyntaxError in train.py itself comes without a "Traceback"
ERROR_LINE_RE = re.compile(r"^[\w.]*(Error|Exception)\b")


@dataclass
class Progress:
    """One progress line of a training run."""

    step: int
    percent: float  # of the time budget used
    loss: float
    tok_per_sec: float = 0.0
    mfu: float = 0.0
    epoch: int = 1
    remaining: float = 0.0  # seconds of budget left
    lrm: float = 1.0


@dataclass
class TrainResult:
    """How one training run went: its numbers (from the summary block), status and files."""

    status: str = "crash"  # "ok", "crash" or "stopped"
    reason: str = ""  # why it crashed: "exception: …", "nan", "oom", "timeout", "no summary"
    val_bpb: float | None = None
    training_seconds: float = 0.0
    total_seconds: float = 0.0
    startup_seconds: float = 0.0
    peak_vram_mb: float = 0.0
    mfu_percent: float = 0.0
    total_tokens_M: float = 0.0
    num_steps: int = 0
    num_params_M: float = 0.0
    depth: int = 0
    tokens_per_second: float = 0.0
    epochs: float = 0.0
    flops_per_token: float = 0.0  # the model's training FLOPs per token (its size, for fairness)
    load_avg: float = 0.0  # the machine's 1-minute load average when training ended (-1: unknown)
    sandbox: str = ""  # how the training was isolated: "bwrap" or "none"
    device: str = ""
    precision: str = ""
    wall_seconds: float = 0.0  # seen from outside: process start to exit
    returncode: int | None = None
    run_dir: str = ""
    log_path: str = ""
    checkpoint: str | None = None
    error_tail: str = ""  # the last lines of the log when it crashed
    losses: list = field(default_factory=list)  # (step, loss) pairs seen in progress lines

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def memory_gb(self) -> float:
        return self.peak_vram_mb / 1024

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if not self.ok:
            return f"{self.status}: {self.reason} (log: {self.log_path})"
        return (f"val_bpb {self.val_bpb:.4f} | {self.num_steps} steps | "
                f"{self.total_tokens_M:.1f}M tokens | {self.tokens_per_second:,.0f} tok/s | "
                f"MFU {self.mfu_percent:.1f}% | peak mem {self.peak_vram_mb:,.0f} MB | "
                f"start-up {self.startup_seconds:.1f}s | wall {self.wall_seconds:.1f}s")


def parse_progress(line: str) -> Progress | None:
    """`step 00042 (35.0%) | loss: 3.12 | ... ` → Progress, or None for any other line."""
    m = PROGRESS_RE.match(line.strip())
    if not m:
        return None
    fields = dict(part.split(": ", 1) for part in m[3].split(" | ") if ": " in part)
    number = lambda key, default=0.0: float(fields.get(key, default).replace(",", "").rstrip("%s"))
    try:
        return Progress(step=int(m[1]), percent=float(m[2]), loss=number("loss", "nan"),
                        tok_per_sec=number("tok/sec"), mfu=number("mfu"),
                        epoch=int(number("epoch", "1")), remaining=number("remaining"),
                        lrm=number("lrm", "1"))
    except ValueError:
        return None


def parse_summary(log: str) -> dict:
    """The `key: value` lines after the last `---` line of a log (upstream's summary block)."""
    if "\n---\n" not in "\n" + log:
        return {}
    block = ("\n" + log).rsplit("\n---\n", 1)[1]
    return {m[1]: m[2] for m in map(SUMMARY_RE.match, block.splitlines()) if m}


def classify(log: str, returncode: int | None, summary: dict, timed_out: bool) -> tuple[str, str]:
    """(status, reason) of a finished run, from its exit and its log."""
    tail = log[-20000:]
    if timed_out:
        return "crash", "timeout"
    if "FAIL: training diverged" in tail or "TrainingDiverged" in tail:
        return "crash", "nan"
    if "FAIL: non-causal" in tail:
        return "crash", "non-causal"
    for marker, reason in (("past the", "over budget"), ("without run.step_done", "off the clock"),
                           ("evaluation data changed", "data changed")):
        if "FAIL: " in tail and marker in tail:
            return "crash", reason
    if any(marker in tail for marker in OOM_MARKERS) or returncode == -signal.SIGKILL:
        return "crash", "oom"
    if returncode != 0:
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        if lines and ("Traceback" in tail or ERROR_LINE_RE.match(lines[-1].strip())):
            return "crash", f"exception: {lines[-1].strip()[:200]}"
        return "crash", f"exit code {returncode}"
    if "forged" in summary:
        return "crash", "forged summary"
    if "val_bpb" not in summary:
        return "crash", "no summary"
    try:
        val_bpb = float(summary["val_bpb"])
    except ValueError:
        return "crash", "no summary"
    if val_bpb != val_bpb or val_bpb == float("inf"):
        return "crash", "nan"
    return "ok", ""


def clean_env(extra: dict | None = None) -> dict:
    """The parent's environment minus anything that looks like a secret, plus the lib's path."""
    env = without_secrets()
    lib_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [lib_parent, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # idle OpenMP threads sleep instead of spinning: on a busy CPU (a laptop running a notebook,
    # CI) spinning threads made small CPU runs 10-25x slower; on a quiet one it costs nothing
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


def default_timeout(settings: Settings) -> float:
    """Budget + evaluation + a start-up allowance (compilation on a GPU takes a while)."""
    return settings.budget * 1.5 + 120 + (240 if settings.preset in ("h100", "small-gpu") else 0)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the run's whole process group, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_training(script_text: str, settings: Settings, run_dir: str | Path,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_line: Callable[[str], None] | None = None,
                 timeout: float | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Train `script_text` under `settings` in `run_dir`; stream progress; return the result."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.py").write_text(script_text)
    settings.to_json(run_dir / "settings.json")
    log_path = run_dir / "run.log"
    timeout = timeout or default_timeout(settings)
    prepared = data.prepare(settings, verbose=False)
    fingerprint = prepared.fingerprint()  # checked again after the run, from outside it
    env = clean_env({"AUTORESEARCH_SETTINGS": str(run_dir / "settings.json")})
    result = TrainResult(run_dir=str(run_dir), log_path=str(log_path))
    t0 = time.time()
    env["AUTORESEARCH_T0"] = repr(t0)  # so start-up includes the interpreter and torch import
    env["AUTORESEARCH_RUNNER"] = "1"  # the harness exits fast, and with us if we die
    env["AUTORESEARCH_RUN_ID"] = run_id = secrets.token_hex(16)  # the harness signs its summary
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch_lib.launch", "train.py"],
                                cwd=run_dir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)  # its own process group
        timer = threading.Timer(timeout, kill_group, [proc])
        timer.start()
        watcher = threading.Thread(target=_watch_stop, args=(proc, stop), daemon=True)
        watcher.start()
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
                progress = parse_progress(line)
                if progress:
                    result.losses.append((progress.step, progress.loss))
                    if on_progress:
                        on_progress(progress)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): take the group down
                kill_group(proc)
    timed_out = not (stop and stop.is_set()) and time.time() - t0 >= timeout
    result = _finish(result, log_path, proc.returncode, time.time() - t0, timed_out, stop, settings,
                     run_id)
    if result.ok and prepared.fingerprint() != fingerprint:
        result.status, result.reason, result.val_bpb = "crash", "data changed", None
    return result


def _watch_stop(proc: subprocess.Popen, stop: threading.Event | None) -> None:
    while stop is not None and proc.poll() is None:
        if stop.wait(0.2):
            kill_group(proc)
            return


def _finish(result, log_path, returncode, wall, timed_out, stop, settings, run_id) -> TrainResult:
    log = Path(log_path).read_text(errors="replace")
    summary = parse_summary(log)
    if summary and summary.get("run_id") != run_id:  # printed by train.py, not by the harness
        summary = {"forged": "yes"}
    result.returncode, result.wall_seconds = returncode, wall
    if stop is not None and stop.is_set() and returncode != 0:
        result.status, result.reason = "stopped", "stopped by the user"
    else:
        result.status, result.reason = classify(log, returncode, summary, timed_out)
    for key, value in summary.items():
        if key in TrainResult.__dataclass_fields__ and key not in ("status", "reason"):
            kind = type(getattr(result, key))
            try:
                setattr(result, key, value if kind is str else kind(float(value)) if kind is int else float(value))
            except ValueError:
                pass
    if not result.ok:
        result.val_bpb = None
        result.error_tail = "\n".join(log.strip().splitlines()[-30:])
    if settings.checkpoint and Path(settings.checkpoint).exists():
        result.checkpoint = settings.checkpoint
    return result
