"""The loop cannot be fooled or broken: confinement, secrets, storage faults, corrupt records,
hostile agents and servers. docs/reliability.md lists every fault with the test that proves it.

Training is not what is under test here, so a fake executor stands in for run_training, except
where the training subprocess itself is the point (its cwd and environment: a few lines of
Python without torch). Metric integrity is in test_integrity.py; crashes of real runs, kills
and the lock in test_loop.py; the reply format in test_edits.py; HTTP errors in test_agents.py.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autoresearch_lib import loop, workspace
from autoresearch_lib.agents import OpenAIAgent, Proposal, ScriptedAgent
from autoresearch_lib.baseline import render_train_py
from autoresearch_lib.data import DataError
from autoresearch_lib.runner import TrainResult, run_training
from autoresearch_lib.workspace import (RESULTS_COLUMNS, ResultsError, Workspace, WorkspaceError,
                                        WorkspaceLocked)

KEY = "sk-reliability-DO-NOT-LEAK-4242"
LR_LINE = next(line for line in render_train_py("quick").splitlines() if line.startswith("MATRIX_LR"))
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="symlinks, rlimits, flock")
quiet_hypothesis = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers

def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True,
                          text=True).stdout.strip()


class FakeRuns:
    """run_training's signature, instant: a float is a finished run with that val_bpb, None a crash."""

    def __init__(self, *values, default=None):
        self.values, self.default, self.calls = list(values), default, 0

    def __call__(self, script_text, settings, run_dir, on_progress=None, on_line=None,
                 timeout=None, stop=None, log_path=None):
        self.calls += 1
        value = self.values.pop(0) if self.values else self.default
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        log = Path(log_path or Path(run_dir) / "run.log")
        log.write_text(f"---\nval_bpb: {value}\n")
        if value is None:
            return TrainResult(reason="exception: RuntimeError: fake", log_path=str(log))
        return TrainResult(status="ok", val_bpb=value, log_path=str(log), run_dir=str(run_dir))


def lr(value: float):
    """A scripted edit: MATRIX_LR -> value."""
    return (f"MATRIX_LR -> {value}", {"MATRIX_LR": value})


def reply(description: str, search: str, replace: str, filename: str = "") -> str:
    head = f"{filename}\n" if filename else ""
    return f"{description}\n{head}<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def state_of(ws) -> tuple:
    """Everything a failed step must leave as it was."""
    return ws.head(), (ws.path / "train.py").read_bytes(), ws.results_path.read_bytes(), \
        git(ws, "status", "--porcelain"), git(ws, "rev-list", "--count", "--all")


@pytest.fixture
def ws(tmp_path, cache):
    """A workspace whose (pretend) baseline has run: val_bpb 1.0, kept."""
    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="test", budget=1, cache_dir=str(cache))
    assert loop.step(ws, ScriptedAgent([]), executor=FakeRuns(1.0)).status == "keep"
    return ws


# ---------------------------------------------------------------- confinement

@posix_only
@pytest.mark.parametrize("replacement", ["link out", "link to a folder", "dangling link", "folder"])
def test_a_train_py_that_is_not_a_regular_file_is_refused_never_followed(ws, tmp_path, replacement):
    outside = tmp_path / "outside.txt"
    outside.write_text(f"OPENAI_API_KEY={KEY}\n")  # what a link could smuggle into the LLM prompt
    path, text, root = ws.path / "train.py", ws.train_py, ws.head()
    path.unlink()
    if replacement == "link out":
        path.symlink_to(outside)
    elif replacement == "link to a folder":
        path.symlink_to(tmp_path)
    elif replacement == "dangling link":
        path.symlink_to(tmp_path / "created-through-the-link.py")
    else:
        path.mkdir()
        (path / "x.py").write_text("")

    with pytest.raises(WorkspaceError, match=r"train.py is a .*not a regular file.*Workspace.open"):
        ws.commit("write through it", "print('hi')\n")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        ws.train_py  # never read either: its text would go to the agent
    agent = ScriptedAgent([lr(0.03)])
    with pytest.raises(WorkspaceError, match="not a regular file"):
        loop.run(ws, agent, max_experiments=1, executor=FakeRuns(0.5))
    assert agent.used == 0 and ws.head() == root and len(ws.results()) == 1
    assert outside.read_text() == f"OPENAI_API_KEY={KEY}\n"
    assert not (tmp_path / "created-through-the-link.py").exists()
    assert " 120000 " not in git(ws, "ls-tree", "-r", "HEAD")  # no symlink was ever committed

    with pytest.warns(UserWarning, match="workspace repaired"):
        again = Workspace.open(ws.path)  # puts the committed train.py back
    assert path.is_file() and not path.is_symlink() and again.train_py == text
    assert git(ws, "status", "--porcelain") == ""
    done = loop.run(again, agent, max_experiments=1, executor=FakeRuns(0.5))
    assert [e.status for e in done] == ["keep"]


