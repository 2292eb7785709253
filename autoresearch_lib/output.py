"""Reading a run's output without letting it flood memory, the disk or the loop.

A run may print anything, as much as it likes, as fast as it can (1 GiB of it, say). The
capture reads the pipe in a thread, hands lines to a callback (progress lines drive the live
view; past the first MB only progress and failure lines and a few others a second), and keeps
only the first `head` and the last `tail` bytes for the log, with a note of how much was left
out. Secret values are replaced by <redacted> in everything kept or passed on.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .redact import redact, secret_values

HEAD_BYTES = 1 << 20  # the start of a log (set-up, first steps, an early traceback)
TAIL_BYTES = 1 << 20  # and its end (the summary, a late traceback)
MAX_LINE = 10_000  # characters of one line that are kept


class OutputCapture:
    """Reads `fd` until EOF or `stop()`, keeping a capped, redacted copy (see the module doc)."""

    def __init__(self, fd: int, on_line: Callable[[str], None] | None = None,
                 head: int = HEAD_BYTES, tail: int = TAIL_BYTES):
        self.fd, self.on_line = fd, on_line
        self.head_limit, self.tail_limit = head, tail
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque()
        self.head_size = self.tail_size = self.dropped = 0
        self.total = 0
        self._secrets = secret_values()
        self.stopped = False
        self._shown = 0.0  # when a line past the head was last passed on
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        try:  # the thread owns the pipe: it closes it when the writers are gone
            while chunk := os.read(self.fd, 1 << 16):
                self.total += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > MAX_LINE * 4:  # a line without end: cut it here
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    self._keep(line.decode("utf-8", "replace"))
            if pending:
                self._keep(pending.decode("utf-8", "replace"))
        finally:
            os.close(self.fd)

    def _show(self, line: str) -> None:
        """Pass a line on; a failing callback must not stop the reading (the run would block)."""
        try:
            self.on_line(line)
        except Exception:  # noqa: BLE001 - whatever the viewer's bug, the pipe must drain
            self.on_line = None

    def _keep(self, line: str) -> None:
        if self.stopped:
            return
        line = line[:MAX_LINE].rstrip("\r")
        size = len(line) + 1
        if self.head_size + size <= self.head_limit and not self.tail:
            line = redact(line, self._secrets)
            self.head.append(line)
            self.head_size += size
            if self.on_line:
                self._show(line)
            return
        # past the head: perhaps a flood. Keep a tail (redacted when read), and pass on only
        # progress and failure lines, plus a few others a second, so nothing downstream drowns
        self.tail.append(line)
        self.tail_size += size
        while self.tail_size > self.tail_limit:
            self.tail_size -= len(self.tail.popleft()) + 1
            self.dropped += 1
        now = time.monotonic()
        if self.on_line and (line.startswith(("step ", "FAIL")) or now - self._shown >= 0.1):
            self._shown = now
            self._show(redact(line, self._secrets))

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the end of the output; True if it ended."""
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def stop(self) -> None:
        """Keep nothing more: a process that escaped the run may still hold the pipe open, and
        the loop must not wait for it (the thread drains it until it closes)."""
        self.stopped = True

    def text(self) -> str:
        """What was kept: the head, a note of what was left out, the tail."""
        note = ([f"[... {self.dropped:,} lines left out: this run printed {self.total:,} bytes; "
                 f"the log keeps the first and the last MB ...]"] if self.dropped else [])
        tail = [redact(line, self._secrets) for line in self.tail]
        return "\n".join([*self.head, *note, *tail]) + "\n"

    def write(self, path: Path) -> None:
        Path(path).write_text(self.text(), encoding="utf-8", errors="replace")
