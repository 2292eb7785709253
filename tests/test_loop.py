"""Tests for the research loop: keep/discard bookkeeping, every kind of crash, proposals that
fail, an OpenAI-compatible agent against a real local HTTP server (and the key never leaking),
noise-aware decisions, stop and resume, a SIGKILL mid-experiment, the lock, and the CLI.

Real training runs (quick preset, 1 s budget) are few and cost ~10 s each on a small CPU; where
the thing under test is the loop's bookkeeping, a fake executor stands in for run_training.
"""

import functools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from autoresearch_lib import loop
from autoresearch_lib.agents import OfflineAgent, OpenAIAgent, ProposalError, ScriptedAgent, State
from autoresearch_lib.runner import TrainResult, run_training
from autoresearch_lib.workspace import UPSTREAM_COLUMNS, Workspace, WorkspaceLocked

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-DO-NOT-LEAK-123"
ROW_RE = re.compile(r"[0-9a-f]{7}\t\d+\.\d{6}\t\d+\.\d\t(keep|discard|crash)\t[^\t]*(\t.*)?")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="flock, process groups, SIGKILL")


# ---------------------------------------------------------------- helpers

def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True,
                          text=True).stdout.strip()


def new_workspace(tmp_path, cache, **kw) -> Workspace:
    kw = {"budget": 1, **kw}
    return Workspace.create(tmp_path / "ws", preset="quick", tag="test", cache_dir=str(cache), **kw)