def test_edits_of_other_files_through_the_loop_are_crash_rows_that_change_nothing(ws):
    root, settings_json = ws.head(), (ws.path / "settings.json").read_text()
    targets = ["../autoresearch_lib/harness.py", "/etc/passwd", "settings.json", "program.md",
               "../train.py", "logs/../../train.py"]
    agent = ScriptedAgent([reply("cheat", LR_LINE, "MATRIX_LR = 0.5", filename=t) for t in targets])
    runs = FakeRuns()
    done = loop.run(ws, agent, max_experiments=len(targets), executor=runs)
    assert [e.status for e in done] == ["crash"] * len(targets) and runs.calls == 0
    for target, row in zip(targets, ws.results()[1:]):
        assert row["reason"].startswith("proposal: ") and "only train.py may be edited" in row["reason"]
        assert repr(target) in row["reason"]
    assert ws.head() == root and (ws.path / "settings.json").read_text() == settings_json
    assert git(ws, "status", "--porcelain") == ""


def test_only_train_py_is_ever_committed(ws):
    (ws.path / "program.md").write_text("edited by the human, not committed\n")
    (ws.path / "notes.py").write_text("untracked\n")
    kept, dropped = loop.run(ws, ScriptedAgent([lr(0.03), lr(0.04)]), max_experiments=2,
                             executor=FakeRuns(0.9, 0.95))
    assert (kept.status, dropped.status) == ("keep", "discard")
    for commit in (kept.commit, dropped.commit):
        assert git(ws, "show", "--name-only", "--format=", commit) == "train.py"
    assert (ws.path / "notes.py").exists() and "notes.py" not in git(ws, "ls-files")


def test_a_kill_between_writing_and_renaming_train_py_leaves_nothing_behind(ws):
    (ws.path / workspace.TMP_TRAIN_PY).write_text("half of a new train.py")
    text = ws.train_py
    Workspace.open(ws.path)
    assert not (ws.path / workspace.TMP_TRAIN_PY).exists() and ws.train_py == text
    assert git(ws, "status", "--porcelain") == ""


SECRETS = {"OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": "sk-ant-reliability-1", "HF_TOKEN": "hf_rel_2",
           "GITHUB_TOKEN": "ghp_rel_3", "AWS_SECRET_ACCESS_KEY": "aws-rel-4", "DB_PASSWORD": "hunter2-rel",
           "GOOGLE_APPLICATION_CREDENTIALS": "/secret/rel-5.json", "my_api_key": "lower-rel-6",
           "OPENAI_BASE_URL": "http://internal.example/rel-7", "ANTHROPIC_BASE_URL": "http://rel-8"}


