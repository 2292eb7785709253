"""The runner: train one train.py, score the model it saved, and say how it went.

Contract (serializable, so a Ray task can run it anywhere): the text of train.py and a
`Settings` go in; a `TrainResult` and the run's log come out. No global state.

    1. prepare the data (here, once; the run only reads the training files)
    2. train: `python -m autoresearch_lib.launch train.py` in the sandbox (sandbox.py), cwd =
       run_dir, under an outside clock: budget + start-up allowance, then the whole process
       group is killed. Its output is read live (progress) and kept capped (output.py).
    3. score: the model it saved (model.pt) is scored by scoring.py, in separate processes
       train.py's code cannot reach; val_bpb comes from there, never from the run's own output.
    4. check that the evaluation data is as before, and write the log.

What the training process reports about itself (steps, tokens/s, memory) is informative; what
decides — the clock, the data, val_bpb — is measured from outside it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import data, sandbox, scoring
from .baseline import render_train_py
from .config import MODEL_FILE, PRESETS, Settings, compile_cache_env, copy_compile_cache, trusted_compile_cache
from .output import OutputCapture
from .records import write_atomic

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
    metric: float | None = None  # the task's number: val_bpb for GPT training (tasks.py)
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
    device: str = ""  # what it trained on: "cpu", "cuda", or the GPU's name (parallel runs)
    host: str = ""  # the machine it ran on (parallel runs: the Ray worker's)
    beside: int = 0  # other experiments' code that ran on that machine while it trained (sandbox.untrusted_code)
    precision: str = ""
    wall_seconds: float = 0.0  # seen from outside: start to the end of scoring
    eval_seconds: float = 0.0  # scoring (both model servers, the spot checks)
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
    number = lambda key, default="0": float(str(fields.get(key, default)).replace(",", "").rstrip("%s"))
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


# the harness's and the scorer's failure codes (`FAIL <code>: …`) and what results.tsv records
FAIL_REASONS = {
    "nan_loss": "nan", "over_budget": "over budget", "off_clock": "off the clock",
    "non_causal": "non-causal", "data_changed": "data changed", "timeout": "timeout",
    "no_checkpoint": "no checkpoint", "bad_checkpoint": "bad checkpoint",
    "eval_failed": "evaluation failed", "settings_changed": "settings changed",
    "forged_summary": "forged summary",
}
FAIL_RE = re.compile(r"^FAIL (\w+): ", re.MULTILINE)


def failure(code: str, detail: str = "") -> str:
    """The results.tsv reason for a failure code, e.g. failure("eval_failed", "ValueError …")."""
    reason = FAIL_REASONS.get(code, code)
    return f"{reason}: {detail}"[:300] if detail else reason


def classify(log: str, returncode: int | None, summary: dict, timed_out: bool) -> tuple[str, str]:
    """(status, reason) of a finished training process, from its exit and its output."""
    tail = log[-20000:]
    if timed_out:
        return "crash", "timeout"
    codes = FAIL_RE.findall(tail)
    if codes:
        return "crash", failure(codes[-1])
    if "TrainingDiverged" in tail:
        return "crash", "nan"
    # the kernel's out-of-memory killer sends SIGKILL (bwrap reports a child's death by signal
    # n as exit status 128 + n)
    if any(marker in tail for marker in OOM_MARKERS) or returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "crash", "oom"
    if returncode != 0:
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        if lines and ("Traceback" in tail or ERROR_LINE_RE.match(lines[-1].strip())):
            return "crash", f"exception: {lines[-1].strip()[:200]}"
        return "crash", f"exit code {returncode}"
    if "val_bpb" in summary:  # the training process can't know val_bpb: it printed a fake one
        return "crash", "forged summary"
    if "training_seconds" not in summary:
        return "crash", "no summary"
    return "ok", ""


def clean_env(extra: dict | None = None) -> dict:
    """The environment of a run: the sandbox's allow-list (no API keys, whatever their names),
    the kit on the path, and `extra`."""
    env = sandbox.environment({
        "PYTHONPATH": str(sandbox.package_dir().parent), "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
        # idle OpenMP threads sleep instead of spinning: on a busy CPU (a laptop running a
        # notebook, CI) spinning threads made small CPU runs 10-25x slower
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    env.update(extra or {})
    return env


def startup_allowance(settings: Settings) -> float:
    """Seconds a run may take before and after its budget: start-up (Python, torch, building the
    model; compilation on a GPU), the last step, saving the model. The outside clock allows
    budget + this, so it is also the most extra training a cheating train.py could hide."""
    if settings.startup_limit is not None:
        return settings.startup_limit
    gpu = settings.preset in ("h100", "small-gpu", "small-data")  # compiling: 40 s on an H100
    return (120.0 if gpu else 20.0) + 0.05 * settings.budget


def default_timeout(settings: Settings) -> float:
    """The training process's wall-clock limit, measured from outside: budget + allowance."""
    return settings.budget + startup_allowance(settings)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (the sandbox takes everything inside with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


ALONE = "this run confirms a result alone"


def run_training(script_text: str, settings: Settings, run_dir: str | Path,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_line: Callable[[str], None] | None = None,
                 timeout: float | None = None, stop: threading.Event | None = None,
                 log_path: str | Path | None = None, alone: bool = False) -> TrainResult:
    """Train `script_text` under `settings` in `run_dir`, score the model; return the result.

    The log goes to `log_path` (default run_dir/run.log). See the module docstring.
    alone: no other experiment's code runs on this machine from start to end (it waits for
    theirs to end, and theirs for it): a wave's leader is confirmed so (loop.py).
    """
    if alone:
        with sandbox.untrusted_code(alone=True, say=on_line, why=ALONE):
            return run_training(script_text, settings, run_dir, on_progress, on_line, timeout,
                                stop, log_path)
    t0 = time.time()
    run_dir, log_path, result, use_sandbox, say, lines = start(run_dir, log_path, on_line)
    (run_dir / "train.py").write_text(script_text, encoding="utf-8")
    prepared = data.prepare(settings, verbose=False)  # here, once: the run itself only reads
    fingerprint = prepared.fingerprint()  # checked again after the run
    with sandbox.private_folder("run") as private:
        ran = _train(script_text, settings, run_dir, prepared, private, use_sandbox, result,
                     on_progress, on_line, timeout or default_timeout(settings), stop, t0)
    log = ran.capture.text()
    summary = parse_summary(log)
    result.returncode, result.beside = ran.returncode, ran.beside
    if stop is not None and stop.is_set():
        result.status, result.reason = "stopped", "stopped by the user"
    elif ran.over_disk:
        result.status, result.reason = "crash", over_disk(ran.over_disk, run_dir, say)
    else:
        result.status, result.reason = classify(log, ran.returncode, summary, ran.timed_out)
        if ran.timed_out:
            say(f"timeout: the run was still going after {time.time() - t0:.0f}s, the limit for a "
                f"{settings.budget:g}s budget (start-up allowance included), so it was killed")
    _fill(result, summary)
    if result.ok:
        _check_settings(result, summary, settings)
    if result.ok and prepared.fingerprint() != fingerprint:  # before scoring with them
        result.status, result.reason = "crash", failure("data_changed")
    if result.ok:
        _score(result, script_text, settings, prepared, run_dir, use_sandbox, say)
    result.load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    result.wall_seconds = time.time() - t0
    if result.ok:
        for key in ("val_bpb", "sandbox"):
            say(f"{key + ':':<20}{getattr(result, key) if key != 'val_bpb' else f'{result.val_bpb:.6f}'}")
    else:
        result.val_bpb = result.metric = None
        say(f"FAIL {result.reason}")
    write_log(result, log, lines, log_path)
    return result


def start(run_dir, log_path, on_line, what: str = "train.py"):
    """What every run starts with (GPT training here, a task's command in tasks.py): a fresh run
    folder, where its log goes, the sandbox in use, a TrainResult saying so, and `say` for the
    runner's own lines (shown at once, added to the log at the end: `said`)."""
    run_dir = fresh_dir(Path(run_dir).resolve())
    log_path = Path(log_path).resolve() if log_path else run_dir / "run.log"
    use_sandbox = sandbox.mode() == "bwrap"
    result = TrainResult(run_dir=str(run_dir), log_path=str(log_path),
                         sandbox="bwrap" if use_sandbox else "none")
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if on_line:
            on_line(line)

    if not use_sandbox:
        say(f"{sandbox.no_sandbox_warning(what)} ({sandbox.why_not()})")
    return run_dir, log_path, result, use_sandbox, say, said


def write_log(result: TrainResult, output: str, said: list[str], log_path: Path) -> None:
    """The run's log: its (capped) output, then the runner's lines. Renamed into place, never
    written through a link a run may have left at run_dir/run.log; a crash keeps its tail."""
    text = output + "".join(f"{line}\n" for line in said)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(log_path, text.encode("utf-8", "replace"))
    if not result.ok:
        result.error_tail = "\n".join(text.strip().splitlines()[-30:])


def over_disk(why: str, run_dir: Path, say) -> str:
    """A run stopped for writing more than its share of the disk (sandbox.disk_watch): what it
    wrote is deleted at once (its log is written after), so the disk is free again for the
    loop's records and the next run; the reason results.tsv records."""
    sandbox.remove(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"disk: {why}. It was stopped, and what it wrote was deleted.")
    return failure("disk", why)


def fresh_dir(run_dir: Path) -> Path:
    """An empty run folder: what an earlier attempt left there moves to NAME.prev, so nothing
    a run wrote (weights, say) is ever in the next run's view."""
    if run_dir.exists() and any(run_dir.iterdir()):
        previous = run_dir.with_name(run_dir.name + ".prev")
        sandbox.remove(previous)
        run_dir.rename(previous)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _train(script_text, settings, run_dir, prepared, private, use_sandbox, result, on_progress,
           on_line, limit, stop, t0):
    """Run the training process under the outside clock (run_command's Ran)."""
    # what the run may read: the training tokens and a manifest of them; settings it can't edit
    (private / "data").mkdir()
    info = json.loads((prepared.dir / "manifest.json").read_text())
    info.pop("fingerprint", None)
    (private / "data" / "manifest.json").write_text(json.dumps(info))
    inside = "/autoresearch" if use_sandbox else str(private)
    run_settings = replace(settings, checkpoint=None, prepared=f"{inside}/data")
    run_settings.to_json(private / "settings.json")
    env = clean_env({"AUTORESEARCH_SETTINGS": f"{inside}/settings.json",
                     "AUTORESEARCH_T0": repr(t0), "AUTORESEARCH_RUNNER": "1"})
    argv = [sys.executable, "-m", "autoresearch_lib.launch", "train.py"]
    caches = _compile_cache(env, script_text, private)
    tmp = sandbox.temporary_folder(private, env, use_sandbox)
    if use_sandbox:
        files = {f"{inside}/settings.json": private / "settings.json",
                 f"{inside}/data/manifest.json": private / "data" / "manifest.json",
                 **{f"{inside}/data/{name}": prepared.dir / name for name in data.TRAINING_FILES}}
        argv = sandbox.command(argv, cwd=run_dir, writable=[run_dir] + caches, files=files, tmp=tmp)
    else:
        for name in data.TRAINING_FILES:
            os.symlink(prepared.dir / name, private / "data" / name)

    def line(text: str) -> None:
        if on_line:
            on_line(text)
        progress = parse_progress(text)
        if progress:
            if not result.losses:
                result.startup_seconds = time.time() - t0  # measured here, not by the run
            result.losses.append((progress.step, progress.loss))
            if on_progress:
                on_progress(progress)

    return run_command(argv, run_dir, env, t0 + limit, stop, line, writes=[run_dir, private, *caches])


@dataclass
class Ran:
    """How a command that run_command ran ended."""

    capture: OutputCapture  # its output
    returncode: int | None
    timed_out: bool  # killed at the deadline
    over_disk: str  # killed for writing more than its share of the disk: why ('' if not)
    beside: int  # how much other experiments' code ran on this machine meanwhile


def run_command(argv: list[str], cwd: Path, env: dict, deadline: float,
                stop: threading.Event | None = None,
                on_line: Callable[[str], None] | None = None, writes: list[Path] = ()) -> Ran:
    """Run `argv` (already wrapped in the sandbox, if any) under an outside clock.

    It gets its own process group, no stdin, and one pipe for stdout and stderr, read live and
    kept capped and redacted (output.py); `on_line` sees every line. At `deadline` (a
    time.time() value), on `stop`, or once it has written more than its share of the disk into
    the folders `writes` (sandbox.disk_watch), the whole group is killed. The GPT runner and
    tasks.py both run their commands through here.
    """
    proc = None
    with (sandbox.untrusted_code(say=on_line) as hold,  # (not beside another experiment's spot checks)
          sandbox.disk_watch([cwd, *writes], lambda: proc and kill_group(proc)) as disk):
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group
        capture = OutputCapture(os.dup(proc.stdout.fileno()), on_line=on_line)
        proc.stdout.close()
        timed_out = _wait(proc, deadline, stop)
    if not capture.wait(2.0):  # something outside the run still holds its output: stop reading
        capture.stop()
    return Ran(capture, proc.returncode, timed_out and not disk.over, disk.over, hold.beside)


def _wait(proc: subprocess.Popen, deadline: float, stop: threading.Event | None) -> bool:
    """Wait for the process; kill its group at the deadline or on stop. True if it timed out."""
    try:
        while proc.poll() is None:
            if stop is not None and stop.is_set():
                kill_group(proc)
                return False
            if time.time() >= deadline:
                kill_group(proc)
                return True
            try:
                proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): take the group down
            kill_group(proc)
    return False


