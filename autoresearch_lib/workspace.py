"""A workspace: the git-backed folder where one research run lives.

    train.py       the agent's file: every experiment is one commit of it
    program.md     the human's instructions to the agent
    settings.json  the fixed settings (budget, data, evaluation); the loop never edits it
    .gitignore     keeps the outputs below out of git
    results.tsv    one row per experiment, upstream's five columns first, each row signed (untracked)
    results.rejected.tsv   rows the loop did not write, taken out of results.tsv (kept, not deleted)
    logs/          one log per experiment: logs/0000.log, logs/0001.log, ...
    .git/autoresearch/     the key that signs results.tsv's rows, and the pins (see pins.py)

A workspace for another task (`Workspace.create(path, task="fit-curve")`, see tasks.py) has,
instead of train.py and settings.json:

    solve.py ...   the task's editable file(s): each experiment commits exactly these
    task/          a pristine copy of the task folder, which the runs use; the loop never edits it
    task.json      the task's name, metric, direction, editable files and the fingerprint
                   (sha256) of its fixed files: a judge changed since is refused (`task`)

and results.tsv's second column is named after the task's metric (`mse`, ...).

The folder is a git repository on branch `autoresearch/<tag>`. The branch only advances on
improvements: an experiment is committed, trained, and undone with `git reset --hard` if it
did not beat the best. results.tsv is append-only, so it remembers the discarded and crashed
experiments that git forgets.

Crash recovery. A loop can be killed at any moment (Ctrl-C, a kernel restart, a preempted
Colab). `Workspace.open` puts the folder back in a consistent state:
- a half-written last line of results.tsv (no trailing newline) is dropped (the file is
  rewritten, atomically, only for this and for the signatures below);
- if train.py has uncommitted edits, or HEAD is an experiment without a `keep` row (committed
  but never recorded, or recorded as discard/crash but never reset), the folder is reset to
  the best kept commit (the baseline commit before anything was kept). `git reset --hard`
  also drops other uncommitted edits of tracked files, program.md included: commit those.
Each repair is listed in `ws.repairs` and reported as a warning. Nothing is repaired while
another loop holds the workspace lock: what looks unfinished there is still in progress.

Confinement and storage. train.py must be a regular file inside the folder: a symlink (or a
directory) in its place is refused, never read or written through, and `Workspace.open` puts
the committed file back. A write that fails for lack of space or permission raises a
WorkspaceError that says what happened and what to do; train.py is replaced atomically and a
half-appended row is cut off again, so the folder stays one that `open` can resume.

Bookkeeping a training run cannot touch. A training script runs as you, in runs/NNNN/ inside
this folder, so it could append a `keep` row to ../../results.tsv. Every row the loop writes is
signed with the workspace's key (records.py), and a loop keeps results.tsv in memory while it
holds the workspace: if the file changed during a run, the loop puts it back (`restore_results`)
and records the experiment as a `crash`, "tampered: ...". `open` moves rows that are not signed
to results.rejected.tsv. A workspace made before rows were signed is adopted once by `open`: a
key is made and its rows are signed. The kit's code and the evaluation data are pinned
(pins.py) and checked by the loop before every experiment. The lock is an flock on the folder
itself (deleting .lock frees nothing); a loop's process can't be read through /proc by its
children (Linux); git runs with hooks and fsmonitor off and without secrets in its environment.
What this can't stop without a sandbox: a run that reads the key, forges a signed row, and
leaves a process behind that appends it after the loop has ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from . import baseline, config, pins, records, tasks
from .config import Settings
from .records import (RESULTS_COLUMNS, STATUSES, UPSTREAM_COLUMNS, ResultsError,  # noqa: F401
                      one_line, read_results)
from .redact import redact, without_secrets

try:
    import fcntl
except ImportError:  # windows has no flock; see Workspace.lock
    fcntl = None

TRACKED = ["train.py", "program.md", "settings.json", ".gitignore"]
TMP_TRAIN_PY = ".train.py.tmp"  # the new train.py until it is renamed over the old one
GITIGNORE = "results.tsv\nresults.rejected.tsv\nlogs/\nruns/\n*.pt\n.lock\n"
TASK_JSON = "task.json"  # a task workspace's task: name, metric, direction, fingerprint
TASK_DIR = "task"  # ... and the pristine copy of its folder
# names a task workspace uses itself: an editable file can't be one of them
RESERVED = {TASK_JSON, TASK_DIR, "program.md", "settings.json", ".gitignore", "results.tsv",
            "results.rejected.tsv", "logs", "runs", ".lock", ".git"}
KEY_FILE = ".git/autoresearch/key"  # signs results.tsv's rows; inside .git, so never committed
PINS_FILE = ".git/autoresearch/pins.json"  # the kit's code and the data scores depend on
TRIED_REFS = "refs/autoresearch/tried"  # every experiment's commit, kept or not (mark_tried)
REJECTED = "results.rejected.tsv"
_PR_SET_DUMPABLE = 4  # prctl option, from <linux/prctl.h>
MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()

# variables that would point git at another repository (e.g. when tests run inside a git hook)
_GIT_REDIRECTS = {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR"}
# hooks and an fsmonitor are programs git runs: a training script could plant them in .git, so
# the loop's git commands run none (settings given with -c win over the repository's own config)
_GIT_SAFE = ["-c", f"core.hooksPath={os.devnull}", "-c", "core.fsmonitor=false"]


class WorkspaceError(RuntimeError):
    """The workspace folder can't be used as asked; the message says what to do instead."""