def test_training_runs_in_its_run_dir_with_an_environment_without_secrets(tmp_path, quick_settings,
                                                                          monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AUTORESEARCH_PLAIN_SETTING", "visible")
    script = "import json, os\nprint('CWD', os.getcwd())\nprint('ENV', json.dumps(dict(os.environ)))\n"
    result = run_training(script, quick_settings, tmp_path / "run", timeout=60)
    log = Path(result.log_path).read_text()
    cwd = re.search(r"^CWD (.*)$", log, re.M)[1]
    env = json.loads(re.search(r"^ENV (.*)$", log, re.M)[1])
    assert Path(cwd) == (tmp_path / "run").resolve()
    assert env["AUTORESEARCH_PLAIN_SETTING"] == "visible"  # ordinary settings pass through
    assert not set(SECRETS) & set(env), "a secret's name reached the training process"
    assert not [value for value in SECRETS.values() if value in log]
    assert (result.status, result.reason) == ("crash", "no summary")  # it printed no val_bpb


def test_a_train_py_that_prints_its_own_summary_is_caught(tmp_path, quick_settings):
    forged = "print('---')\nprint('val_bpb: 0.100000')\n"  # no training, no harness: a made-up score
    result = run_training(forged, quick_settings, tmp_path / "run", timeout=60)
    assert result.status == "crash" and result.reason == "forged summary"
    # the run id that signs real summaries never reaches train.py's environment
    peek = "import os\nprint('ID' , os.environ.get('AUTORESEARCH_RUN_ID'))\n"
    result = run_training(peek, quick_settings, tmp_path / "run2", timeout=60)
    assert "ID None" in open(result.log_path).read()


# ---------------------------------------------------------------- secrets in what the loop records

def test_an_agent_error_that_quotes_the_key_is_recorded_without_it(ws, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    class Leaky:
        name = "leaky"

        def propose(self, state):
            raise RuntimeError(f"request failed, headers {{'Authorization': 'Bearer {KEY}'}}")

    def echo(state):  # an agent that writes the key into its description
        return f"tried the key {KEY}", state.train_py.replace(LR_LINE, "MATRIX_LR = 0.03")

    events = []
    failed = loop.step(ws, Leaky(), executor=FakeRuns(), on_event=events.append)
    ran = loop.step(ws, ScriptedAgent([echo]), executor=FakeRuns(0.9), on_event=events.append)
    assert failed.status == "crash" and failed.reason.startswith("proposal: agent error: RuntimeError")
    assert "<redacted>" in failed.reason and ran.description == "tried the key <redacted>"
    seen = {"results.tsv": ws.results_path.read_text(), "events": repr(events),
            "experiments": repr([failed, ran]), "log records": caplog.text,
            "git": git(ws, "log", "-p", "--all")}
    seen.update({str(p): p.read_text() for p in ws.log_dir.iterdir()})
    assert "raised an unexpected error" in caplog.text  # the traceback is logged, redacted
    for where, text in seen.items():
        assert KEY not in text, f"the key leaked into {where}"


def test_the_openai_agent_never_shows_its_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = OpenAIAgent(model="m", base_url="http://127.0.0.1:9/v1", api_key=KEY)
    for shown in (repr(agent), str(agent), f"{agent}", repr(agent.client), repr([agent])):
        assert KEY not in shown


# ---------------------------------------------------------------- a full or read-only disk

class HalfWritten:
    """A file whose write stores half the text, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)


def test_a_full_disk_mid_row_leaves_no_half_row_and_resume_works(ws, monkeypatch):
    real_open, before, root = open, ws.results_path.read_bytes(), ws.head()
    full = lambda file, mode="r", *a, **kw: (HalfWritten(real_open(file, mode, *a, **kw)) if "a" in mode
                                            else real_open(file, mode, *a, **kw))
    monkeypatch.setattr(workspace, "open", full, raising=False)
    with pytest.raises(WorkspaceError, match=r"the disk is full \(.*results.tsv\)\. Free some space"
                                             r".*resume with loop.run\(Workspace.open") as err:
        loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=3, executor=FakeRuns(0.9))
    assert isinstance(err.value.__cause__, OSError) and KEY not in str(err.value)
    assert ws.results_path.read_bytes() == before  # the half row was cut off again
    assert len(ws.results()) == 1 and ws.head() != root  # trained, but never recorded

    monkeypatch.undo()  # space was freed
    with pytest.warns(UserWarning, match="no keep row"):
        again = Workspace.open(ws.path)
    assert again.head() == root
    done = loop.run(again, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=FakeRuns(0.9))
    assert [(e.index, e.status) for e in done] == [(1, "keep")] and len(again.results()) == 2


FILL_UP = """
import resource, signal, sys
from pathlib import Path
from autoresearch_lib import loop
from autoresearch_lib.agents import ScriptedAgent
from autoresearch_lib.runner import TrainResult
from autoresearch_lib.workspace import Workspace, WorkspaceError

path, where = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
ws = Workspace.open(path)
room = ws.results_path.stat().st_size + 40  # the next row gets 40 bytes, then the disk is "full"

def fake(script, settings, run_dir, **kwargs):
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "run.log").write_text("ok")
    if where == "row":
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))
    return TrainResult(status="ok", val_bpb=0.5, log_path=str(Path(run_dir) / "run.log"))

