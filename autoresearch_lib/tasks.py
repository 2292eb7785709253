"""Tasks: the research loop for any program with a number to improve, not only GPT training.

Autoresearch's loop — edit, run, measure, keep or reset — is a building block of work. A task
is a folder:

    task.toml     what to run and which number to read (below)
    program.md    the human's instructions to the agent
    solve.py      the editable file(s): the only files an agent may change
    score.py ...  the fixed files the run needs (a scorer, data): never edited

    [task]
    name = "fit-curve"
    editable = ["solve.py"]        # the only files an agent may change
    command = "python score.py"    # run in the experiment's folder; `python` is this Python
    metric = "mse"                 # read from the last line "mse: <number>" of its output
    direction = "minimize"         # or "maximize"
    timeout = 60                   # seconds; past it the run is killed

`Task.load(folder)` checks task.toml and fingerprints the fixed files: the sha256 of every file
but the editable ones and program.md (the human may edit that at any time). `run_task(task,
files, run_dir)` runs one candidate: a fresh run folder gets a copy of the fixed files plus the
candidate's editable texts, the command runs there in the sandbox (sandbox.py) under an outside
clock, and the metric is read from the last `name: value` line of its output. A run whose fixed
files differ from the fingerprint, before it starts or after it ends, is a crash. The contract
is runner.run_training's: texts in, a TrainResult and a log out, no global state.

GPT training is the built-in task, `gpt_task(settings)`: its run is runner.run_training, with
the harness, the fixed data and val_bpb scored from outside the run.

An honest metric is the task author's job (tasks/README.md shows how): the command is the
judge, so it must run the candidate's code in a separate process, never import it — code in
the judge's process can print its own metric line or patch the judge — read the candidate's
answers, check them, and print the metric itself.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import runner, sandbox
from .config import Settings
from .runner import Progress, TrainResult

try:
    import tomllib
except ImportError:  # python 3.10
    tomllib = None

TASK_FILE = "task.toml"
PROGRAM_FILE = "program.md"
GPT = "gpt"  # the built-in task's name
KEYS = ("name", "editable", "command", "metric", "direction", "timeout")
DIRECTIONS = ("minimize", "maximize")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
METRIC_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EXAMPLE = {"name": '"fit-curve"', "editable": '["solve.py"]', "command": '"python score.py"',
           "metric": '"score"', "direction": '"minimize"', "timeout": "60"}


class TaskError(ValueError):
    """A task that can't be used as it is; the message names the file and says what to do."""