class WorkspaceLocked(WorkspaceError):
    """Another loop already holds this workspace; `pid` is its process id (or None)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


# what a failed write means, and what to do about it
_STORAGE_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free some space (old runs/ folders and checkpoints can go)"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or ask for a larger quota"),
    errno.EFBIG: ("a file hit the size limit (ulimit -f) or the disk is full",
                  "raise the limit or free some space"),
    errno.EROFS: ("the file system is read-only",
                  "remount it writable, or copy the workspace to a writable disk"),
    errno.EACCES: ("permission was denied",
                   "make the workspace writable (chmod -R u+w) or run as its owner"),
    errno.EPERM: ("the operation is not permitted",
                  "make the workspace writable (chmod -R u+w) or run as its owner"),
    errno.EIO: ("an input/output error: the disk may be failing", "check the disk"),
}


def _resume(path) -> str:
    return (f"Then resume with loop.run(Workspace.open({str(path)!r}), agent) (or the same `loop` "
            "command): results.tsv holds only whole rows, and an unfinished experiment is undone.")


def storage_error(err: OSError, path, file=None) -> WorkspaceError | None:
    """A clear WorkspaceError for a write that failed for lack of space or permission, else None.

    `path` is the workspace, `file` the one being written (if `err` does not name it). The
    error's __cause__ is `err`, so a traceback still shows the system's own words.
    """
    if err.errno not in _STORAGE_ADVICE:
        return None
    what, todo = _STORAGE_ADVICE[err.errno]
    file = err.filename or file
    where = f" ({file})" if file else ""
    error = WorkspaceError(f"Could not write to the workspace {path}: {what}{where}. "
                           f"{todo[0].upper()}{todo[1:]}. {_resume(path)}")
    error.__cause__ = err
    return error


def _storage_hint(said: str, path) -> str:
    """What to do, when git's own message says it ran out of space or permission."""
    for code, (what, todo) in _STORAGE_ADVICE.items():
        if os.strerror(code) in said:
            return f"\nThat means {what}: {todo}. {_resume(path)}"
    return ""


def default_tag(today: dt.date | None = None) -> str:
    """Today's date the way upstream names its runs: 'nov27', 'mar5'."""
    today = today or dt.date.today()
    return f"{MONTHS[today.month - 1]}{today.day}"