if where == "train.py":  # train.py (~15 kB) no longer fits
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
try:
    loop.run(ws, ScriptedAgent([("MATRIX_LR 0.02 -> 0.03", {"MATRIX_LR": 0.03})]),
             max_experiments=1, executor=fake)
except WorkspaceError as e:
    print(e)
    sys.exit(3)
"""


@posix_only
@pytest.mark.parametrize("where", ["train.py", "row"])
def test_a_real_write_failure_in_a_child_process_corrupts_nothing(ws, where):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size, even for root: a real short write."""
    before = state_of(ws)
    child = subprocess.run([sys.executable, "-c", FILL_UP, str(ws.path), where],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stdout + child.stderr
    assert re.search(r"size limit .* or the disk is full \(.*(train\.py|results\.tsv)\)",
                     child.stdout), child.stdout
    assert ws.results_path.read_bytes() == before[2]  # no half row
    assert not (ws.path / workspace.TMP_TRAIN_PY).exists()
    if where == "train.py":
        assert state_of(ws) == before  # nothing happened at all: train.py is whole
    else:  # committed and trained, not recorded: resume undoes it
        with pytest.warns(UserWarning, match="no keep row"):
            assert Workspace.open(ws.path).head() == before[0]
        assert state_of(ws) == before[:4] + (state_of(ws)[4],)  # one unreachable commit more
    done = loop.run(Workspace.open(ws.path), ScriptedAgent([lr(0.03)]), max_experiments=1,
                    executor=FakeRuns(0.5))
    assert [(e.index, e.status) for e in done] == [(1, "keep")]


@posix_only
def test_git_failing_for_lack_of_space_is_explained_and_train_py_restored(ws, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_git = bin_dir / "git"
    fake_git.write_text(
        "#!/bin/sh\nfor a in \"$@\"; do if [ \"$a\" = commit ]; then\n"
        "  echo 'error: unable to write file .git/objects/ab/cd: No space left on device' >&2\n"
        "  echo 'fatal: unable to write new index file' >&2; exit 128\nfi; done\n"
        f"exec {shutil.which('git')} \"$@\"\n")
    fake_git.chmod(0o755)
    before = state_of(ws)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(WorkspaceError, match=r"(?s)git commit.*No space left on device.*"
                                             r"That means the disk is full: free some space"):
        loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=FakeRuns(0.5))
    assert state_of(ws) == before  # train.py was put back from HEAD
    monkeypatch.undo()
    assert loop.step(ws, ScriptedAgent([lr(0.03)]), executor=FakeRuns(0.5)).status == "keep"


@posix_only
@pytest.mark.parametrize("code, meaning", [(errno.EROFS, "read-only.*remount it writable"),
                                           (errno.EACCES, "permission was denied.*chmod -R u\\+w"),
                                           (errno.ENOSPC, "disk is full")])
def test_a_read_only_workspace_stops_the_loop_clearly_and_can_still_be_read(ws, monkeypatch, code, meaning):
    """Tests run as root, where chmod stops nothing: writes under the workspace fail by hand."""
    real_os_open, inside = os.open, str(ws.path)

    def refuse_writes(path, flags, *args, **kwargs):
        if str(path).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_os_open(path, flags, *args, **kwargs)

    before = state_of(ws)
    monkeypatch.setattr(os, "open", refuse_writes)
    with pytest.raises(WorkspaceError, match=f"(?i)Could not write to the workspace .*{meaning}"):
        loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=FakeRuns(0.5))
    with pytest.warns(UserWarning, match="without checking for repairs"):
        readable = Workspace.open(ws.path)  # e.g. to report on a read-only copy
    assert readable.best() == (before[0], 1.0) and state_of(ws) == before
    monkeypatch.undo()
    assert loop.step(ws, ScriptedAgent([lr(0.03)]), executor=FakeRuns(0.5)).status == "keep"