def _compile_cache(env: dict, script_text: str, private: Path) -> list[Path]:
    """On a GPU machine: torch.compile's caches for this run, and FlashAttention 4's if train.py
    uses it (a cold compile costs ~45 s on an H200, a warm one ~6 s).

    A run can write anything into the cache it is given, and a later run *loads* what it finds
    there: compiled code that could sabotage another script's run, or weights that a script's
    next run picks up (more training than the budget). So only the kit's own code writes a cache
    that outlives its run: runs of an unedited preset's train.py use <cache>/compile/trusted
    ($AUTORESEARCH_COMPILE_CACHE instead of <cache>/compile, if set). Every other run gets a
    copy of it in its private folder, thrown away with the run: an edit that leaves the model's
    graph alone (a learning rate, say) still starts warm, any edit finds the kernels it shares
    with the baseline, and nothing a run writes reaches another run.
    """
    if not sandbox.gpu_devices():
        return []
    trusted = trusted_compile_cache()
    folder = trusted if script_text in _baseline_scripts() else private / "compile"
    if folder != trusted and trusted.is_dir():
        copy_compile_cache(trusted, folder)
    folder.mkdir(parents=True, exist_ok=True)
    env.update(compile_cache_env(folder))
    return [folder]


@functools.cache
def _baseline_scripts() -> frozenset[str]:
    """The scripts that write the trusted compile cache: the kit's train.py, as each preset writes it."""
    return frozenset(render_train_py(p) for p in PRESETS)