def _git(cwd: Path, *args: str) -> str:
    """Run one git command in `cwd` and return its output; failures quote git's own words."""
    env = {k: v for k, v in without_secrets().items() if k not in _GIT_REDIRECTS}
    try:
        done = subprocess.run(["git", *_GIT_SAFE, *args], cwd=cwd, env=env, check=True,
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise WorkspaceError("git is not installed, and a workspace is a git repository: "
                             "install git (apt install git, brew install git, conda install "
                             "git) and try again") from None
    except subprocess.CalledProcessError as e:
        said = (e.stderr or e.stdout).strip()
        raise WorkspaceError(f"`git {' '.join(args)}` failed in {cwd}:\n{said}"
                             + _storage_hint(said, cwd)) from e
    return done.stdout


# ---------------------------------------------------------------- the workspace

class Workspace:
    """A folder holding one research run. Make one with `create`, continue one with `open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.repairs: list[str] = []  # what `open` fixed after a crash
        # while a loop holds the workspace (see `hold`): results.tsv as the loop last wrote it,
        # and the pins as they were when it started; what a training run does to the files on
        # disk can't change these
        self._record: bytes | None = None
        self._key: bytes | None = None
        self._pins: dict | None = None

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    @classmethod
    def create(cls, path, preset="auto", budget=None, tag=None, dataset=None, text=None,
               val_text=None, program=None, task=None, **settings_overrides) -> "Workspace":
        """A new workspace at `path` (missing or empty): baseline committed, results.tsv empty.

        `task`: a task folder, a shipped task's name ('fit-curve') or a tasks.Task; None (or
        'gpt') is GPT training, set up by the other arguments.
        """
        if task is not None and str(task) != tasks.GPT:
            loaded = task if isinstance(task, tasks.Task) else tasks.load_task(task)
            if not loaded.is_gpt:
                return cls._create_for_task(path, loaded, tag, program)
        ws = cls(path)
        ws._check_can_create()
        tag = _checked_tag(tag)
        # build everything that can fail on a bad argument before touching the disk
        settings = config.make_settings(preset, budget=budget, dataset=dataset,
                                        text=_absolute(text), val_text=_absolute(val_text),
                                        **settings_overrides)
        files = {"train.py": baseline.render_train_py(settings.preset),
                 "program.md": _program_text(program), ".gitignore": GITIGNORE}
        ws._init_repo(f"autoresearch/{tag}")
        ws._commit_baseline(files, settings)
        records.new_key(ws.path / KEY_FILE)
        ws._save_pins({"kit": pins.kit_digests()})  # the data: before the first experiment
        return ws

    @classmethod
    def _create_for_task(cls, path, task: tasks.Task, tag, program) -> "Workspace":
        """A workspace for a folder task: its editable files at the root, its folder in task/."""
        ws = cls(path)
        ws._check_can_create()
        tag = _checked_tag(tag)
        try:
            records.columns_for(task.metric)
        except ResultsError as e:
            raise WorkspaceError(f"task {task.name} ({task.folder}): {e}") from None
        clash = sorted(name for name in task.editable if name.split("/")[0] in RESERVED)
        if clash:
            raise WorkspaceError(f"task {task.name}: the editable file(s) {', '.join(clash)} have "
                                 "names the workspace uses itself; rename them in the task folder "
                                 "and in task.toml's `editable`.")
        files = {**task.files(), "program.md": task.program if program is None else
                 _program_text(program), ".gitignore": GITIGNORE + "__pycache__/\n"}
        info = {"name": task.name, "metric": task.metric, "direction": task.direction,
                "editable": list(task.editable), "source": str(task.folder), "fixed": task.fixed}
        ws._init_repo(f"autoresearch/{tag}")
        shutil.copytree(task.folder, ws.path / TASK_DIR,
                        ignore=lambda _, names: [n for n in names if tasks._hidden(n)])
        for name, content in files.items():
            target = ws.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        (ws.path / TASK_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        records.repair_results(ws.results_path, task.metric)  # header-only, its metric second
        ws.log_dir.mkdir(exist_ok=True)
        ws._git("add", *files, TASK_JSON, TASK_DIR)
        ws._git("commit", "-q", "--no-verify", "-m", "baseline")
        records.new_key(ws.path / KEY_FILE)
        ws._save_pins({"kit": pins.kit_digests(), "task": task.fixed})
        ws.task  # the copy must load and match the fingerprint, or nothing was made right
        return ws

    @classmethod
    def open(cls, path) -> "Workspace":
        """An existing workspace, repaired after a crash if needed (see the module docstring)."""
        ws = cls(path)
        ws._check_is_workspace()
        try:
            with ws.lock():
                ws._recover()
        except WorkspaceLocked:
            pass  # a live loop owns the folder: what looks unfinished is in progress
        except WorkspaceError as e:
            if not isinstance(e.__cause__, OSError) or e.__cause__.errno not in _STORAGE_ADVICE:
                raise
            # e.g. a read-only copy: it can still be read and reported; a loop will say why not
            warnings.warn(f"workspace opened without checking for repairs: {e}", stacklevel=2)
        except OSError as e:  # a repair could not be written
            raise storage_error(e, ws.path) or e
        if ws.is_task:
            ws.task  # a judge changed between sessions is refused here, with what to do
        return ws

    def _check_can_create(self) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise WorkspaceError(
                f"{self.path} already exists and is not empty, so a new workspace can't be made "
                f"there. To continue the run in it use Workspace.open({str(self.path)!r}); to "
                "start a new run choose a new folder (or delete this one).")

    def _check_is_workspace(self) -> None:
        if not self.path.is_dir():
            raise WorkspaceError(f"{self.path} is not a workspace: there is no such folder. Check "
                                 f"the path, or make one with Workspace.create({str(self.path)!r}).")
        setup = TASK_JSON if (self.path / TASK_JSON).exists() else "settings.json"
        missing = [name for name in (setup, ".git") if not (self.path / name).exists()]
        if missing:
            # its own .git matters: inside another repository, git would commit to that one
            raise WorkspaceError(
                f"{self.path} is not a workspace: it has no {' and no '.join(missing)}. Check "
                f"the path, or make a new one with Workspace.create({str(self.path)!r}).")

    def _init_repo(self, branch: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._git("init", "-q")
        self._git("symbolic-ref", "HEAD", f"refs/heads/{branch}")  # named before the first commit
        # a local identity, so commits work where git has no global one (Colab, CI, containers)
        self._git("config", "user.name", "autoresearch")
        self._git("config", "user.email", "autoresearch@localhost")
        self._git("config", "commit.gpgsign", "false")

    def _commit_baseline(self, files: dict[str, str], settings: Settings) -> None:
        for name, content in files.items():
            (self.path / name).write_text(content, encoding="utf-8")
        settings.to_json(self.path / "settings.json")
        records.repair_results(self.results_path)  # a missing file becomes a header-only one
        self.log_dir.mkdir(exist_ok=True)
        self._git("add", *TRACKED)
        self._git("commit", "-q", "--no-verify", "-m", "baseline")

    def _git(self, *args: str) -> str:
        return _git(self.path, *args)

    # ------------------------------------------------------------ what's in it

    @property
    def settings(self) -> Settings:
        """The fixed settings this workspace was created with (GPT training only)."""
        if self.is_task:
            raise WorkspaceError(f"{self.path} is a workspace for the task {self.task_info['name']},"
                                 " not for GPT training: it has no GPT settings (see ws.task).")
        return Settings.from_json(self.path / "settings.json")

    def set_budget(self, budget: float) -> None:
        """Change the training budget before the baseline has run (never after: every experiment
        must get the same). The baseline commit is amended, so it stays the one a reset returns to."""
        if self.next_index():
            raise WorkspaceError(f"{self.path} has results already: its budget is fixed, so that "
                                 "every experiment is measured the same way. Start a new workspace.")
        settings = self.settings
        settings.budget = float(budget)
        settings.to_json(self.path / "settings.json")
        self._git("commit", "-q", "--amend", "--no-verify", "--no-edit", "--", "settings.json")

    # ------------------------------------------------------------ which task

    @property
    def is_task(self) -> bool:
        """True for a workspace made for a folder task (task.json), False for GPT training."""
        return (self.path / TASK_JSON).is_file()

    @property
    def task_info(self) -> dict:
        """task.json: the task's name, metric, direction, editable files and fingerprint."""
        if not self.is_task:
            return {"name": tasks.GPT, "metric": "val_bpb", "direction": "minimize",
                    "editable": ["train.py"]}
        return json.loads((self.path / TASK_JSON).read_text(encoding="utf-8"))

    @property
    def metric(self) -> str:
        """The number experiments are judged by: val_bpb, or the task's metric."""
        return self.task_info["metric"]

    @property
    def direction(self) -> str:
        """'minimize' (lower is better) or 'maximize'."""
        return self.task_info["direction"]

    @property
    def editable(self) -> tuple[str, ...]:
        """The files an agent may change: ('train.py',), or the task's."""
        return tuple(self.task_info["editable"])

    @property
    def task(self) -> tasks.Task:
        """The task the runs use: GPT with this workspace's settings, or task/ as fingerprinted.

        A fixed file of task/ that differs from task.json's fingerprint raises WorkspaceError:
        scores measured by another judge are not comparable with the earlier ones.
        """
        if not self.is_task:
            return tasks.gpt_task(self.settings)
        info = self.task_info
        try:
            return tasks.Task.load(self.path / TASK_DIR, expect=info["fixed"])
        except tasks.TaskError as e:
            raise WorkspaceError(
                f"{self.path}: the task's fixed files are not the ones this workspace was made "
                f"with ({e}). Results judged by another scorer or other data are not comparable "
                f"with the earlier ones, so the loop refuses to go on. Put the originals back "
                f"(`git -C {self.path} checkout -- {TASK_DIR}`), or start a new workspace with "
                "the changed task.") from None

    def files(self) -> dict[str, str]:
        """The current text of each editable file, by name."""
        return {name: self._editable_path(name).read_text(encoding="utf-8")
                for name in self.editable}

    @property
    def branch(self) -> str:
        return self._git("rev-parse", "--abbrev-ref", "HEAD").strip()

    @property
    def train_py(self) -> str:
        """train.py (a task: its first editable file)."""
        return self._editable_path(self.editable[0]).read_text(encoding="utf-8")

    def _train_py_path(self) -> Path:
        return self._editable_path("train.py")

    def _editable_path(self, name: str) -> Path:
        """An editable file, after checking it is a regular file of this folder (not a link out)."""
        path = self.path / name
        if path.is_symlink():
            kind = f"a symlink (to {os.readlink(path)})"
        elif path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "a special file"
        else:
            return path  # a regular file, or missing (commit writes it; open restores it)
        raise WorkspaceError(
            f"{path} is {kind}, not a regular file: the loop only reads and writes the "
            f"workspace's own {name}, never through a link or into another place. Something "
            "other than the loop replaced it (a training script can: it runs with your rights). "
            f"Workspace.open({str(self.path)!r}) puts the committed {name} back.")

    @property
    def program(self) -> str:
        return (self.path / "program.md").read_text(encoding="utf-8")

    @property
    def results_path(self) -> Path:
        return self.path / "results.tsv"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    def log_path(self, n: int) -> Path:
        """Where experiment number `n` writes its log: logs/0007.log."""
        self.log_dir.mkdir(exist_ok=True)
        return self.log_dir / f"{n:04d}.log"

    def head(self) -> str:
        """The current commit, short (7 characters) as upstream's results.tsv writes it."""
        return self._git("rev-parse", "HEAD").strip()[:7]

    # ------------------------------------------------------------ git: one experiment at a time

    def commit(self, message: str, texts: str | dict[str, str]) -> str:
        """Write the editable file(s) and commit them (nothing else); returns the short commit id.

        `texts`: the new train.py (or a task's one editable file), or {name: text} for some or
        all of the editable files. Either all happen or the files are left as they were: each new
        text is written to a temporary file and renamed over the old one (so a full disk can't
        leave half a file), and put back from HEAD if git then fails.
        """
        texts = {self.editable[0]: texts} if isinstance(texts, str) else dict(texts)
        unknown = sorted(set(texts) - set(self.editable))
        if unknown:
            raise WorkspaceError(f"only {', '.join(self.editable)} may be committed by the loop, "
                                 f"not {', '.join(unknown)}")
        message = " ".join(one_line(message or "").split()) or "experiment"  # no NUL for git
        for name in texts:
            self._editable_path(name)  # a link or a folder in its place: refused, left as it is
        try:
            for name, text in texts.items():
                self._write_editable(name, text)
            # --allow-empty: an unchanged proposal still gets its own commit and results row;
            # --no-verify: the user's git hooks have no say in an experiment
            self._git("commit", "-q", "--no-verify", "--allow-empty", "-m", message, "--",
                      *self.editable)
        except WorkspaceError:
            with contextlib.suppress(WorkspaceError):
                self._git("checkout", "HEAD", "--", *self.editable)  # as they were before
            raise
        return self.head()

    def _write_editable(self, name: str, text: str) -> None:
        """Replace one editable file by `text`, atomically, never writing through a link."""
        path = self._editable_path(name)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WorkspaceError(f"the new {name} can't be saved as UTF-8 text: {e}") from None
        tmp = path.with_name(TMP_TRAIN_PY if name == "train.py" else f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with open(tmp, "xb") as f:  # "x": a new file, so nothing is written through a link
                f.write(data)
            os.replace(tmp, path)  # replaces the name, whatever it pointed to
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(e, self.path, path) or e

    def reset_to(self, commit: str) -> None:
        """Throw away everything after `commit` (the undo of a discarded experiment)."""
        self._git("reset", "-q", "--hard", commit)

    def show(self, commit: str, name: str = "train.py") -> str:
        """The text of a tracked file as it was at `commit` (the incumbent's train.py, to re-run it)."""
        return self._git("show", f"{commit}:{name}")

    def diff(self, a: str, b: str | None = None) -> str:
        """Unified diff of the editable file(s) from commit `a` to `b` (or to the files on disk)."""
        return self._git("diff", a, *([b] if b else []), "--", *self.editable)

    # ------------------------------------------------------------ every tried commit stays reachable

    def mark_tried(self, index: int, commit: str) -> None:
        """Keep experiment `index`'s commit under refs/autoresearch/tried/NNNN, kept or not, so
        its diff can be read later (`git diff <best> autoresearch/tried/0007`)."""
        self._git("update-ref", f"{TRIED_REFS}/{index:04d}", commit)

    def tried(self) -> dict[int, str]:
        """Experiment number -> its commit (full id), for every experiment marked as tried."""
        out = self._git("for-each-ref", "--format=%(refname:lstrip=3) %(objectname)", TRIED_REFS)
        return {int(name): sha for name, sha in (line.split() for line in out.splitlines())
                if name.isdigit()}

    def trees(self, commits) -> set[str]:
        """The file trees of these commits: two experiments with one tree tried the same files."""
        commits = [c for c in dict.fromkeys(commits) if c]
        if not commits:
            return set()
        try:
            return set(self._git("log", "--no-walk", "--format=%T", *commits).split())
        except WorkspaceError:  # one of them is gone (a repository from elsewhere): one by one
            found = set()
            for c in commits:
                with contextlib.suppress(WorkspaceError):
                    found.add(self._git("rev-parse", f"{c}^{{tree}}").strip())
            return found

    # ------------------------------------------------------------ results.tsv

    def append_result(self, row: dict) -> None:
        """Add one experiment's row to results.tsv, signed: appended, flushed to disk, never rewritten."""
        if not row.get("timestamp"):
            row = {**row, "timestamp": dt.datetime.now().isoformat(timespec="seconds")}
        if self._record is not None:
            self.restore_results()  # a loop appends only to the file it wrote itself
        elif not self.results_path.exists():
            records.repair_results(self.results_path, self.metric)  # back header-only
        number = len(self.results())  # a row is signed with its place: a copy elsewhere fails
        line = records.format_row(row, self._columns(), self._signing_key(), number)
        size = self.results_path.stat().st_size
        try:
            with open(self.results_path, "a", encoding="utf-8", newline="\n") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())  # a row we reported must survive a power cut or a kill
        except OSError as e:
            with contextlib.suppress(OSError):  # no half row for the next reader (open() also
                os.truncate(self.results_path, size)  # drops one, should this fail too)
            raise storage_error(e, self.path, self.results_path) or e
        if self._record is not None:
            self._record += line.encode()

    def results(self) -> list[dict]:
        """Every row of results.tsv, numbers as numbers, missing extras as None.

        Only rows the loop signed: another one raises ResultsError (`open` moves such rows out).
        While a loop holds the workspace: the rows as that loop wrote them. To read any
        results.tsv as it is, upstream's included, use `read_results(path)`.
        """
        if self._record is not None:
            header, lines = records.split_lines(self.results_path, self._record)
            return [records.parse_line(self.results_path, n, header, line) for n, line in lines]
        return self._verified(self._results_bytes())

    def next_index(self) -> int:
        """The number of the next experiment: how many rows results.tsv has."""
        return len(self.results())

    def best(self) -> tuple[str, float] | None:
        """(commit, metric) of the incumbent, or None before the baseline ran.

        The incumbent is the last kept commit, the tip of the branch (each keep beat the one
        before; ties are discarded); its number is its latest measurement: a `recheck` row after
        its keep row measured it again, under the conditions of that time (see fairness.py).
        The metric is val_bpb, or the task's (better in the task's direction).
        """
        rows, metric = self.results(), self.metric
        kept = [i for i, r in enumerate(rows) if r["status"].strip().lower() == "keep"]
        if not kept:
            return None
        commit, value = rows[kept[-1]]["commit"], rows[kept[-1]][metric]
        for r in rows[kept[-1] + 1:]:
            if r["status"].strip().lower() == "recheck" and r["commit"] == commit:
                value = r[metric]
        return commit, value

    def restore_results(self, during: str = "the run") -> str | None:
        """Put results.tsv and its key back as this loop left them, if anything else changed them.

        Returns what had changed (None if nothing did). Lines the loop did not write go to
        results.rejected.tsv, kept, not trusted. Only while a loop holds the workspace (`hold`):
        it alone knows what it wrote.
        """
        if self._record is None:
            return None
        changed = []
        path = self.results_path
        now = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        if now != self._record:
            changed.append(f"results.tsv changed during {during}: {self._foreign(now, during)}")
            records.write_atomic(path, self._record)  # a planted link is replaced, not followed
        with contextlib.suppress(ResultsError):
            if records.load_key(self.path / KEY_FILE) == self._key:
                return "; ".join(changed) or None
        records.save_key(self.path / KEY_FILE, self._key)
        changed.append(f"the workspace key ({KEY_FILE}) was replaced during {during}")
        return "; ".join(changed)

    def _foreign(self, now: bytes | None, during: str) -> str:
        """What differs between results.tsv and the loop's record, in words; foreign lines rejected."""
        if now is None:
            return "it was deleted or replaced by something that is not a file; put back"
        added, removed = records.difference(self._record, now)
        self._reject(added, f"found in results.tsv after {during}; the loop did not write it")
        said = ([f"{len(added)} line(s) the loop did not write, moved to {REJECTED}"] * bool(added)
                + [f"{len(removed)} of its lines removed or edited"] * bool(removed))
        return " and ".join(said or ["its lines were rearranged"]) + "; put back as the loop wrote it"

    def _reject(self, lines: list[str], why: str) -> None:
        records.reject(self.path / REJECTED, [redact(line) for line in lines], why)

    def _verified(self, data: bytes) -> list[dict]:
        """The rows of results.tsv `data`; ResultsError at the first one the loop did not sign."""
        rows, bad = records.verified_rows(self.results_path, data, self._signing_key())
        if bad:
            raise records.unverified_error(self.results_path, bad[0][0])
        return rows

    def _results_bytes(self) -> bytes:
        path = self.results_path
        return path.read_bytes() if path.exists() else records.header_for(self.metric).encode()

    def _columns(self) -> list[str]:
        """results.tsv's columns: this kit's, since a workspace's rows are always signed."""
        data = self._record if self._record is not None else self._results_bytes()
        columns = data.split(b"\n", 1)[0].decode("utf-8", "replace").split("\t")
        ours = records.columns_for(self.metric)
        if columns != ours:
            raise ResultsError(f"{self.results_path}, line 1: the header is not this kit's (its "
                               f"columns are {' '.join(ours)}), so rows can't be added "
                               f"and signed. Workspace.open({str(self.path)!r}) migrates it.")
        return columns

    def _signing_key(self) -> bytes:
        if self._key is not None:
            return self._key
        key = records.load_key(self.path / KEY_FILE)
        if key is None:
            raise WorkspaceError(
                f"{self.path} has no key to sign and check results.tsv ({KEY_FILE}): it was made "
                "before rows were signed, or the key was deleted. Workspace.open("
                f"{str(self.path)!r}) makes a key and signs the rows results.tsv has now.")
        return key

    # ------------------------------------------------------------ one loop at a time

    @contextlib.contextmanager
    def hold(self):
        """Hold the workspace for a loop: the lock, and results.tsv, its key and the pins in memory.

        The process is also closed to /proc readers (`_undumpable`), for the rest of its life.
        What the loop then reads (`results`, `best`) and checks (`restore_results`, `check_pins`)
        is what it wrote or found when it started, whatever a training run does to the files.
        Raises ResultsError if results.tsv has a row the loop did not sign.
        """
        with self.lock():
            _undumpable()  # its training runs can't read its environment or memory through /proc
            if not self.results_path.exists():
                records.repair_results(self.results_path, self.metric)
            data = self.results_path.read_bytes()
            self._verified(data)
            self._record, self._key = data, self._signing_key()
            try:
                yield self
            finally:  # left as the loop wrote it, even after a stopped run that was not recorded
                with contextlib.suppress(OSError):
                    self.restore_results("the loop")
                self._record = self._key = self._pins = None

    @contextlib.contextmanager
    def lock(self):
        """Hold the workspace for one loop; a second one gets WorkspaceLocked.

        flock, not "does .lock exist": the OS releases the lock when its holder dies, so a
        loop killed by SIGKILL or a crashed kernel never leaves a stale lock behind. The lock is
        on the folder itself, so deleting .lock (a training script could) frees nothing: .lock
        only names the holder, for the message.
        """
        if fcntl is None:
            warnings.warn("no fcntl on this system: two loops on one workspace are not prevented")
            yield self
            return
        try:
            folder = os.open(self.path, os.O_RDONLY)  # not inherited by runs
        except OSError as e:
            raise storage_error(e, self.path) or e
        try:
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._locked_error(self._lock_holder()) from None
            self._write_holder()
            yield self
        finally:
            os.close(folder)  # closing releases the lock

    def _write_holder(self) -> None:
        """Write our pid to .lock, so the next one can say who holds the workspace."""
        path = self.path / ".lock"
        try:
            if path.is_symlink():
                path.unlink()  # never write through a planted link
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise storage_error(e, self.path) or e

    def _lock_holder(self) -> str:
        try:
            return (self.path / ".lock").read_text(errors="replace")[:32].strip()
        except OSError:
            return ""  # deleted: the message says "another process"

    def _locked_error(self, pid_text: str) -> WorkspaceLocked:
        pid = int(pid_text) if pid_text.isdigit() else None
        who = f"process {pid}" if pid else "another process"
        if pid == os.getpid():
            who += " (this very process: a loop already running here, e.g. in this notebook)"
        return WorkspaceLocked(
            f"{self.path} is in use by another loop, held by {who}. Two loops on one workspace "
            "would reset each other's experiments: stop that loop first (or kill the process), "
            "or work in another workspace.", pid)

    # ------------------------------------------------------------ pins: the kit's code and data

    def check_pins(self) -> str | None:
        """None if the kit's code and the evaluation data are as pinned; else what changed and
        what to do (see pins.py). A pin not taken yet is taken now: the data's before the first
        experiment, both in a workspace made before pins. While a loop holds the workspace, the
        pins it started with count, whatever happens to pins.json meanwhile.
        """
        try:
            on_disk = pins.load(self.path / PINS_FILE, self._signing_key())
        except pins.PinsError as e:
            return str(e)
        pinned = on_disk if self._pins is None else self._pins
        if on_disk != pinned:
            return (f"{self.path / PINS_FILE} changed while the loop ran: something, possibly a "
                    "train.py, rewrote it, so the kit and data can't be trusted to be as pinned. "
                    "If they are as you installed them, pin them again: "
                    f"Workspace.open({str(self.path)!r}).repin()")
        if self.is_task:  # no data to pin: the task's fixed files, pinned when it was made
            if self._record is not None:
                self._pins = pinned
            return pins.kit_problem(pinned["kit"], self.path) or self._task_problem(pinned)
        if "kit" not in pinned or "data" not in pinned:
            pinned = {"kit": pins.kit_digests(), "data": pins.data_pin(self.settings), **pinned}
            self._save_pins(pinned)
        if self._record is not None:
            self._pins = pinned
        return (pins.kit_problem(pinned["kit"], self.path)
                or pins.data_problem(pinned["data"], self.settings, self.path))

    def _task_problem(self, pinned: dict) -> str | None:
        """None if task/ and task.json are as pinned when the workspace was made; else why not."""
        if pinned.get("task") != self.task_info.get("fixed"):
            return (f"{self.path / TASK_JSON} no longer holds the fingerprint of the task's fixed "
                    "files that the workspace pinned when it was made: something edited it. Put it "
                    f"back (`git -C {self.path} checkout -- {TASK_JSON} {TASK_DIR}`), then resume.")
        try:
            self.task
        except WorkspaceError as e:
            return str(e)
        return None

    def repin(self) -> "Workspace":
        """Pin the kit's code and the evaluation data as they are now; returns the workspace.

        Only after changing them on purpose (you upgraded the kit): the loop stops when they
        differ from the pins, since scores measured with other code or data are not comparable.
        """
        with self.lock():
            if self.is_task:  # the task's files stay pinned as task.json records them
                self._save_pins({"kit": pins.kit_digests(), "task": self.task_info["fixed"]})
            else:
                self._save_pins({"kit": pins.kit_digests(), "data": pins.data_pin(self.settings)})
        return self

    def _save_pins(self, pinned: dict) -> None:
        pins.save(self.path / PINS_FILE, self._signing_key(), pinned)

    # ------------------------------------------------------------ crash recovery

    def _recover(self) -> None:
        """Repair what a killed loop left behind (see the module docstring)."""
        had_results = self.results_path.exists()
        stale = self.path / ".git" / "index.lock"
        if stale.exists():  # git was killed mid-commit; we hold the lock, so no git is running
            stale.unlink()
            self._note("removed .git/index.lock left by a git command that was killed")
        with contextlib.suppress(FileNotFoundError):  # left if killed before the rename
            (self.path / TMP_TRAIN_PY).unlink()
        self._note(records.repair_results(self.results_path, self.metric))
        self._note(self._check_rows())
        head = self.head()
        # without results.tsv (a fresh clone) there is no record to judge HEAD by
        target = self._safe_commit() if had_results else head
        reasons = []
        if self._git("status", "--porcelain", "--", *self.editable).strip():
            reasons.append(f"{' or '.join(self.editable)} had uncommitted edits")
        if head != target and head not in self._kept_commits():
            reasons.append(f"HEAD {head} is an experiment with no keep row in results.tsv "
                           "(the loop stopped before recording or undoing it)")
        if reasons:
            self.reset_to(target)
            self._note(f"reset to {target}, the best kept commit, because {' and '.join(reasons)}")

    def _check_rows(self) -> str | None:
        """Move rows the loop did not sign to results.rejected.tsv; adopt an unsigned workspace.

        A workspace made before rows were signed has no key: one is made and the rows it has
        are signed, once. Rows are signed again, too, when the kit's columns changed.
        """
        key = records.load_key(self.path / KEY_FILE)
        data = self.results_path.read_bytes()
        ours = records.columns_for(self.metric)
        header, lines = records.split_lines(self.results_path, data)
        if key is None:  # adopt it: every row it has now is taken as the loop's
            for n, line in lines:
                records.parse_line(self.results_path, n, header, line)  # a damaged one stops here
            key, bad = records.new_key(self.path / KEY_FILE), []
            note = (f"signed the {len(lines)} rows of results.tsv with a new workspace key "
                    f"({KEY_FILE}): the workspace had none (it was made before rows were signed, "
                    "or the key was deleted). From now on a row the loop did not write is refused")
            if not lines and header == ours:
                return None  # nothing to sign yet
        else:
            bad = records.verified_rows(self.results_path, data, key)[1]
            if not bad and header == ours:
                return None
            note = (f"moved {len(bad)} row(s) the loop did not write (line(s) "
                    f"{', '.join(str(n) for n, _ in bad)} of results.tsv: not signed by the loop) "
                    f"to {REJECTED}, where they are kept, not trusted" if bad else
                    "results.tsv now has the columns of this version of the kit, its rows signed again")
        self._reject([line for _, line in bad], "not signed by the loop: it did not write this row")
        numbers = {n for n, _ in bad}
        good = [line for n, line in lines if n not in numbers]
        records.write_atomic(self.results_path, records.resigned(header, good, key, self.metric))
        return note

    def _safe_commit(self) -> str:
        """The best kept commit, or the baseline commit before anything was kept."""
        best = self.best()
        if best:
            return best[0][:7]
        roots = self._git("rev-list", "--max-parents=0", "HEAD").split()
        return roots[-1][:7]

    def _kept_commits(self) -> set[str]:
        return {r["commit"][:7] for r in self.results()
                if r["status"].strip().lower() == "keep" and r["commit"]}

    def _note(self, repair: str | None) -> None:
        if repair:
            self.repairs.append(repair)
            warnings.warn(f"workspace repaired: {repair}", stacklevel=3)


def _undumpable() -> None:
    """Linux: close this process to /proc readers of the same user, for the rest of its life.

    A training script runs as you, so it could otherwise read the loop's environment (API keys)
    from /proc/<loop pid>/environ, or its memory from /proc/<pid>/mem. PR_SET_DUMPABLE 0 makes
    those files root's. It stays so after the loop ends, since a process a run left behind could
    read them then. Root still can, and the process writes no core dump. Elsewhere: nothing.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _checked_tag(tag: str | None) -> str:
    """The run's tag (default: today, 'nov27'), checked: it becomes part of a branch name."""
    tag = tag or default_tag()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", tag):
        raise WorkspaceError(f"tag {tag!r} can't be part of a git branch name: "
                             "use letters, digits, '-' and '_' (like 'nov27' or 'lr-sweep')")
    return tag


def _absolute(path) -> str | None:
    """A user's file or folder as an absolute path, so settings.json works from anywhere."""
    return str(Path(path).expanduser().resolve()) if path else None


def _program_text(program) -> str:
    """program.md's text: the default, a given text, or the contents of a given Path."""
    if program is None:
        return baseline.default_program()
    return program.read_text(encoding="utf-8") if isinstance(program, Path) else str(program)