# ---------------------------------------------------------------- a damaged results.tsv

def damage(ws, how: str) -> int:
    """Damage results.tsv (after its header and the baseline row); return the line named."""
    good = ws.results_path.read_text().splitlines()[1]
    lines = {"a row cut short": [good[:20], good], "a field that is not a number":
             [good.replace("1.000000", "fast"), good], "a tab too many": [good + "\textra", good]}
    if how == "bytes that are not UTF-8":
        with open(ws.results_path, "ab") as f:
            f.write(b"abc\xff\xfe\tx\n" + good.encode() + b"\n")
        return 3
    if how == "a header that is not upstream's":
        ws.results_path.write_text("id\tscore\n" + good + "\n")
        return 1
    with open(ws.results_path, "a") as f:
        f.write("\n".join(lines[how]) + "\n")
    return 3


@pytest.mark.parametrize("how", ["a row cut short", "a field that is not a number", "a tab too many",
                                 "bytes that are not UTF-8", "a header that is not upstream's"])
def test_a_damaged_results_tsv_stops_the_loop_naming_the_line(ws, how):
    line = damage(ws, how)
    before = state_of(ws)
    agent = ScriptedAgent([lr(0.03)])
    with pytest.raises(ResultsError, match=rf"results\.tsv, line {line}: .*") as err:
        loop.run(ws, agent, max_experiments=1, executor=FakeRuns(0.5))
    assert "fix or delete" in str(err.value).lower() or line == 1
    with pytest.raises(ResultsError, match=rf"line {line}"):
        Workspace.open(ws.path)  # resuming says the same, and repairs nothing by guesswork
    assert state_of(ws) == before and agent.used == 0


def test_a_truncated_last_row_stops_the_loop_until_open_drops_it(ws):
    with open(ws.results_path, "a") as f:
        f.write("abcdef0\t0.9")  # killed mid-write, no newline
    with pytest.raises(ResultsError, match=f"line 3: expected {len(RESULTS_COLUMNS)}"):
        loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=FakeRuns(0.5))
    with pytest.warns(UserWarning, match="half-written"):
        again = Workspace.open(ws.path)
    assert loop.step(again, ScriptedAgent([lr(0.03)]), executor=FakeRuns(0.5)).status == "keep"


# any code point, lone surrogates (which UTF-8 can't store) and the separators TSV cares about
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]),
                     st.sampled_from(list('\t\r\n\x00\x0b\x0c\x1f\x7f\x85\u2028"\'#,')))
ANY_TEXT = st.text(ANY_CHAR, max_size=60)


def cleaned(text: str) -> str:
    """What results.tsv keeps of a description: one line, UTF-8, no double quotes (for pandas)."""
    bad = lambda c: ord(c) < 32 or ord(c) == 127 or unicodedata.category(c) == "Cs"
    return "".join(" " if bad(c) else "'" if c == '"' else c for c in text)


@settings(quiet_hypothesis, max_examples=80)
@given(description=ANY_TEXT)
def test_any_description_round_trips_as_one_row(ws, description):
    n = len(ws.results())
    ws.append_result({"commit": "abcdef0", "val_bpb": 1.5, "memory_gb": 0.1, "status": "discard",
                      "description": description, "reason": description})
    rows, lines = ws.results(), ws.results_path.read_text(encoding="utf-8").split("\n")
    assert len(rows) == n + 1 and lines[-1] == "" and len(lines) == n + 3
    assert all(line.count("\t") == len(RESULTS_COLUMNS) - 1 for line in lines[:-1])
    assert rows[-1]["description"] == rows[-1]["reason"] == cleaned(description)
    assert (rows[-1]["commit"], rows[-1]["val_bpb"], rows[-1]["status"]) == ("abcdef0", 1.5, "discard")