def _fill(result: TrainResult, summary: dict) -> None:
    """The numbers of the training summary (the run's own report: informative, not trusted)."""
    for key, value in summary.items():
        if key in TrainResult.__dataclass_fields__ and key not in (
                "status", "reason", "val_bpb", "sandbox", "startup_seconds"):
            kind = type(getattr(result, key))
            try:
                setattr(result, key, value if kind is str else kind(float(value)) if kind is int else float(value))
            except ValueError:
                pass


def _check_settings(result: TrainResult, summary: dict, settings: Settings) -> None:
    """The run echoes the budget and data it used: they must be the ones it was given."""
    echoed = {"budget": f"{settings.budget:g}", "dataset": settings.dataset}
    changed = [k for k, v in echoed.items() if summary.get(k) != v]
    if changed:
        result.status, result.reason = "crash", failure(
            "settings_changed", ", ".join(f"{k} {summary.get(k)} instead of {echoed[k]}" for k in changed))


def _score(result, script_text, settings, prepared, run_dir, use_sandbox, say) -> None:
    """val_bpb of the saved model, by scoring.py (see there); a failure makes the run a crash."""
    server_lines: list[str] = []
    try:
        scored = scoring.score(script_text, run_dir / MODEL_FILE, settings, prepared, use_sandbox,
                               server_lines, timeout=120 + settings.budget, say=say)
    except scoring.ScoringError as e:
        result.status, result.reason = "crash", failure(e.code, str(e) if e.code in ("eval_failed", "disk") else "")
        for line in [*server_lines[-20:], f"scoring failed: {e}"]:
            say(line)
        return
    result.val_bpb = result.metric = round(scored.val_bpb, 6)  # as results.tsv and the log say it
    say(f"scored by the runner: {scored.spot_checks} spot checks, largest gap "
        f"{scored.largest_gap:.2g} nats, {scored.seconds:.1f}s")
    result.eval_seconds = scored.seconds
    if settings.checkpoint:  # a verified copy where the user asked for the model
        target = Path(settings.checkpoint)
        tmp = target.with_name(target.name + ".tmp")
        scoring.safe_copy(run_dir / MODEL_FILE, tmp)
        os.replace(tmp, target)
        result.checkpoint = str(target)