@dataclass(frozen=True)
class Task:
    """One kind of experiment: what the agent edits, how a candidate is run and measured."""

    name: str
    editable: tuple[str, ...]  # paths relative to the folder: the only files an agent may change
    command: str  # run in the run folder ("" for the built-in GPT task: runner.run_training)
    metric: str  # the name of the number on the command's `metric: value` line
    direction: str  # "minimize" or "maximize"
    timeout: float  # seconds a run may take, measured from outside
    folder: Path  # where the task's files are
    fixed: dict = field(default_factory=dict)  # fixed file (relative path) -> sha256 at load
    settings: Settings | None = None  # the GPT task's fixed settings (None for a folder task)

    @classmethod
    def load(cls, folder: str | Path, expect: dict | None = None) -> "Task":
        """Read and check FOLDER/task.toml; fingerprint the fixed files.

        `expect`: a fingerprint recorded earlier (task.fixed): the files must still match it.
        """
        folder = Path(folder).resolve()
        path = folder / TASK_FILE
        if not folder.is_dir():
            raise TaskError(f"{folder}: no such task folder. A task is a folder with {TASK_FILE}, "
                            f"{PROGRAM_FILE}, the editable and the fixed files (see tasks/).")
        table = _read_table(path)
        editable = _editable(path, table["editable"])
        checked = dict(name=_name(path, table["name"]), command=_command(path, table["command"]),
                       metric=_metric(path, table["metric"]),
                       direction=_direction(path, table["direction"]),
                       timeout=_timeout(path, table["timeout"]))
        _program_path(folder)  # a task without instructions fails here, not in a loop
        task = cls(**checked, editable=editable, folder=folder,
                   fixed=fingerprint(folder, skip={*editable, PROGRAM_FILE}))
        if expect is not None and expect != task.fixed:
            names = ", ".join(differences(expect, task.fixed))
            raise TaskError(f"{folder}: the fixed files changed since the fingerprint was taken: "
                            f"{names}. Put them back, or start afresh with the changed task.")
        return task

    @property
    def is_gpt(self) -> bool:
        return self.settings is not None

    @property
    def program(self) -> str:
        """program.md: the human's instructions to the agent."""
        if self.is_gpt:
            from .baseline import default_program

            return default_program()
        return _program_path(self.folder).read_text(encoding="utf-8")

    def files(self) -> dict[str, str]:
        """The starting texts of the editable files (the baseline experiment)."""
        if self.is_gpt:
            from .baseline import render_train_py

            return {"train.py": render_train_py(self.settings.preset)}
        return {name: (self.folder / name).read_text(encoding="utf-8") for name in self.editable}

    def better(self, a: float | None, b: float | None) -> bool:
        """True if metric `a` beats `b` (None: no number, e.g. a crash or no best yet)."""
        if a is None or not math.isfinite(a):
            return False
        if b is None:
            return True
        return a < b if self.direction == "minimize" else a > b

    @property
    def digest(self) -> str:
        """One sha256 for all the fixed files: a short fingerprint to record with results."""
        text = "".join(f"{name}\0{sha}\n" for name, sha in sorted(self.fixed.items()))
        return hashlib.sha256(text.encode()).hexdigest()


# --- reading task.toml ----------------------------------------------------------------------

def _program_path(folder: Path) -> Path:
    path = folder / PROGRAM_FILE
    if not path.is_file():
        raise TaskError(f"{path}: missing. Every task needs a {PROGRAM_FILE} telling the agent "
                        "the goal, the rules and what it may change; write one.")
    return path


def _read_table(path: Path) -> dict:
    """The [task] table of task.toml, with every key present and no unknown ones."""
    if not path.is_file():
        raise TaskError(f"{path}: missing. A task folder needs a {TASK_FILE} with a [task] table "
                        f"({', '.join(KEYS)}); see tasks/fit-curve/{TASK_FILE} for one.")
    if tomllib is None:
        raise TaskError(f"{path}: reading TOML needs Python 3.11 or later; upgrade Python.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not valid TOML ({e}). Fix the syntax: strings in double "
                        'quotes, lists in brackets, e.g. editable = ["solve.py"].') from None
    table = raw.get("task")
    if not isinstance(table, dict):
        raise TaskError(f"{path}: no [task] table. Start the file with a line [task], then the "
                        f"keys {', '.join(KEYS)}.")
    if set(raw) != {"task"}:
        raise TaskError(f"{path}: unknown table(s) {', '.join(sorted(set(raw) - {'task'}))}: "
                        "everything goes under [task].")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise TaskError(f"{path}: unknown key(s) {', '.join(unknown)} in [task]. The keys are "
                        f"{', '.join(KEYS)}: check the spelling, or remove them.")
    for key in KEYS:
        if key not in table:
            raise TaskError(f"{path}: [task] has no `{key}`. Add a line such as "
                            f"{key} = {EXAMPLE[key]}.")
    return table


def _bad(path: Path, key: str, problem: str) -> TaskError:
    return TaskError(f"{path}: `{key}` {problem}")


def _name(path: Path, value) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise _bad(path, "name", f"is {value!r}; it must be letters, digits, '.', '_' or '-' "
                   "(it names folders and branches), e.g. name = \"fit-curve\".")
    return value