def test_upstreams_pandas_reads_hostile_descriptions_row_for_row(ws):
    pd = pytest.importorskip("pandas")
    hostile = ['"starts with a quote', 'tab\there', "new\nline", "cr\r", "nul\x00", "lone \udc80",
               "a, comma; # hash", "'single'", "\u2028 line separator", ""]
    for text in hostile:
        ws.append_result({"commit": "abcdef0", "val_bpb": 1.5, "status": "discard", "description": text})
    df = pd.read_csv(ws.results_path, sep="\t")
    assert len(df) == 1 + len(hostile) and list(df.columns[:5]) == RESULTS_COLUMNS[:5]
    assert list(df["description"].fillna("")[1:]) == [cleaned(t).strip() if t == "" else cleaned(t)
                                                      for t in hostile]


# ---------------------------------------------------------------- hostile or broken agents

class Sequence:
    """An agent that does what each callable says, one per experiment."""

    name = "sequence"

    def __init__(self, *behaviours):
        self.behaviours = list(behaviours)

    def propose(self, state):
        return self.behaviours.pop(0)(state)


def edited(state, value="0.03", extra=""):
    return state.train_py.replace(LR_LINE, f"MATRIX_LR = {value}{extra}")


def raise_(error):
    def behaviour(state):
        raise error
    return behaviour


def test_an_agent_that_raises_or_returns_garbage_is_a_crash_row_and_the_loop_goes_on(ws, caplog):
    agent = Sequence(
        raise_(TypeError("unsupported operand")),
        lambda s: None,
        lambda s: Proposal("bytes, not text", edited(s).encode(), original=s.train_py),
        lambda s: Proposal("a lone surrogate", edited(s, extra=" # \udc80"), original=s.train_py),
        lambda s: Proposal("nul\x00 tab\tnew\nline \ud800 end", edited(s), usage=None, original=s.train_py),
        raise_(KeyError("choices")),
        lambda s: Proposal("fine", edited(s, "0.04"), original=s.train_py))
    runs = FakeRuns(0.9, 0.95)
    done = loop.run(ws, agent, max_experiments=7, executor=runs)
    assert [e.status for e in done] == ["crash"] * 4 + ["keep", "crash", "discard"]
    reasons = [e.reason for e in done]
    assert reasons[0] == "proposal: agent error: TypeError: unsupported operand"
    assert reasons[1].startswith("proposal: the agent returned NoneType, not a Proposal")
    assert reasons[2].startswith("proposal: the agent's proposal holds train.py as bytes, not text")
    assert reasons[3].startswith("proposal: the new train.py is not valid text (surrogates not allowed")
    assert reasons[5] == "proposal: agent error: KeyError: 'choices'"
    assert done[4].description == "nul tab new line end" and runs.calls == 2
    assert git(ws, "log", "-1", "--format=%s", done[4].commit) == "nul tab new line end"
    assert ws.head() == done[4].commit and git(ws, "status", "--porcelain") == ""
    assert [r["status"] for r in ws.results()] == ["keep"] + [e.status for e in done]
    assert caplog.text.count("raised an unexpected error") == 2


