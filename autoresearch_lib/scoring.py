"""Scoring: val_bpb of a trained model, computed where train.py cannot reach it.

Training ends by saving a checkpoint (weights + config). Then the runner — not train.py —
scores it, in three processes:

    the scorer (this module, in the runner)    holds the validation tokens; does the arithmetic
      ├─ model server A (sandboxed)            gets the validation rows: the loss at each position
      └─ model server B (sandboxed, separate)  gets spot-check rows: the logits at one position

val_bpb is the scorer's sum of A's per-token losses over the bytes they stand for. A runs the
agent's model code, so its answers are checked: for a few hundred random (row, position t)
pairs, B is shown the same row with the tokens after t changed — only the next one, or all of
them — and asked for the logits at t. A causal model cannot tell the difference, so the loss
the scorer computes from B's logits must equal the one A reported. A model that looks ahead
(at the very token it must predict), or that reports losses lower than its own logits give,
fails the check. Only the scorer knows which rows are checked and which tokens were changed.
A and B are separate processes in separate sandboxes, and they never run the model's code at
the same time: both start (importing torch) together, but B loads the model only after A has
answered everything and been killed. Sandboxes separate files, networks and processes, not
every channel of the kernel they share (two processes can signal through flock() on a file
both can read), so B must have nothing to tell while A can still listen.
`evaluate()` scores a checkpoint the same way, and samples text through a model server too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import re
import select
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data, sandbox
from .config import Settings, compile_cache_env, copy_compile_cache, trusted_compile_cache
from .output import OutputCapture

EVAL_BATCH = 32  # rows per request
SPOT_CHECKS = 256  # (row, position) pairs checked against the second server
# how far a reported loss may be from the check (nats): float32 agrees to rounding; bf16 and
# fp16 batches of another shape round differently, but not systematically in one direction
TOLERANCE = {"fp32": (1e-4, 1e-5), "half": (0.15, 0.02)}  # (per position, mean)


class ScoringError(RuntimeError):
    """The model could not be scored; `code` is the failure kind (see runner.FAIL_REASONS)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Score:
    val_bpb: float
    seconds: float
    spot_checks: int
    largest_gap: float  # nats: the largest |reported - checked| loss seen


def safe_copy(src: Path, dst: Path) -> None:
    """Copy a file the run wrote, refusing a symlink or anything but a regular file (a run could
    leave model.pt pointing at the validation tokens or at your keys)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ScoringError("no_checkpoint", f"the run saved no {src.name}: train.py must end "
                           "with run.finish(model, config), which saves the model") from None
    except OSError as e:
        raise ScoringError("bad_checkpoint", f"{src.name} can't be opened safely ({e.strerror}): "
                           "it must be a regular file the run wrote, not a link") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ScoringError("bad_checkpoint", f"{src.name} is not a regular file")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)  # a link the run may have left there goes, its target stays untouched
        with open(dst, "xb") as out:  # "x": a new file, never written through a link
            shutil.copyfileobj(f, out, 1 << 20)


@contextlib.contextmanager
def model_folder(train_py: str, checkpoint: Path):
    """A private folder with the model's source and a safe copy of its weights, for the servers."""
    with sandbox.private_folder("model") as folder:
        safe_copy(Path(checkpoint), folder / "model.pt")
        (folder / "train.py").write_text(train_py, encoding="utf-8")
        yield folder


