"""A workspace: the git-backed folder where one research run lives.

    train.py       the agent's file: every experiment is one commit of it
    program.md     the human's instructions to the agent
    settings.json  the fixed settings (budget, data, evaluation); the loop never edits it
    .gitignore     keeps the outputs below out of git
    results.tsv    one row per experiment, upstream's five columns first (untracked)
    logs/          one log per experiment: logs/0000.log, logs/0001.log, ...

The folder is a git repository on branch `autoresearch/<tag>`. The branch only advances on
improvements: an experiment is committed, trained, and undone with `git reset --hard` if it
did not beat the best. results.tsv is append-only, so it remembers the discarded and crashed
experiments that git forgets.

Crash recovery. A loop can be killed at any moment (Ctrl-C, a kernel restart, a preempted
Colab). `Workspace.open` puts the folder back in a consistent state:
- a half-written last line of results.tsv (no trailing newline) is dropped: the one time the
  file is rewritten;
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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
import subprocess
import warnings
from pathlib import Path

from . import baseline, config
from .config import Settings

try:
    import fcntl
except ImportError:  # windows has no flock; see Workspace.lock
    fcntl = None

RESULTS_COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "timestamp",
                   "seconds", "steps", "tokens_M", "agent", "prompt_tokens", "completion_tokens",
                   "reason",
                   # the conditions a run was measured under (fair comparisons on a busy machine)
                   "tok_per_sec", "params_M", "flops_per_token", "load",
                   "sandbox",  # how training was isolated: "bwrap", or "none" (see sandbox.py)
                   "sig"]  # the loop's HMAC of the row: rows it did not write are refused
UPSTREAM_COLUMNS = RESULTS_COLUMNS[:5]  # what karpathy/autoresearch writes and its tools read
STATUSES = ("keep", "discard", "crash",
            "recheck")  # the incumbent trained again for a fair comparison (see loop.py)
TRACKED = ["train.py", "program.md", "settings.json", ".gitignore"]
TMP_TRAIN_PY = ".train.py.tmp"  # the new train.py until it is renamed over the old one
GITIGNORE = "results.tsv\nlogs/\nruns/\n*.pt\n.lock\n"
MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()

_INTS = {"steps", "prompt_tokens", "completion_tokens"}
_FLOATS = {"val_bpb", "memory_gb", "seconds", "tokens_M", "tok_per_sec", "params_M",
           "flops_per_token", "load"}
_FORMATS = {"val_bpb": "{:.6f}", "memory_gb": "{:.1f}", "seconds": "{:.1f}", "tokens_M": "{:.3f}",
            "tok_per_sec": "{:.0f}", "params_M": "{:.3f}", "flops_per_token": "{:.4g}",
            "load": "{:.2f}"}
# variables that would point git at another repository (e.g. when tests run inside a git hook)
_GIT_REDIRECTS = {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR"}


class WorkspaceError(RuntimeError):
    """The workspace folder can't be used as asked; the message says what to do instead."""


class WorkspaceLocked(WorkspaceError):
    """Another loop already holds this workspace; `pid` is its process id (or None)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class ResultsError(ValueError):
    """A line of results.tsv can't be read; the message names the file and the line."""


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
    env = {k: v for k, v in os.environ.items() if k not in _GIT_REDIRECTS}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, check=True,
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


# ---------------------------------------------------------------- results.tsv, row by row

def _cell(name: str, value) -> str:
    """One value as results.tsv text."""
    if value is None:
        return ""
    if name in _INTS:
        return str(int(value))
    if name in _FORMATS and isinstance(value, (int, float)):
        return _FORMATS[name].format(value)
    # a tab or newline would split the row; a leading double quote makes pandas read on
    # across the following lines, so upstream's analysis notebook would see one row; other
    # control characters and lone surrogates (which UTF-8 can't store) become spaces too
    return one_line(str(value)).replace('"', "'")