def test_the_same_agent_bug_three_times_in_a_row_stops_the_loop(ws, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    agent = Sequence(*[raise_(AttributeError(f"'str' object has no attribute 'usage' ({KEY})"))] * 5)
    with pytest.raises(loop.LoopError, match="failed with an unexpected error 3 times in a row") as err:
        loop.run(ws, agent, executor=FakeRuns())
    assert KEY not in "".join(traceback.format_exception(err.value))
    assert [r["status"] for r in ws.results()] == ["keep", "crash", "crash", "crash"]
    assert len(agent.behaviours) == 2 and git(ws, "status", "--porcelain") == ""


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_inside_the_agent_still_stops_the_loop(ws, stop):
    before = state_of(ws)
    with pytest.raises(stop):
        loop.run(ws, Sequence(raise_(stop())), executor=FakeRuns())
    assert state_of(ws) == before


REPLIES = st.one_of(
    ANY_TEXT,
    st.builds(lambda d, new: reply(d, LR_LINE, new), ANY_TEXT, ANY_TEXT),
    st.builds(lambda d, v: reply(d, LR_LINE, f"MATRIX_LR = {v}"), ANY_TEXT, st.floats(0.001, 1)))


@settings(quiet_hypothesis, max_examples=40)
@given(text=REPLIES)
@example(text=reply("a NUL\x00 in the description", LR_LINE, "MATRIX_LR = 0.5"))  # broke git commit
@example(text=reply("a lone \ud800 surrogate", LR_LINE, "MATRIX_LR = 0.5"))  # broke the commit too
@example(text=reply("a lone surrogate in the code", LR_LINE, "MATRIX_LR = 0.5  # \udc80"))
def test_any_reply_through_the_loop_is_a_run_or_a_crash_row_never_an_exception(ws, text):
    root, n = ws.head(), len(ws.results())
    exp = loop.step(ws, ScriptedAgent([text]), executor=FakeRuns(2.0))  # never better: reset
    assert exp.status in ("crash", "discard")
    assert exp.status == "discard" or exp.reason.startswith("proposal: ")
    assert len(ws.results()) == n + 1 and ws.head() == root
    assert git(ws, "status", "--porcelain") == ""


# ---------------------------------------------------------------- model servers that misbehave

WEB_PAGE = (200, b"<html><body>Welcome to the web UI</body></html>")


def test_a_server_slower_than_the_timeout_is_a_crash_row_after_the_retries(ws, llm):
    llm.hold, llm.respond = threading.Event(), lambda n: WEB_PAGE  # answers far later than 0.5 s
    agent = OpenAIAgent(model="slow", base_url=llm.url, api_key=KEY, timeout=0.5, max_retries=1)
    start = time.monotonic()
    exp = loop.step(ws, agent, executor=FakeRuns())
    elapsed = time.monotonic() - start
    assert exp.status == "crash" and "failed, even after 1 retries: Request timed out" in exp.reason
    assert len(llm.requests) == 2 and elapsed < 10 and KEY not in exp.reason
    assert ws.head() == ws.best()[0] and git(ws, "status", "--porcelain") == ""


def test_a_server_answering_with_a_web_page_is_a_crash_row(ws, llm):
    llm.respond = lambda n: WEB_PAGE
    agent = OpenAIAgent(model="web", base_url=llm.url, api_key=KEY, max_retries=0, timeout=5)
    exp = loop.step(ws, agent, executor=FakeRuns())
    assert exp.status == "crash" and exp.reason.startswith("proposal: ")
    assert KEY not in exp.reason and loop.step(ws, ScriptedAgent([lr(0.03)]),
                                               executor=FakeRuns(0.5)).status == "keep"


# ---------------------------------------------------------------- bad data

@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01\x02binary\x00" * 50, "binary")])
def test_an_empty_or_binary_corpus_stops_the_loop_before_any_run(tmp_path, cache, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="test", budget=1, text=str(corpus),
                          cache_dir=str(cache))
    root = ws.head()
    with pytest.raises(DataError, match=message):
        loop.run(ws, ScriptedAgent([]), max_experiments=1)  # the real runner
    assert ws.results() == [] and ws.head() == root and git(ws, "status", "--porcelain") == ""
    assert not (ws.path / "runs" / "0000" / "run.log").exists()  # no training started


def test_a_baseline_that_crashes_stops_the_loop_with_what_to_fix(tmp_path, cache):
    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="test", budget=1, cache_dir=str(cache))
    assert loop.step(ws, ScriptedAgent([]), executor=FakeRuns(None)).status == "crash"
    agent = ScriptedAgent([lr(0.03)])
    with pytest.raises(loop.LoopError, match="the baseline crashed .*smaller preset or budget"):
        loop.run(ws, agent, executor=FakeRuns(0.5))
    assert agent.used == 0 and len(ws.results()) == 1


def test_a_second_loop_is_refused_by_the_lock_while_the_first_runs(ws):
    seen = []

    def executor(*args, **kwargs):  # the first loop is training: a second one tries to start
        with pytest.raises(WorkspaceLocked, match="in use by another loop"):
            loop.step(Workspace(ws.path), ScriptedAgent([lr(0.05)]), executor=FakeRuns(0.1))
        seen.append(True)
        return FakeRuns(0.9)(*args, **kwargs)

    assert loop.step(ws, ScriptedAgent([lr(0.03)]), executor=executor).status == "keep"
    assert seen == [True] and len(ws.results()) == 2