def _editable(path: Path, value) -> tuple[str, ...]:
    """The editable files: a non-empty list of distinct regular files inside the folder."""
    example = 'e.g. editable = ["solve.py"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, "editable", f"is {value!r}; it must be a list of file names, {example}.")
    if not value:
        raise _bad(path, "editable", f"is empty: list the file(s) the agent may change, {example}.")
    folder, names = path.parent, []
    for name in value:
        names.append(_editable_file(path, folder, name))
    if len(set(names)) != len(names):
        raise _bad(path, "editable", f"lists a file twice: {value!r}.")
    return tuple(names)


def _editable_file(path: Path, folder: Path, name: str) -> str:
    """One editable path, checked: inside the folder, an existing regular file, not task.toml."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise _bad(path, "editable", f"has {name!r}, which is outside the task folder: give paths "
                   "relative to it, e.g. editable = [\"solve.py\"].")
    name = relative.as_posix()
    if name in (TASK_FILE, PROGRAM_FILE):
        raise _bad(path, "editable", f"has {name}, which can't be editable: {TASK_FILE} defines "
                   f"the task and {PROGRAM_FILE} is the human's. List the agent's file(s).")
    target = folder / name
    if target.is_symlink() or not target.is_file():
        what = "is a link" if target.is_symlink() else "does not exist"
        raise _bad(path, "editable", f"has {name!r}, which {what} in {folder}: create it as a "
                   "regular file with the starting version, or fix the name.")
    try:
        target.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "editable", f"has {name!r}, which is not UTF-8 text: agents edit text "
                   "files only.") from None
    return name


def _command(path: Path, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, "command", f"is {value!r}; it must be the command line that runs and "
                   "scores a candidate, e.g. command = \"python score.py\".")
    try:
        shlex.split(value)
    except ValueError as e:
        raise _bad(path, "command", f"{value!r} can't be split into words ({e}): check its "
                   "quotes.") from None
    return value


def _metric(path: Path, value) -> str:
    if not isinstance(value, str) or not METRIC_RE.fullmatch(value):
        raise _bad(path, "metric", f"is {value!r}; it must be a simple name (letters, digits, "
                   "'_'), e.g. metric = \"score\", and the command must print a line "
                   "\"score: <number>\".")
    return value


def _direction(path: Path, value) -> str:
    if value not in DIRECTIONS:
        raise _bad(path, "direction", f"is {value!r}; it must be \"minimize\" (lower is better) "
                   "or \"maximize\" (higher is better).")
    return value


def _timeout(path: Path, value) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise _bad(path, "timeout", f"is {value!r}; it must be a number of seconds above 0, the "
                   "longest a run may take, e.g. timeout = 60.")
    return float(value)


# --- fingerprints of the fixed files ----------------------------------------------------------

def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__pycache__"  # git, editors, Python's caches


def fingerprint(folder: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex), but `skip` and hidden ones.

    A link or a special file in a task folder is refused: a run gets copies of regular files.
    """
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted([*names, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if _hidden(name) or relative in skip:
                continue
            digest = sha256(path)
            if digest is None:
                raise TaskError(f"{path}: a link or special file in a task folder. A run gets "
                                "copies of the task's files: put a regular file there instead.")
            found[relative] = digest
    return found


def sha256(path: Path) -> str | None:
    """The file's sha256, or None if it is missing, a link or not a regular file.

    Opened without following links and without blocking: a run may have left a link to a big
    file, or a pipe that would never end, where a fixed file was.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def differences(expected: dict, actual: dict) -> list[str]:
    """The fixed files that differ: changed, missing or new, sorted."""
    names = sorted(set(expected) | set(actual))
    return [name for name in names if expected.get(name) != actual.get(name)]


def changed_files(folder: Path, fixed: dict) -> list[str]:
    """The fixed files of a run folder that are not as fingerprinted (changed or missing)."""
    return [name for name, digest in fixed.items() if sha256(folder / name) != digest]


# --- the built-in task and the shipped examples ------------------------------------------------

def gpt_task(settings: Settings | None = None) -> Task:
    """GPT training as a task: train.py, val_bpb, minimize, the preset's budget (runner.py)."""
    from .baseline import HERE
    from .config import make_settings

    settings = settings if settings is not None else make_settings()
    return Task(name=GPT, editable=("train.py",), command="", metric="val_bpb",
                direction="minimize", timeout=runner.default_timeout(settings), folder=HERE,
                settings=settings)


def examples_dir() -> Path:
    """The example tasks: tasks/ in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "tasks"
    if checkout.is_dir():
        return checkout
    from importlib import resources

    return Path(str(resources.files("autoresearch_lib") / "examples"))


def examples() -> list[str]:
    """The names of the shipped tasks (besides GPT), e.g. ['fit-curve', 'speed-up']."""
    folder = examples_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / TASK_FILE).is_file())


def load_task(spec: str | Path, settings: Settings | None = None) -> Task:
    """A task by folder, by a shipped example's name ('fit-curve'), or 'gpt' (with `settings`)."""
    if str(spec) == GPT:
        return gpt_task(settings)
    if Path(spec).is_dir():
        return Task.load(spec)
    if str(spec) in examples():
        return Task.load(examples_dir() / str(spec))
    raise TaskError(f"no task {str(spec)!r}: give a task folder (with {TASK_FILE}), or one of "
                    f"{', '.join([GPT, *examples()])}.")


# --- running one candidate ---------------------------------------------------------------------

def run_task(task: Task, files: dict[str, str], run_dir: str | Path,
             on_progress: Callable[[Progress], None] | None = None,
             on_line: Callable[[str], None] | None = None,
             stop: threading.Event | None = None, timeout: float | None = None,
             log_path: str | Path | None = None, alone: bool = False) -> TrainResult:
    """Run one candidate of `task` (its editable texts, `files`) in `run_dir`; its result.

    result.metric is the number read (val_bpb too for GPT, else None); the log goes to
    `log_path` (default run_dir/run.log). `timeout` overrides the task's. `alone`: as
    runner.run_training's. See the module doc.
    """
    files = _checked(task, files)
    if task.is_gpt:
        return runner.run_training(files["train.py"], task.settings, run_dir,
                                   on_progress=on_progress, on_line=on_line, timeout=timeout,
                                   stop=stop, log_path=log_path, alone=alone)
    if alone:
        with sandbox.untrusted_code(alone=True, say=on_line, why=runner.ALONE):
            return run_task(task, files, run_dir, on_progress, on_line, stop, timeout, log_path)
    t0 = time.time()
    run_dir, log_path, result, use_sandbox, say, said = runner.start(
        run_dir, log_path, on_line, " and ".join(task.editable))
    _stage(task, files, run_dir)
    changed = changed_files(run_dir, task.fixed)
    if changed:  # refused: what would run is not the task that was loaded
        log = ""
        result.reason = f"fixed files changed: {', '.join(changed)} (before the run)"
        say(f"refused: the task's fixed files in {task.folder} are not as they were when the task "
            "was loaded; put them back, or load the task again to accept the change")
    else:
        log = _execute(task, run_dir, use_sandbox, result, on_progress, on_line, stop,
                       timeout or task.timeout, t0, say)
    _finish(task, result, log, said, say, log_path, t0)
    return result


def _checked(task: Task, files: dict[str, str]) -> dict[str, str]:
    """`files` must hold the text of every editable file of the task, and nothing else."""
    names = set(files) if isinstance(files, dict) else set()
    if names != set(task.editable) or not all(isinstance(t, str) for t in files.values()):
        raise TaskError(f"task {task.name}: a run needs the text of each editable file, as a dict "
                        f"{{name: text}} with the names {', '.join(task.editable)}; got "
                        f"{sorted(names) if isinstance(files, dict) else type(files).__name__}.")
    return files


def _stage(task: Task, files: dict[str, str], run_dir: Path) -> None:
    """Fill the run folder: copies of the fixed files, then the candidate's editable texts."""
    for name in task.fixed:
        target = run_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy(task.folder / name, target)  # the content and the mode (a script's x bit)
        except OSError:
            pass  # a file gone from the task folder: the fingerprint check names it
    for name, text in files.items():
        target = run_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def argv(task: Task, run_dir: Path, use_sandbox: bool, tmp: Path | None = None) -> list[str]:
    """The command line of a run: the task's words (no shell; `python` is this Python), started
    by the launcher (launch.py), inside the sandbox where there is one."""
    words = shlex.split(task.command)
    if words[0] in ("python", "python3"):
        words[0] = sys.executable
    command = [sys.executable, "-m", "autoresearch_lib.launch", "--", *words]
    if use_sandbox:  # writable: the run folder only; readable: Python and the kit
        command = sandbox.command(command, cwd=run_dir, writable=[run_dir], tmp=tmp)
    return command


def _execute(task, run_dir, use_sandbox, result, on_progress, on_line, stop, limit, t0, say) -> str:
    """Run the command under the outside clock; fill `result`'s status; return its output."""

    def line(text: str) -> None:
        if on_line:
            on_line(text)
        progress = runner.parse_progress(text)  # a task may print progress lines as GPT does
        if progress:
            result.losses.append((progress.step, progress.loss))
            if on_progress:
                on_progress(progress)

    env = runner.clean_env()
    with sandbox.private_folder("task") as private:
        tmp = sandbox.temporary_folder(private, env, use_sandbox)
        ran = runner.run_command(argv(task, run_dir, use_sandbox, tmp), run_dir, env, t0 + limit,
                                 stop, line, writes=[tmp])
    log = ran.capture.text()
    result.returncode, result.beside = ran.returncode, ran.beside
    if stop is not None and stop.is_set():
        result.status, result.reason = "stopped", "stopped by the user"
    elif ran.over_disk:
        result.reason = runner.over_disk(ran.over_disk, run_dir, say)
    elif ran.timed_out:
        result.reason = "timeout"
        say(f"timeout: the command was still running after {limit:g}s, the task's limit, so it "
            "was killed")
    elif result.returncode != 0:
        result.reason = exit_reason(log, result.returncode)
    else:
        result.metric, result.reason = read_metric(log, task.metric)
        changed = changed_files(run_dir, task.fixed)
        if result.metric is not None and changed:  # the run edited its own judge or data
            result.metric = None
            result.reason = f"fixed files changed: {', '.join(changed)} (during the run)"
        result.status = "ok" if result.metric is not None else "crash"
    return log


def read_metric(log: str, name: str) -> tuple[float | None, str]:
    """The number on the last `name: value` line of `log`, or (None, why there is none)."""
    values = re.findall(rf"^{re.escape(name)}:[ \t]*(.*?)[ \t]*$", log, re.MULTILINE)
    if not values:
        return None, f'no metric: the output has no line "{name}: <number>"'
    text = values[-1][:100]
    try:
        value = float(text)
    except ValueError:
        return None, f'bad metric: "{name}: {text}" is not a number'
    if not math.isfinite(value):
        return None, f"bad metric: {name} is {text}, not a finite number"
    return value, ""


def exit_reason(log: str, returncode: int) -> str:
    """Why a command failed, from its exit status and the last line it printed."""
    if returncode < 0:
        known = -returncode in signal.valid_signals()
        name = signal.Signals(-returncode).name if known else f"signal {-returncode}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    last = lines[-1][:200] if lines else ""
    if runner.ERROR_LINE_RE.match(last):  # a Python error's last line: "ValueError: ..."
        return f"exception: {last}"
    return f"exit code {returncode}: {last}" if last else f"exit code {returncode}"


def _finish(task, result, log, said, say, log_path, t0) -> None:
    """Time, load, the closing lines and the log file (`said`: the runner's lines so far)."""
    result.load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    result.wall_seconds = result.total_seconds = time.time() - t0
    if result.ok:  # the metric line is the command's own, just above
        say(f"{'sandbox:':<20}{result.sandbox}")
    else:
        result.metric = None
        say(f"FAIL {result.reason}")
    runner.write_log(result, log, said, log_path)