def one_line(text: str) -> str:
    """`text` without control characters or lone surrogates: safe as a TSV cell or git message."""
    return re.sub(r"[\x00-\x1f\x7f\ud800-\udfff]", " ", text)


def _format_row(row: dict, columns: list[str]) -> str:
    """A row dict as one tab-separated line, in the order of the file's header."""
    unknown = set(row) - set(RESULTS_COLUMNS)
    if unknown:
        raise ValueError(f"unknown results fields {sorted(unknown)}; "
                         f"the columns are {RESULTS_COLUMNS}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    # upstream writes 0.000000 and 0.0 for a crash, which has neither
    row = {"val_bpb": 0.0, "memory_gb": 0.0, **{k: v for k, v in row.items() if v is not None}}
    return "\t".join(_cell(name, row.get(name)) for name in columns) + "\n"


def _parse_value(name: str, text: str):
    """A results.tsv field as a Python value (raises ValueError for a bad number)."""
    if name in _INTS or name in _FLOATS:
        if not text.strip() and name not in ("val_bpb", "memory_gb"):
            return None  # an extra column left empty
        return int(text) if name in _INTS else float(text)
    return text


def _parse_line(path: Path, number: int, header: list[str], line: str) -> dict:
    """One data line of results.tsv as a dict with every RESULTS_COLUMNS key."""
    fields = line.split("\t")
    where = f"{path}, line {number}"
    if len(fields) != len(header):
        raise ResultsError(f"{where}: expected {len(header)} tab-separated fields "
                           f"({', '.join(header)}) but found {len(fields)}. The line was probably "
                           "edited by hand or cut short; fix or delete it, then try again.")
    row = dict.fromkeys(RESULTS_COLUMNS)
    for name, text in zip(header, fields):
        try:
            row[name] = _parse_value(name, text)
        except ValueError:
            raise ResultsError(f"{where}: {name} should be a number but is {text!r}; "
                               "fix or delete that line, then try again.") from None
    return row


def _read_results(path: Path) -> list[dict]:
    """Every row of a results.tsv: ours, or upstream's with only the first five columns."""
    if not path.exists():
        return []
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        number = data[: e.start].count(b"\n") + 1
        raise ResultsError(f"{path}, line {number}: not UTF-8 text (byte {data[e.start]:#04x}); the "
                           "file was damaged or edited with another encoding. Fix or delete that "
                           "line, then try again.") from None
    header = lines[0].split("\t")
    if header[:5] != UPSTREAM_COLUMNS:
        raise ResultsError(f"{path}, line 1: the header should start with the tab-separated "
                           f"columns {' '.join(UPSTREAM_COLUMNS)}, but it is {lines[0]!r}.")
    return [_parse_line(path, number, header, line)
            for number, line in enumerate(lines[1:], start=2) if line.strip()]


def _repair_results(path: Path) -> str | None:
    """Make results.tsv whole again: recreate it if missing, drop a half-written last line."""
    header = ("\t".join(RESULTS_COLUMNS) + "\n").encode()
    data = path.read_bytes() if path.exists() else None
    if data is not None and data.endswith(b"\n"):
        return None
    kept = data[: data.rfind(b"\n") + 1] if data else b""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept or header)
    os.replace(tmp, path)  # atomic: a second kill now can't lose the good rows
    if data is None:
        return f"{path} was missing: started a new one"
    return f"dropped the half-written last line of {path}: {data[len(kept):]!r}"


# ---------------------------------------------------------------- the workspace

