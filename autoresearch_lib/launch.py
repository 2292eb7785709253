"""Start an experiment's script for the runner: `python -m autoresearch_lib.launch train.py`
(or any program, for a task: `python -m autoresearch_lib.launch -- python score.py`).

The launcher is the first process of a run, and it makes sure the run ends when it ends:
- it dies with the runner (PR_SET_PDEATHSIG), so a killed loop leaves no training behind;
- it is a *child subreaper*: a process the script leaves behind (say a daemon that forks twice
  to keep training after the run and leave weights for the next one) is re-parented to the
  launcher instead of escaping, and when the script exits the launcher kills every one of them.
Inside the sandbox the PID namespace does this job too; without a sandbox this is the guard.
The script's exit status is passed on, a death by a signal included (the runner reads a SIGKILL
from the kernel's out-of-memory killer as `oom`).
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _children() -> list[int]:
    """Processes whose parent is this launcher (the script's leftovers end up here)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the parent pid is the 2nd field after the command name in parentheses
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def kill_leftovers(seconds: float = 5.0) -> None:
    """SIGKILL every process re-parented to us, and reap them, until none is left."""
    deadline = time.time() + seconds
    while time.time() < deadline and os.path.isdir("/proc"):
        kids = _children()
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:  # reap whatever has died
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # `launch train.py` runs a Python script; `launch -- prog args` any program (a task's command)
    command = argv[1:] if argv[:1] == ["--"] else [sys.executable, *argv]
    script = subprocess.Popen(command)
    try:
        code = script.wait()
    finally:
        kill_leftovers()
    if code < 0:  # died by a signal: die the same way, so the runner sees what killed it
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two can't be caught anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