def clone(ws: Workspace, tmp_path) -> Workspace:
    """A private copy of a workspace (git history, results and logs included)."""
    shutil.copytree(ws.path, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


def rows_text(ws) -> list[list[str]]:
    """results.tsv as raw text fields, header first."""
    return [line.split("\t") for line in ws.results_path.read_text().splitlines()]


def branch_commits(ws) -> set[str]:
    return {c[:7] for c in git(ws, "rev-list", "HEAD").split()}


def kept_commits(ws) -> set[str]:
    return {r["commit"] for r in ws.results() if r["status"] == "keep"}


def reply(description: str, search: str, replace: str) -> str:
    """An edit in the format an LLM sends."""
    return f"{description}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def pids_in(folder: Path) -> list[int]:
    """Processes whose working directory is `folder` (a training run's run_dir)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) == folder.resolve():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


class FakeRuns:
    """An executor with run_training's signature that 'trains' instantly.

    Each call takes the next value: a float is a finished run with that val_bpb, None is a
    crash, "stop" is a run the user stopped. The scripts it was given are kept in `scripts`.
    """

    def __init__(self, *values):
        self.values, self.scripts = list(values), []

    def __call__(self, script_text, settings, run_dir, on_progress=None, on_line=None,
                 timeout=None, stop=None, log_path=None):
        value = self.values.pop(0)
        self.scripts.append(script_text)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = Path(log_path or run_dir / "run.log")
        log.write_text(f"fake run of {len(script_text)} characters\n---\nval_bpb: {value}\n")
        if on_line:
            on_line("fake run")
        result = TrainResult(run_dir=str(run_dir), log_path=str(log), training_seconds=1.0,
                             total_seconds=2.0)
        if value == "stop":
            stop.set()  # the user pressed stop while this run trained
            result.status, result.reason = "stopped", "stopped by the user"
        elif value is None:
            result.reason = "exception: RuntimeError: a fake crash"
        else:
            result.status, result.val_bpb, result.peak_vram_mb, result.num_steps = "ok", value, 1536.0, 7
        return result


# ---------------------------------------------------------------- one real baseline, shared

@pytest.fixture(scope="module")
def baseline_ws(prepared, cache, tmp_path_factory):
    """A workspace whose baseline really trained (quick preset, 1 s); tests clone it."""
    ws = new_workspace(tmp_path_factory.mktemp("baseline"), cache)
    exp = loop.step(ws, OfflineAgent())
    assert exp.status == "keep", exp.result.error_tail if exp.result else exp.reason
    return ws


def test_the_first_experiment_is_the_unmodified_baseline(baseline_ws):
    ws = baseline_ws
    root = git(ws, "rev-list", "--max-parents=0", "HEAD")[:7]
    [row] = ws.results()
    assert (row["commit"], row["description"], row["status"]) == (root, "baseline", "keep")
    assert 0 < row["val_bpb"] < 20 and row["memory_gb"] > 0 and row["agent"] == "baseline"
    assert ws.head() == root and git(ws, "rev-list", "--count", "HEAD") == "1"
    header, line = rows_text(ws)
    assert header[:5] == UPSTREAM_COLUMNS and ROW_RE.fullmatch("\t".join(line))
    assert "val_bpb:" in (ws.log_dir / "0000.log").read_text()
    # the runner writes the log where the workspace keeps it, out of the run's reach: no copy
    assert not (ws.path / "runs" / "0000" / "run.log").exists()


# ---------------------------------------------------------------- bookkeeping (fake runs)

def test_keep_advances_the_branch_and_discard_resets_to_the_best(tmp_path, cache):
    ws = new_workspace(tmp_path, cache)
    root, baseline_text = ws.head(), ws.train_py
    runs = FakeRuns(1.0, 0.9, 0.95, None)
    agent = ScriptedAgent([("better", {"MATRIX_LR": 0.03}), ("worse", {"MATRIX_LR": 0.04}),
                           ("broken", {"MATRIX_LR": 0.05})])
    events = []

    first = loop.step(ws, agent, executor=runs, on_event=events.append)
    assert (first.index, first.commit, first.description, first.status, first.val_bpb) == (
        0, root, "baseline", "keep", 1.0)
    assert runs.scripts == [baseline_text] and agent.used == 0  # the agent is not asked
    assert [e.kind for e in events] == ["experiment", "proposal", "line", "result", "decision"]

    better = loop.step(ws, agent, executor=runs)
    assert (better.index, better.status, better.best_before) == (1, "keep", 1.0)
    assert ws.head() == better.commit != root and git(ws, "rev-list", "--count", "HEAD") == "2"
    kept_text = ws.train_py
    assert "MATRIX_LR = 0.03" in kept_text and ws.best() == (better.commit, 0.9)

    worse = loop.step(ws, agent, executor=runs)
    assert (worse.status, worse.best_before) == ("discard", 0.9)
    assert ws.head() == better.commit and worse.commit not in branch_commits(ws)
    assert ws.train_py == kept_text and kept_text.rstrip() == git(ws, "show", f"{better.commit}:train.py")
    assert runs.scripts[2] == kept_text.replace("MATRIX_LR = 0.03", "MATRIX_LR = 0.04")

    crash = loop.step(ws, agent, executor=runs)
    assert (crash.status, crash.val_bpb, crash.reason) == ("crash", None, "exception: RuntimeError: a fake crash")
    assert ws.head() == better.commit and ws.train_py == kept_text
    assert git(ws, "status", "--porcelain") == "" and runs.values == [] and len(runs.scripts) == 4

    header, *lines = rows_text(ws)
    assert header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert all(ROW_RE.fullmatch("\t".join(line)) for line in lines)
    assert [line[:5] for line in lines] == [
        [root, "1.000000", "1.5", "keep", "baseline"],
        [better.commit, "0.900000", "1.5", "keep", "better"],
        [worse.commit, "0.950000", "1.5", "discard", "worse"],
        [crash.commit, "0.000000", "0.0", "crash", "broken"]]
    assert sorted(p.name for p in ws.log_dir.iterdir()) == [f"{i:04d}.log" for i in range(4)]


def test_run_stops_after_max_experiments(tmp_path, cache):
    ws = new_workspace(tmp_path, cache)
    runs = FakeRuns(1.0, 1.1, 0.9, 1.2)
    done = loop.run(ws, OfflineAgent(seed=1), max_experiments=3, executor=runs)
    assert [e.index for e in done] == [0, 1, 2] and len(ws.results()) == 3 and runs.values == [1.2]
    assert [e.status for e in done] == ["keep", "discard", "keep"] and ws.head() == done[2].commit


# ---------------------------------------------------------------- every crash, with real runs

def syntax_error(state):
    return "a syntax error", state.train_py.replace("import math", "import math\nx = (", 1)


class Recording:
    """Wraps an agent and keeps the State it was shown each time."""

    def __init__(self, agent):
        self.agent, self.name, self.states = agent, agent.name, []

    def propose(self, state):
        self.states.append(state)
        return self.agent.propose(state)


def test_every_kind_of_crash_is_recorded_reverted_and_the_loop_goes_on(baseline_ws, tmp_path):
    ws = clone(baseline_ws, tmp_path)
    root, text = ws.head(), ws.train_py
    setup = "    run = harness.setup()"
    top = "import math"  # edits here fail before torch is imported: seconds saved per run
    crashes = [
        (reply("raise an error", top, "import math\nraise RuntimeError('the edit broke training')"),
         "exception: RuntimeError: the edit broke training"),
        (reply("NaN learning rate", line_of(text, "MATRIX_LR ="), "MATRIX_LR = float('nan')"), "nan"),
        (reply("simulated OOM", setup,
               "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')"),
         "oom"),
        (reply("exit without a summary", top, "import math\nprint('bye')\nraise SystemExit(0)"),
         "no summary"),
        (syntax_error, "exception: SyntaxError"),
        (reply("hang", top, "import math\nimport time\ntime.sleep(600)"), "timeout"),
    ]
    agent = Recording(ScriptedAgent([edit for edit, _ in crashes]))

    done = loop.run(ws, agent, max_experiments=5)
    start = time.time()
    done.append(loop.step(ws, agent, executor=functools.partial(run_training, timeout=5)))
    assert time.time() - start < 30  # the hung run was killed at its timeout

    rows = ws.results()[1:]
    assert [r["reason"] for r in rows] == [e.reason for e in done]
    for (_, reason), row, exp in zip(crashes, rows, done):
        assert row["status"] == "crash" and row["reason"].startswith(reason), row
        assert (row["val_bpb"], row["memory_gb"]) == (0.0, 0.0)
        assert exp.result.error_tail or reason == "timeout"  # the hang printed nothing at all
    assert all(line[1:4] == ["0.000000", "0.0", "crash"] for line in rows_text(ws)[2:])
    # each crash was undone: the agent always started from the baseline, and saw the last crash
    assert [s.train_py for s in agent.states] == [text] * 6
    assert agent.states[0].last_crash_log is None
    assert "the edit broke training" in agent.states[1].last_crash_log
    assert "training diverged" in agent.states[2].last_crash_log
    assert ws.head() == root and ws.train_py == text and git(ws, "status", "--porcelain") == ""
    assert branch_commits(ws) == {root} and ws.best()[0] == root
    assert "OutOfMemoryError" in (ws.log_dir / "0003.log").read_text()


# ---------------------------------------------------------------- proposals that fail

def test_a_malformed_scripted_proposal_is_a_crash_row_and_the_loop_goes_on(baseline_ws, tmp_path):
    ws = clone(baseline_ws, tmp_path)
    root = ws.head()
    bad = "Raise the LR\n<<<<<<< SEARCH\nMATRIX_LR = 0.999\n=======\nMATRIX_LR = 0.03\n>>>>>>> REPLACE\n"
    runs = FakeRuns(1.0)
    done = loop.run(ws, ScriptedAgent([bad, ("lower LR", {"MATRIX_LR": 0.01})]),
                    max_experiments=2, executor=runs)
    assert [e.status for e in done] == ["crash", "keep"] and len(runs.scripts) == 1
    failed = ws.results()[1]
    assert failed["reason"].startswith("proposal") and "matched 0 times" in failed["reason"]
    assert failed["description"].startswith("proposal failed") and failed["commit"] == root
    assert (failed["val_bpb"], failed["memory_gb"]) == (0.0, 0.0)
    assert ws.head() == done[1].commit and branch_commits(ws) == {root, done[1].commit}


def test_proposals_that_keep_failing_make_the_loop_wait_longer_each_time(baseline_ws, tmp_path):
    """An API that is down all night must not write a crash row every few seconds: after two
    failures in a row `run` waits, doubling the wait; a success resets it; stop ends a wait."""
    ws = clone(baseline_ws, tmp_path)
    down = "the server is down"

    def fail(state):
        raise ProposalError(down)

    agent = ScriptedAgent([fail] * 4 + [("lower LR", {"MATRIX_LR": 0.01})] + [fail] * 3)
    events = []
    t0 = time.monotonic()
    done = loop.run(ws, agent, max_experiments=8, executor=FakeRuns(1.0),
                    on_event=lambda e: events.append(e) if e.kind == "waiting" else None)
    waits = [(e.data["failures"], e.data["seconds"]) for e in events]
    assert [e.status for e in done] == ["crash"] * 4 + ["keep"] + ["crash"] * 3  # no wait after the last
    assert waits == [(2, 0.1), (3, 0.2), (4, 0.4), (2, 0.1)]  # quick mode: 0.1 s, not 10 s
    assert time.monotonic() - t0 >= 0.8 and down in events[0].data["reason"]
    assert loop.proposal_retry_delay(1) == 0 and loop.proposal_retry_delay(30) == loop.PROPOSAL_RETRY_MAX

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    agent = ScriptedAgent([fail] * 20)
    t0 = time.monotonic()
    done = loop.run(ws, agent, stop=stop, executor=FakeRuns())
    assert time.monotonic() - t0 < 5 and 2 <= len(done) < 20  # the stop cut a wait short


def test_an_llm_that_only_sends_garbage_gives_proposal_crash_rows(baseline_ws, tmp_path, monkeypatch, llm):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ws = clone(baseline_ws, tmp_path)
    root = ws.head()
    llm.respond = lambda n: llm.completion("Sure! I would raise the learning rate a bit.", 10, 5)
    agent = OpenAIAgent(model="fake", base_url=llm.url, max_retries=0, timeout=10)
    done = loop.run(ws, agent, max_experiments=2, executor=FakeRuns())  # it must never train
    assert [e.status for e in done] == ["crash", "crash"] and len(llm.requests) == 6
    for row in ws.results()[1:]:
        assert row["reason"].startswith("proposal: The model fake gave no usable edit in 3 attempts")
        assert row["commit"] == root and row["agent"] == "openai"
    assert ws.head() == root and git(ws, "status", "--porcelain") == ""


# ---------------------------------------------------------------- the OpenAI agent, for real

def test_openai_agent_through_the_loop_and_the_key_never_leaks(baseline_ws, tmp_path, monkeypatch, caplog,
                                                                llm):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ws = clone(baseline_ws, tmp_path)
    lr = line_of(ws.train_py, "MATRIX_LR =")
    # a constant edit that also prints the run's environment: a leaked key would show in run.log
    good = reply("MATRIX_LR 0.02 -> 0.03", lr,
                 "MATRIX_LR = 0.03\nimport os\nprint('environment:', sorted(os.environ.items()))")
    llm.reply(good, 1234, 56)
    llm.error(500, f"internal error for key {KEY}")
    events = []
    agent = OpenAIAgent(model="fake", base_url=llm.url, max_retries=0, timeout=10)
    done = loop.run(ws, agent, max_experiments=2, on_event=events.append)

    assert len(llm.requests) == 2  # the second prompt shows the model its first result
    assert "MATRIX_LR 0.02 -> 0.03" in llm.requests[1]["body"]["messages"][1]["content"]
    ran, failed = [r for r in ws.results()[1:] if r["status"] != "recheck"]  # the best may run again
    assert ran["status"] in ("keep", "discard") and ran["description"] == "MATRIX_LR 0.02 -> 0.03"
    assert (ran["prompt_tokens"], ran["completion_tokens"], ran["agent"]) == (1234, 56, "openai")
    assert done[0].result.ok and ran["val_bpb"] == pytest.approx(done[0].val_bpb, abs=1e-6)
    assert failed["status"] == "crash" and failed["reason"].startswith("proposal")
    assert "<redacted>" in failed["reason"]
    run_log = ws.log_path(1).read_text()
    assert "environment:" in run_log and "OPENAI_API_KEY" not in run_log

    seen = {str(p): p.read_text(errors="replace") for p in ws.path.rglob("*")
            if p.is_file() and ".git" not in p.parts}
    assert str(ws.results_path) in seen and any("/logs/" in p for p in seen)
    seen["git log -p --all"] = git(ws, "log", "-p", "--all")
    seen["events"] = repr(events)
    seen["experiments"] = repr(done) + "".join(e.reason for e in done)
    seen["log records"] = caplog.text
    seen["agent"] = repr(agent)
    for where, text in seen.items():
        assert KEY not in text, f"the API key leaked into {where}"


def test_the_key_is_not_in_the_error_when_the_server_quotes_it(monkeypatch, llm):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    llm.error(401, f"Incorrect API key provided: {KEY}")
    llm.error(503, f"overloaded, key {KEY}")
    agent = OpenAIAgent(model="fake", base_url=llm.url, max_retries=0, timeout=10)
    for _ in range(2):
        with pytest.raises(ProposalError) as err:
            agent.propose(State("program", "DEPTH = 1\n"))
        shown = "".join(traceback.format_exception(err.value))
        assert KEY not in shown and KEY not in str(err.value)


# ---------------------------------------------------------------- noise-aware mode

def test_noise_aware_mode_measures_sigma_and_confirms_wins(tmp_path, cache):
    """Without fair comparisons (recheck=False): an apparent win re-runs the candidate."""
    ws = new_workspace(tmp_path, cache)
    root = ws.head()
    runs = FakeRuns(1.00, 1.02, 0.99,  # the baseline three times: mean 1.003333, sigma 0.015275
                    0.98,              # beats the best by 0.023 < 2 sigma: discarded, no re-run
                    0.90, 0.92,        # a clear win: re-run once, kept with the mean 0.91
                    0.80, None,        # an apparent win whose re-run crashes: a crash
                    0.70, "stop")      # the user stops during the re-run: nothing recorded
    agent = ScriptedAgent([(f"change {i}", {"MATRIX_LR": 0.03 + i / 100}) for i in range(4)])
    kw = dict(noise_runs=3, z=2.0, executor=runs, recheck=False)

    baseline = loop.run(ws, agent, max_experiments=3, **kw)
    rows = ws.results()
    assert [(r["description"], r["status"], r["commit"]) for r in rows] == [
        ("baseline noise run 1/3", "discard", root), ("baseline noise run 2/3", "discard", root),
        ("baseline noise run 3/3", "keep", root)]
    assert [r["val_bpb"] for r in rows] == [1.0, 1.02, pytest.approx(1.003333, abs=1e-6)]
    assert baseline[2].val_bpb == pytest.approx(statistics.mean([1.00, 1.02, 0.99]))
    sigma = statistics.stdev([1.00, 1.02, 0.99])  # the spread of the three runs themselves
    assert loop.noise_sigma(rows) == pytest.approx(sigma, abs=1e-5)
    assert agent.used == 0 and ws.head() == root

    small = loop.step(ws, agent, **kw)
    assert small.status == "discard" and len(runs.scripts) == 4 and ws.head() == root

    big = loop.step(ws, agent, **kw)
    assert big.status == "keep" and big.val_bpb == pytest.approx(0.91) and len(runs.scripts) == 6
    assert runs.scripts[4] == runs.scripts[5] and ws.head() == big.commit
    assert ws.results()[-1]["val_bpb"] == pytest.approx(0.91)

    flaky = loop.step(ws, agent, **kw)
    assert (flaky.status, flaky.val_bpb, flaky.reason) == ("crash", None, "exception: RuntimeError: a fake crash")
    assert ws.head() == big.commit

    stopped = loop.step(ws, agent, stop=threading.Event(), **kw)
    assert stopped.status == "stopped" and len(ws.results()) == 6 and runs.values == []
    assert ws.head() == big.commit and git(ws, "status", "--porcelain") == ""


# ---------------------------------------------------------------- stop and resume

def test_stop_during_training_ends_the_loop_cleanly_and_run_resumes(tmp_path, cache, prepared):
    ws = new_workspace(tmp_path, cache, budget=60)  # long: only the stop can end it in time
    agent = ScriptedAgent([("MATRIX_LR 0.02 -> 0.03", {"MATRIX_LR": 0.03}),
                           ("MATRIX_LR 0.02 -> 0.01", {"MATRIX_LR": 0.01})])
    loop.step(ws, agent, executor=FakeRuns(5.0))  # a pretend baseline, to save a real run
    root, text = ws.head(), ws.train_py
    stop, stopped_at, kinds = threading.Event(), [], []

    def on_event(event):
        kinds.append(event.kind)
        if event.kind == "progress" and not stop.is_set():
            stopped_at.append(time.time())
            stop.set()

    assert loop.run(ws, agent, max_experiments=2, stop=stop, on_event=on_event) == []
    assert time.time() - stopped_at[0] < 10, "the loop took too long to stop"
    assert "stopped" in kinds and "decision" not in kinds
    assert len(ws.results()) == 1 and ws.head() == root and ws.train_py == text
    assert git(ws, "status", "--porcelain") == "" and branch_commits(ws) == {root}
    assert pids_in(ws.path / "runs" / "0001") == []  # the training process is gone

    resumed = loop.run(Workspace.open(ws.path), agent, max_experiments=1, executor=FakeRuns(4.0))
    assert [(e.index, e.status, e.description) for e in resumed] == [(1, "keep", "MATRIX_LR 0.02 -> 0.01")]
    assert ws.head() == resumed[0].commit and len(ws.results()) == 2


# ---------------------------------------------------------------- kills and locks

@posix_only
def test_sigkill_mid_experiment_then_open_and_run_resume(baseline_ws, tmp_path):
    ws = clone(baseline_ws, tmp_path)
    root = ws.head()
    run_dir = ws.path / "runs" / "0001"
    out = open(tmp_path / "child.out", "w")
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loop_child.py"), str(ws.path)],
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "progress 1" not in (tmp_path / "child.out").read_text():  # training has begun
            assert child.poll() is None and time.time() < deadline, (tmp_path / "child.out").read_text()
            time.sleep(0.1)
        assert git(ws, "rev-list", "--count", "HEAD") == "2"  # committed, training, no row yet
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        out.close()
    orphans = pids_in(run_dir)  # the run dies with its runner (the sandbox, the launcher's
    deadline = time.time() + 15  # PR_SET_PDEATHSIG); don't let it linger regardless
    while orphans and time.time() < deadline:
        time.sleep(0.2)
        orphans = pids_in(run_dir)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)

    with pytest.warns(UserWarning, match="workspace repaired"):
        ws = Workspace.open(ws.path)
    assert any("no keep row" in r for r in ws.repairs) and ws.head() == root
    done = loop.run(ws, OfflineAgent(), max_experiments=1, executor=FakeRuns(1.0))
    assert [(e.index, e.status) for e in done] == [(1, "keep")]
    rows = ws.results()
    assert len(rows) == 2 and all(ROW_RE.fullmatch("\t".join(line)) for line in rows_text(ws)[1:])
    assert ws.head() == ws.best()[0] == done[0].commit
    assert branch_commits(ws) == kept_commits(ws)  # no commit on the branch without a keep row
    assert git(ws, "status", "--porcelain") == ""


def test_a_kill_mid_commit_is_repaired_by_open_and_run_goes_on(baseline_ws, tmp_path):
    ws = clone(baseline_ws, tmp_path)
    root, text = ws.head(), ws.train_py
    (ws.path / "train.py").write_text(text.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.05"))
    (ws.path / ".git" / "index.lock").write_text("")  # git was killed while committing
    with pytest.warns(UserWarning, match="workspace repaired"):
        ws = Workspace.open(ws.path)
    assert len(ws.repairs) == 2 and ws.head() == root and ws.train_py == text
    assert not (ws.path / ".git" / "index.lock").exists()
    done = loop.run(ws, OfflineAgent(), max_experiments=1, executor=FakeRuns(9.0))
    assert [(e.index, e.status) for e in done] == [(1, "discard")]
    assert ws.head() == root and branch_commits(ws) == kept_commits(ws) == {root}
    assert git(ws, "status", "--porcelain") == ""


@posix_only
def test_a_second_loop_on_a_locked_workspace_is_refused(tmp_path, cache):
    ws = new_workspace(tmp_path, cache)
    with ws.lock():  # a loop in this very process (e.g. a notebook cell still running)
        with pytest.raises(WorkspaceLocked, match="in use by another loop.*this very process"):
            loop.run(Workspace.open(ws.path), OfflineAgent(), executor=FakeRuns())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from autoresearch_lib.workspace import Workspace\n"
         "with Workspace(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)",
         str(ws.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceLocked, match=rf"held by process {holder.pid}\. .*stop that loop") as err:
            loop.step(Workspace.open(ws.path), OfflineAgent(), executor=FakeRuns())
        assert err.value.pid == holder.pid and ws.results() == []
    finally:
        holder.kill()
        holder.wait()
    assert loop.step(ws, OfflineAgent(), executor=FakeRuns(1.0)).status == "keep"  # free again


# ---------------------------------------------------------------- the command line

def cli(*args, cwd, env=None, timeout=300):
    # PYTHONPATH: the checkout under test, not whichever copy the environment has installed
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "autoresearch_lib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_loop_prints_one_line_per_experiment_and_report_draws(tmp_path, prepared):
    done = cli("loop", "--workspace", "ws", "--preset", "quick", "--budget", "1",
               "--max-experiments", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("created ws on branch autoresearch/")
    assert re.fullmatch(r"#000 [0-9a-f]{7} keep    val_bpb \d\.\d{6} \(first run\)  baseline", lines[1])
    assert re.fullmatch(r"#001 [0-9a-f]{7} (keep|discard|crash) +val_bpb .* \(best \d\.\d{6}\)  .+", lines[2])
    rechecked = re.fullmatch(r"#002 [0-9a-f]{7} recheck val_bpb \d\.\d{6} \(was \d\.\d{6}\)  recheck .+  \[.+\]",
                             lines[3]) is not None  # if the machine's speed changed meanwhile
    lines = lines[:3] + lines[3 + rechecked:]
    assert re.fullmatch(rf"fair comparisons: \d+ extra run\(s\) \({int(rechecked)} re-check\(s\) of the best\) "
                        r"for 2 experiment\(s\) .+", lines[3])
    assert lines[4].startswith("results: ") and lines[5].startswith("chart: ") and len(lines) == 6
    png = tmp_path / "ws" / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = cli("report", "--workspace", "ws", "--out", "report.png", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith("2 experiments") and "report.png" in report.stdout
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_openai_without_a_key_fails_clearly_before_any_experiment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "autoresearch_lib", "loop", "--workspace", "ws",
                           "--preset", "quick", "--agent", "openai"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: No API key") and "OPENAI_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ws").exists()  # nothing made: fix the command and run it again


# ---------------------------------------------------------------- upstream's analysis

def test_upstream_analysis_runs_unchanged_on_our_results(tmp_path, cache, monkeypatch):
    pd = pytest.importorskip("pandas")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = new_workspace(tmp_path, cache)
    edits = [('say "hi", then 50% more', {"MATRIX_LR": 0.03}), ("tabs\tand # hashes", {"MATRIX_LR": 0.04}),
             ("a crash", {"DEPTH": 3}), ("'quoted' #4", {"DEPTH": 4}), ("last", {"DEPTH": 1})]
    loop.run(ws, ScriptedAgent(edits), max_experiments=6, executor=FakeRuns(1.0, 0.95, 0.97, None, 0.9, 0.99))

    monkeypatch.chdir(ws.path)
    df = pd.read_csv("results.tsv", sep="\t")
    df["val_bpb"] = df["val_bpb"].astype(float)
    df["status"] = df["status"].str.strip().str.upper()
    kept = df[df["status"] == "KEEP"]
    assert len(df) == 6 and list(df.columns[:5]) == UPSTREAM_COLUMNS
    assert list(df["status"]) == ["KEEP", "KEEP", "DISCARD", "CRASH", "KEEP", "DISCARD"]
    assert list(kept["val_bpb"]) == [1.0, 0.95, 0.9] and df["val_bpb"].iloc[3] == 0.0
    assert df["description"].iloc[1] == "say 'hi', then 50% more"
    assert df["commit"].str.fullmatch(r"[0-9a-f]{7}").all()

    valid = df[df["status"] != "CRASH"].reset_index(drop=True)
    running_min = valid.loc[valid["status"] == "KEEP", "val_bpb"].cummin()
    fig, ax = plt.subplots()
    ax.step(running_min.index, running_min, where="post")
    fig.savefig("progress.png")
    plt.close(fig)
    assert list(running_min) == [1.0, 0.95, 0.9] and Path("progress.png").stat().st_size > 0