class ModelServer:
    """One sandboxed `model_server` process and the pipes to talk to it."""

    def __init__(self, folder: Path, settings: Settings, use_sandbox: bool, log_lines: list,
                 deadline: float, name: str):
        argv = [sys.executable, "-m", "autoresearch_lib.model_server", "train.py", "model.pt",
                settings.device]
        env = sandbox.environment({"PYTHONPATH": str(sandbox.package_dir().parent),
                                   "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
                                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
        self.deadline, self.name, self.proc = deadline, name, None
        self.watching = contextlib.ExitStack()  # its private folders and their disk watch
        try:
            self.tmp = sandbox.temporary_folder(self.watching.enter_context(sandbox.private_folder("server")),
                                                env, use_sandbox)  # its own /tmp
            self.cache = private_compile_cache(self.watching)
            writes = [self.tmp, *([self.cache] if self.cache else [])]
            if self.cache:
                env.update(compile_cache_env(self.cache))
            if use_sandbox:
                argv = sandbox.command(argv, cwd=folder, readable=[folder], writable=writes[1:], tmp=self.tmp)
            self.disk = self.watching.enter_context(sandbox.disk_watch(writes, self.kill))
            self.proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
        except BaseException:
            self.watching.close()
            raise
        self.stderr = OutputCapture(os.dup(self.proc.stderr.fileno()), head=1 << 16, tail=1 << 16,
                                    on_line=lambda line: log_lines.append(f"[{name}] {line}"))
        self.proc.stderr.close()
        self.out, self.inp = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        fcntl.fcntl(self.inp, fcntl.F_SETFL, fcntl.fcntl(self.inp, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.buffer = b""
        self.half = False
        self.closed = False

    def load(self) -> None:
        """Let the server run the model's code: build the model, and wait until it has (it says
        so, and its precision). Until now it only imported torch."""
        self._write(b'{"op": "load"}\n')
        try:
            ready = json.loads(self._line())
        except ValueError:
            raise self._fail("an answer that is not the protocol") from None
        self.half = ready.get("precision") != "torch.float32"

    def _fail(self, what: str) -> ScoringError:
        self.stderr.wait(1.0)
        lines = [ln.strip() for ln in self.stderr.text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)]
        tail = errors[-1:] or lines[-1:] or [""]
        if self.disk.over:
            return ScoringError("disk", f"the {self.name} model server: {self.disk.over}; it was "
                                "stopped, and what it wrote was deleted")
        if time.time() >= self.deadline:
            return ScoringError("timeout", f"evaluation took too long ({what})")
        return ScoringError("eval_failed", f"the model failed during evaluation ({what}): "
                            f"{tail[0].strip()[:300]}")

    def _more(self) -> None:
        """Read what the server has sent so far into the buffer (waiting up to the deadline)."""
        left = self.deadline - time.time()
        if left <= 0 or not select.select([self.out], [], [], left)[0]:
            raise self._fail("no answer in time")
        chunk = os.read(self.out, 1 << 20)
        if not chunk:
            raise self._fail("the model server exited")
        self.buffer += chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._more()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _line(self) -> bytes:
        while b"\n" not in self.buffer[:4096]:
            if len(self.buffer) > 4096:
                raise self._fail("an answer that is not the protocol")
            self._more()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            left = self.deadline - time.time()
            if left <= 0 or not select.select([], [self.inp], [], left)[1]:
                raise self._fail("it stopped reading")
            try:
                view = view[os.write(self.inp, view):]
            except BrokenPipeError:
                raise self._fail("the model server exited") from None

    def ask(self, op: str, rows: np.ndarray, **extra) -> np.ndarray:
        """Send one request; the answer as float32, or ScoringError."""
        header = {"op": op, "shape": list(rows.shape), **extra}
        self._write((json.dumps(header) + "\n").encode() + np.ascontiguousarray(rows, np.int64).tobytes())
        try:
            shape = json.loads(self._line())["shape"]
            count = int(np.prod(shape))
        except (ValueError, KeyError, TypeError):
            raise self._fail("an answer that is not the protocol") from None
        return np.frombuffer(self._read(4 * count), dtype=np.float32).reshape(shape)

    @contextlib.contextmanager
    def turn(self, alone: bool = False, say=None):
        """While the server may run the model's code: it holds the machine's lock on untrusted
        code (shared, or `alone` for the checker: sandbox.untrusted_code) and is closed before
        the lock is let go, so nothing of it outlives its turn."""
        with sandbox.untrusted_code(alone=alone, say=say):
            try:
                yield self
            finally:
                self.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, AttributeError):  # (AttributeError: not started)
            os.killpg(self.proc.pid, 9)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.kill()
        self.proc.wait()
        self.watching.close()  # (the disk watch ends, then both folders go)
        self.stderr.stop()


def private_compile_cache(folders: contextlib.ExitStack) -> Path | None:
    """On a GPU machine, a model server's own throwaway copy of the trusted compile cache, so
    the kernels the kit's baseline runs compiled (FlashAttention 4's: seconds each) load instead
    of compiling again in every server of every experiment. Only the kit's runs write the trusted
    cache; each server gets a separate copy, which the other cannot see (no channel between
    them) and which goes away with it, when `folders` closes (nothing reaches a later run).
    None elsewhere."""
    trusted = trusted_compile_cache()
    if not sandbox.gpu_devices() or not trusted.is_dir():
        return None
    folder = folders.enter_context(sandbox.private_folder("server-cache"))
    copy_compile_cache(trusted, folder)
    return folder


def spot_checks(rows: np.ndarray, n: int, vocab: int, rng: random.Random):
    """n (row, position t) pairs, and the rows the second server sees: the same row with the
    tokens after t changed — only token t+1 for half of them, all of them for the others."""
    n_rows, length = rows.shape[0], rows.shape[1] - 1
    picks = [(rng.randrange(n_rows), rng.randrange(length)) for _ in range(n)]
    inputs = np.empty((n, length), dtype=np.int64)
    for i, (r, t) in enumerate(picks):
        x = rows[r, :-1].copy()
        if t + 1 < length:
            if i % 2:  # only the next token differs
                x[t + 1] = (x[t + 1] + rng.randrange(1, vocab - 1)) % (vocab - 1)
            else:  # everything after t comes from another row
                x[t + 1:] = rows[rng.randrange(n_rows), t + 1:-1]
        inputs[i] = x
    return picks, inputs


def _start_servers(folder, settings, use_sandbox, log_lines, deadline):
    """Start both servers at once: each imports torch (seconds on a CPU) but runs none of the
    model's code until it is told to load.

    Started from this thread, which outlives them: the sandbox kills a process whose parent
    thread ends (--die-with-parent), so they must not be started from short-lived threads."""
    scorer = ModelServer(folder, settings, use_sandbox, log_lines, deadline, "scorer")
    try:
        return scorer, ModelServer(folder, settings, use_sandbox, log_lines, deadline, "checker")
    except BaseException:
        scorer.close()
        raise


def score(train_py: str, checkpoint: Path, settings: Settings, prepared: data.Prepared,
          use_sandbox: bool, log_lines: list, timeout: float, say=None) -> Score:
    """val_bpb of `checkpoint` (a model defined by `train_py`), checked; or ScoringError.
    `timeout` is the scorer's, and the checker's from when it may run (see untrusted_code);
    `say` hears about waiting for that."""
    t0 = time.time()
    rows = data.validation_rows(prepared, settings.seq_len, settings.eval_tokens)
    token_bytes = prepared.token_bytes()
    picks, check_rows = spot_checks(rows, SPOT_CHECKS, prepared.vocab_size, random.SystemRandom())
    with model_folder(train_py, checkpoint) as folder:
        scorer, checker = _start_servers(folder, settings, use_sandbox, log_lines, t0 + timeout)
        try:
            with scorer.turn():  # ends with the scorer gone, before the checker runs the model's code
                scorer.load()
                nll = np.concatenate([scorer.ask("nll", rows[i:i + EVAL_BATCH])
                                      for i in range(0, len(rows), EVAL_BATCH)])
            with checker.turn(alone=True, say=say):  # and so is any other experiment's code
                checker.deadline = time.time() + timeout
                checker.load()
                positions = [t for _, t in picks]
                logits = np.concatenate([
                    checker.ask("logits", check_rows[i:i + EVAL_BATCH], positions=positions[i:i + EVAL_BATCH])
                    for i in range(0, len(picks), EVAL_BATCH)])
        finally:  # (a failed scorer: the checker, which ran none of the model's code, goes too)
            scorer.close()
            checker.close()
    if nll.shape != (rows.shape[0], rows.shape[1] - 1) or not np.isfinite(nll).all():
        raise ScoringError("nan_loss", "the model's loss on the validation rows is not a finite "
                           "number (NaN or infinity) everywhere")
    gap = verify(nll, rows, picks, logits, scorer.half or checker.half)
    nbytes = token_bytes[rows[:, 1:]]
    val_bpb = float((nll * (nbytes > 0)).sum() / (math.log(2) * nbytes.sum()))
    return Score(val_bpb, time.time() - t0, len(picks), gap)


def verify(nll: np.ndarray, rows: np.ndarray, picks, logits: np.ndarray, half: bool) -> float:
    """Compare each reported loss with the one the check's logits give; the largest gap."""
    if logits.shape != (len(picks), logits.shape[-1]) or not np.isfinite(logits).all():
        raise ScoringError("nan_loss", "the model's logits are not finite numbers everywhere")
    logits = logits.astype(np.float64)
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    targets = np.array([rows[r, t + 1] for r, t in picks])
    checked = lse - logits[np.arange(len(picks)), targets]
    reported = np.array([nll[r, t] for r, t in picks], dtype=np.float64)
    per_position, mean = TOLERANCE["half" if half else "fp32"]
    gaps = reported - checked  # < 0: the model said it was surer than it is
    bad = np.abs(gaps) > per_position + per_position * np.abs(checked)
    if bad.any() or gaps.mean() < -mean:
        worst = int(np.argmax(np.abs(gaps)))
        r, t = picks[worst]
        raise ScoringError("non_causal", (
            f"the model's loss at {int(bad.sum())} of {len(picks)} spot-checked positions differs "
            f"from what it predicts when the following tokens are changed (by up to "
            f"{abs(gaps[worst]):.3g} nats, row {r}, position {t}; mean {gaps.mean():+.3g}). "
            "A position may only look at itself and earlier tokens, and the loss must be the "
            "model's own."))
    return float(np.abs(gaps).max()) if len(gaps) else 0.0