class Workspace:
    """A folder holding one research run. Make one with `create`, continue one with `open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.repairs: list[str] = []  # what `open` fixed after a crash

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    @classmethod
    def create(cls, path, preset="auto", budget=None, tag=None, dataset=None, text=None,
               val_text=None, program=None, **settings_overrides) -> "Workspace":
        """A new workspace at `path` (missing or empty): baseline committed, results.tsv empty."""
        ws = cls(path)
        ws._check_can_create()
        tag = tag or default_tag()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", tag):
            raise WorkspaceError(f"tag {tag!r} can't be part of a git branch name: "
                                 "use letters, digits, '-' and '_' (like 'nov27' or 'lr-sweep')")
        # build everything that can fail on a bad argument before touching the disk
        settings = config.make_settings(preset, budget=budget, dataset=dataset,
                                        text=_absolute(text), val_text=_absolute(val_text),
                                        **settings_overrides)
        files = {"train.py": baseline.render_train_py(settings.preset),
                 "program.md": _program_text(program), ".gitignore": GITIGNORE}
        ws._init_repo(f"autoresearch/{tag}")
        ws._commit_baseline(files, settings)
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
        missing = [name for name in ("settings.json", ".git") if not (self.path / name).exists()]
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
        _repair_results(self.results_path)  # a missing file becomes a header-only one
        self.log_dir.mkdir(exist_ok=True)
        self._git("add", *TRACKED)
        self._git("commit", "-q", "--no-verify", "-m", "baseline")

    def _git(self, *args: str) -> str:
        return _git(self.path, *args)

    # ------------------------------------------------------------ what's in it

    @property
    def settings(self) -> Settings:
        """The fixed settings this workspace was created with."""
        return Settings.from_json(self.path / "settings.json")

    @property
    def branch(self) -> str:
        return self._git("rev-parse", "--abbrev-ref", "HEAD").strip()

    @property
    def train_py(self) -> str:
        return self._train_py_path().read_text(encoding="utf-8")

    def _train_py_path(self) -> Path:
        """train.py, after checking it is a regular file of this folder (not a link out of it)."""
        path = self.path / "train.py"
        if path.is_symlink():
            kind = f"a symlink (to {os.readlink(path)})"
        elif path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "a special file"
        else:
            return path  # a regular file, or missing (commit writes it; open restores it)
        raise WorkspaceError(
            f"{path} is {kind}, not a regular file: the loop only reads and writes the "
            "workspace's own train.py, never through a link or into another place. Something "
            "other than the loop replaced it (a training script can: it runs with your rights). "
            f"Workspace.open({str(self.path)!r}) puts the committed train.py back.")

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

    def commit(self, message: str, train_py_text: str) -> str:
        """Write train.py and commit it (nothing else); returns the short commit id.

        Either both happen or train.py is left as it was: the new text is written to a temporary
        file and renamed over train.py (so a full disk can't leave half a file), and put back
        from HEAD if git then fails.
        """
        path = self._train_py_path()
        message = " ".join(one_line(message or "").split()) or "experiment"  # no NUL for git
        try:
            data = train_py_text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WorkspaceError(f"the new train.py can't be saved as UTF-8 text: {e}") from None
        tmp = path.with_name(TMP_TRAIN_PY)
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with open(tmp, "xb") as f:  # "x": a new file, so nothing is written through a link
                f.write(data)
            os.replace(tmp, path)  # replaces the name train.py, whatever it pointed to
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(e, self.path, path) or e
        try:
            # --allow-empty: an unchanged proposal still gets its own commit and results row;
            # --no-verify: the user's git hooks have no say in an experiment
            self._git("commit", "-q", "--no-verify", "--allow-empty", "-m", message, "--", "train.py")
        except WorkspaceError:
            with contextlib.suppress(WorkspaceError):
                self._git("checkout", "HEAD", "--", "train.py")  # as it was before
            raise
        return self.head()

    def reset_to(self, commit: str) -> None:
        """Throw away everything after `commit` (the undo of a discarded experiment)."""
        self._git("reset", "-q", "--hard", commit)

    def show(self, commit: str, name: str = "train.py") -> str:
        """The text of a tracked file as it was at `commit` (the incumbent's train.py, to re-run it)."""
        return self._git("show", f"{commit}:{name}")

    def diff(self, a: str, b: str | None = None) -> str:
        """Unified diff of train.py from commit `a` to commit `b` (or to the file on disk)."""
        return self._git("diff", a, *([b] if b else []), "--", "train.py")

    # ------------------------------------------------------------ results.tsv

    def append_result(self, row: dict) -> None:
        """Add one experiment's row to results.tsv: appended, flushed to disk, never rewritten."""
        if not row.get("timestamp"):
            row = {**row, "timestamp": dt.datetime.now().isoformat(timespec="seconds")}
        if not self.results_path.exists():
            _repair_results(self.results_path)  # a deleted file comes back header-only
        with open(self.results_path, encoding="utf-8") as f:
            columns = f.readline().rstrip("\n").split("\t")  # upstream's file keeps its five
        line = _format_row(row, columns)
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

    def results(self) -> list[dict]:
        """Every row of results.tsv, numbers as numbers, missing extras as None."""
        return _read_results(self.results_path)

    def next_index(self) -> int:
        """The number of the next experiment: how many rows results.tsv has."""
        return len(self.results())

    def best(self) -> tuple[str, float] | None:
        """(commit, val_bpb) of the incumbent, or None before the baseline ran.

        The incumbent is the last kept commit, the tip of the branch (each keep builds on the one
        before); its val_bpb is its latest measurement: a `recheck` row after its keep row
        measured it again, under the conditions of that time (see loop.py).
        """
        rows = self.results()
        kept = [i for i, r in enumerate(rows) if r["status"].strip().lower() == "keep"]
        if not kept:
            return None
        commit, val_bpb = rows[kept[-1]]["commit"], rows[kept[-1]]["val_bpb"]
        for r in rows[kept[-1] + 1:]:
            if r["status"].strip().lower() == "recheck" and r["commit"] == commit:
                val_bpb = r["val_bpb"]
        return commit, val_bpb

    # ------------------------------------------------------------ one loop at a time

    @contextlib.contextmanager
    def lock(self):
        """Hold the workspace for one loop; a second one gets WorkspaceLocked.

        flock, not "does .lock exist": the OS releases the lock when its holder dies, so a
        loop killed by SIGKILL or a crashed kernel never leaves a stale lock behind.
        """
        if fcntl is None:
            warnings.warn("no fcntl on this system: two loops on one workspace are not prevented")
            yield self
            return
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by runs
        except OSError as e:
            raise storage_error(e, self.path) or e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._locked_error(os.read(fd, 32).decode().strip()) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # so the next one can say who holds it
            yield self
        finally:
            os.close(fd)  # closing releases the lock

    def _locked_error(self, pid_text: str) -> WorkspaceLocked:
        pid = int(pid_text) if pid_text.isdigit() else None
        who = f"process {pid}" if pid else "another process"
        if pid == os.getpid():
            who += " (this very process: a loop already running here, e.g. in this notebook)"
        return WorkspaceLocked(
            f"{self.path} is in use by another loop, held by {who}. Two loops on one workspace "
            "would reset each other's experiments: stop that loop first (or kill the process), "
            "or work in another workspace.", pid)

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
        self._note(_repair_results(self.results_path))
        head = self.head()
        # without results.tsv (a fresh clone) there is no record to judge HEAD by
        target = self._safe_commit() if had_results else head
        reasons = []
        if self._git("status", "--porcelain", "--", "train.py").strip():
            reasons.append("train.py had uncommitted edits")
        if head != target and head not in self._kept_commits():
            reasons.append(f"HEAD {head} is an experiment with no keep row in results.tsv "
                           "(the loop stopped before recording or undoing it)")
        if reasons:
            self.reset_to(target)
            self._note(f"reset to {target}, the best kept commit, because {' and '.join(reasons)}")

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


def _absolute(path) -> str | None:
    """A user's file or folder as an absolute path, so settings.json works from anywhere."""
    return str(Path(path).expanduser().resolve()) if path else None


def _program_text(program) -> str:
    """program.md's text: the default, a given text, or the contents of a given Path."""
    if program is None:
        return baseline.default_program()
    return program.read_text(encoding="utf-8") if isinstance(program, Path) else str(program)
