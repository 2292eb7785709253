"""The loop on any task: a task workspace (task/ copy, task.json, results.tsv's second column
named after the metric) runs through the real loop with every agent, keeps and resets commits of
the editable files, follows the metric's direction, resumes, and refuses a changed judge."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoresearch_lib import loop, plots
from autoresearch_lib.agents import OfflineAgent, OpenAIAgent, ScriptedAgent
from autoresearch_lib.agents.scripted import parse_edits
from autoresearch_lib.runner import TrainResult
from autoresearch_lib.workspace import Workspace, WorkspaceError

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-task-loop-0000"


def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True,
                          text=True).stdout.strip()


def kept_commits(ws) -> list[str]:
    return git(ws, "rev-list", "--abbrev=7", "--abbrev-commit", "HEAD").split()


def write_task(folder: Path, solve: str = "X = 1.0\n", direction: str = "minimize",
               metric: str = "score", score: str = "print('score: 1.0')") -> Path:
    """A small task folder; score.py prints `score` (its code)."""
    folder.mkdir(parents=True)
    (folder / "task.toml").write_text(
        f'[task]\nname = "demo"\neditable = ["solve.py"]\ncommand = "python score.py"\n'
        f'metric = "{metric}"\ndirection = "{direction}"\ntimeout = 20\n')
    (folder / "program.md").write_text("# demo\nMake the score better.\n")
    (folder / "solve.py").write_text(solve)
    (folder / "score.py").write_text(score + "\n")
    return folder


class FakeTaskRuns:
    """An executor with run_task's signature that 'runs' instantly: each call takes the next
    value, a float (the metric) or None (a crash). The files it was given are kept."""

    def __init__(self, *values):
        self.values, self.files = list(values), []

    def __call__(self, task, files, run_dir, on_progress=None, on_line=None, stop=None,
                 timeout=None, log_path=None):
        value = self.values.pop(0)
        self.files.append(dict(files))
        Path(log_path).write_text(f"fake run\n{task.metric}: {value}\n")
        result = TrainResult(run_dir=str(run_dir), log_path=str(log_path))
        if value is None:
            result.reason = "exit code 1: a fake crash"
        else:
            result.status, result.metric = "ok", value
        return result


# --- fit-curve through the real loop ----------------------------------------------------------

def test_fit_curve_with_the_offline_agent_improves_and_keeps_commits(tmp_path):
    ws = Workspace.create(tmp_path / "ws", task="fit-curve")
    assert ws.results_path.read_text().split("\t")[:5] == [
        "commit", "mse", "memory_gb", "status", "description"]
    assert (ws.metric, ws.direction, ws.editable) == ("mse", "minimize", ("solve.py",))
    root = ws.head()
    done = loop.run(ws, OfflineAgent(seed=0), max_experiments=6)
    rows = ws.results()
    assert len(rows) == 6 and rows[0]["description"] == "baseline"
    assert rows[0]["mse"] == pytest.approx(0.388976, abs=1e-6)
    kept = [r for r in rows if r["status"] == "keep"]
    assert len(kept) >= 3 and ws.best()[1] < 0.8 * rows[0]["mse"]  # it improved: 0.39 -> 0.27
    assert [e.val_bpb for e in done] == [r["mse"] or None for r in rows]
    # the branch holds the baseline and each kept commit, each touching solve.py only
    assert kept_commits(ws) == [r["commit"] for r in reversed(kept)]
    for r in kept[1:]:
        assert git(ws, "show", "--name-only", "--format=", r["commit"]) == "solve.py"
    assert git(ws, "status", "--porcelain") == "" and ws.head() == ws.best()[0]
    assert git(ws, "diff", root, "HEAD", "--", "task") == ""  # the judge's copy is never edited
    text = (ws.path / "task" / "solve.py").read_text()
    assert ws.files()["solve.py"] != text  # the root's solve.py moved on; task/'s is the start


def test_the_openai_agent_edits_the_tasks_file_and_sees_its_metric(tmp_path, monkeypatch, llm):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ws = Workspace.create(tmp_path / "ws", task="fit-curve")
    llm.reply("Faster learning\nsolve.py\n<<<<<<< SEARCH\nLEARNING_RATE = 0.01\n=======\n"
              "LEARNING_RATE = 0.04\n>>>>>>> REPLACE\n")
    llm.reply("Cheat\nscore.py\n<<<<<<< SEARCH\nLIMIT = 50\n=======\nLIMIT = 5\n>>>>>>> REPLACE\n")
    agent = OpenAIAgent(model="fake", base_url=llm.url, max_retries=0, max_attempts=1, timeout=10)
    loop.run(ws, agent, max_experiments=3)
    base, faster, cheat = ws.results()
    assert faster["status"] == "keep" and faster["mse"] < base["mse"]
    assert "LEARNING_RATE = 0.04" in ws.files()["solve.py"]
    assert cheat["status"] == "crash" and cheat["reason"].startswith("proposal: ")
    assert "targets 'score.py', but only solve.py may be edited" in cheat["reason"]
    system, user = (m["content"] for m in llm.requests[0]["body"]["messages"])
    assert "fit-curve" in system and "solve.py" in system and "mse: lower is better" in system
    assert "# solve.py (the current best version)" in user and "DEGREE = 16" in user
    assert "commit\tmse\tmemory_gb\tstatus\tdescription" in user
    assert "The best mse so far is 0.388976 (lower is better)" in user
    assert "train.py" not in system + user


def test_scripted_edits_from_json_run_on_a_task(tmp_path):
    ws = Workspace.create(tmp_path / "ws", task="fit-curve")
    edits = parse_edits('[["more steps", {"STEPS": 1200}], '
                        '"ridge\\n<<<<<<< SEARCH\\nRIDGE = 0.3\\n=======\\nRIDGE = 0.05\\n>>>>>>> REPLACE"]')
    loop.run(ws, ScriptedAgent(edits), max_experiments=3)
    rows = ws.results()
    assert [r["description"] for r in rows] == ["baseline", "more steps", "ridge"]
    assert [r["status"] for r in rows] == ["keep", "keep", "keep"]
    assert rows[2]["mse"] < rows[1]["mse"] < rows[0]["mse"]
    text = ws.files()["solve.py"]
    assert "STEPS = 1200" in text and "RIDGE = 0.05" in text
    with pytest.raises(ValueError, match="edit 1 is 3"):
        parse_edits("[3]")


def test_a_wrong_answer_on_speed_up_is_a_crash_row(tmp_path):
    ws = Workspace.create(tmp_path / "ws", task="speed-up")
    wrong = ("off by one\n<<<<<<< SEARCH\n            return primes[n - 1]\n=======\n"
             "            return primes[n]\n>>>>>>> REPLACE")
    loop.run(ws, ScriptedAgent([wrong]), max_experiments=2)
    base, crash = ws.results()
    assert list(base)[1] == "median_seconds" and base["status"] == "keep"
    assert crash["status"] == "crash" and crash["median_seconds"] == 0.0
    assert crash["reason"].startswith("exit code 1: score.py: wrong answer")
    assert ws.head() == base["commit"] and "primes[n - 1]" in ws.files()["solve.py"]


def test_a_file_without_constants_gets_a_clear_message_from_the_offline_agent(tmp_path):
    folder = write_task(tmp_path / "t", solve="def answer():\n    return 42\n")
    ws = Workspace.create(tmp_path / "ws", task=folder)
    loop.run(ws, OfflineAgent(), max_experiments=2)
    base, failed = ws.results()
    assert base["status"] == "keep" and base["score"] == 1.0
    assert failed["status"] == "crash"
    assert failed["reason"].startswith("proposal: The offline agent has nothing to change: "
                                       "solve.py has no UPPERCASE numeric constants")
    assert "LEARNING_RATE = 0.01" in failed["reason"]


# --- decisions follow the direction ---------------------------------------------------------

def test_a_maximized_metric_keeps_higher_values_and_its_chart_climbs(tmp_path):
    folder = write_task(tmp_path / "t", direction="maximize", metric="accuracy")
    ws = Workspace.create(tmp_path / "ws", task=folder)
    runs = FakeTaskRuns(0.5, 0.7, 0.6, None, 0.9)
    agent = ScriptedAgent([(f"X={x}", {"X": x}) for x in (2.0, 3.0, 4.0, 5.0)])
    done = loop.run(ws, agent, max_experiments=5, executor=runs)
    assert [e.status for e in done] == ["keep", "keep", "discard", "crash", "keep"]
    assert ws.best() == (done[4].commit, 0.9) and "X = 5.0" in ws.files()["solve.py"]
    assert kept_commits(ws) == [done[4].commit, done[1].commit, done[0].commit]
    s = plots.summary(ws.results(), "accuracy", "maximize")
    assert (s["baseline"], s["best"], s["improvement"]) == (0.5, 0.9, pytest.approx(0.4))
    assert plots.axis_label("accuracy", "maximize") == "accuracy (higher is better)"
    png = plots.save_progress_chart(ws.results(), tmp_path / "p.png", "accuracy", "maximize")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_noise_aware_keeping_follows_the_direction(tmp_path):
    folder = write_task(tmp_path / "t", direction="maximize", metric="accuracy")
    ws = Workspace.create(tmp_path / "ws", task=folder)
    # baseline noise runs 0.50, 0.52 (sigma 0.014, mean 0.51); z = 2: a win needs > 0.538
    runs = FakeTaskRuns(0.50, 0.52, 0.53, 0.60, 0.58)
    agent = ScriptedAgent([("X=2", {"X": 2.0}), ("X=3", {"X": 3.0})])
    done = loop.run(ws, agent, max_experiments=4, executor=runs, noise_runs=2,
                    recheck=False)  # the noise margin's own rule; fairness has tests of its own
    assert [e.status for e in done] == ["discard", "keep", "discard", "keep"]
    assert done[3].val_bpb == pytest.approx(0.59)  # the win and its confirmation, averaged
    assert loop.noise_sigma(ws.results(), "accuracy") == pytest.approx(0.01414, abs=1e-4)


def test_a_metric_named_like_another_column_is_refused_at_creation(tmp_path):
    folder = write_task(tmp_path / "t", metric="seconds")
    with pytest.raises(WorkspaceError, match="'seconds' is already another of its columns.*"
                                             "median_seconds"):
        Workspace.create(tmp_path / "ws", task=folder)
    assert not (tmp_path / "ws").exists()


# --- sessions ---------------------------------------------------------------------------------

def test_resume_after_reopening_and_a_changed_judge_is_refused(tmp_path):
    folder = write_task(tmp_path / "t")
    ws = Workspace.create(tmp_path / "ws", task=folder)
    agent = ScriptedAgent([(f"X={x}", {"X": x}) for x in (2.0, 3.0, 4.0)])
    loop.run(ws, agent, max_experiments=2, executor=FakeTaskRuns(1.0, 0.5))
    again = Workspace.open(tmp_path / "ws")
    assert again.next_index() == 2 and again.best()[1] == 0.5
    loop.run(again, agent, max_experiments=1, executor=FakeTaskRuns(0.7))
    assert [r["status"] for r in again.results()] == ["keep", "keep", "discard"]
    assert "X = 2.0" in again.files()["solve.py"]

    (ws.path / "task" / "score.py").write_text("print('score: 0.0')\n")  # between sessions
    with pytest.raises(WorkspaceError, match=r"fixed files.*score\.py.*not comparable"):
        Workspace.open(tmp_path / "ws")
    with pytest.raises(loop.LoopError, match="not comparable"):  # a loop that is already open
        loop.run(again, agent, max_experiments=1, executor=FakeTaskRuns(0.1))
    git(ws, "checkout", "--", "task")  # as the message says: put the original back
    assert Workspace.open(tmp_path / "ws").task.name == "demo"


# --- the command line -------------------------------------------------------------------------

def cli(*args, cwd):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "autoresearch_lib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_loop_on_a_task_makes_results_and_a_chart(tmp_path):
    done = cli("loop", "--workspace", "ws", "--task", "fit-curve", "--max-experiments", "2",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("created ws on branch autoresearch/") and "minimize mse" in lines[0]
    assert lines[1].endswith("keep    mse 0.388976 (first run)  baseline")
    assert " mse " in lines[2] and "(best 0.388976)" in lines[2]
    assert (tmp_path / "ws" / "results.tsv").read_text().startswith("commit\tmse\t")
    assert (tmp_path / "ws" / "progress.png").read_bytes()[:4] == b"\x89PNG"

    resumed = cli("loop", "--workspace", "ws", "--max-experiments", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resuming ws (2 experiments so far")
    report = cli("report", "--workspace", "ws", cwd=tmp_path)
    assert report.stdout.startswith("3 experiments") and "mse (lower is better)" in report.stdout

    listed = cli("tasks", cwd=tmp_path)
    assert listed.returncode == 0 and "fit-curve" in listed.stdout and "speed-up" in listed.stdout
    wrong = cli("loop", "--workspace", "ws", "--task", "speed-up", cwd=tmp_path)
    assert wrong.returncode == 2 and "not speed-up" in wrong.stderr


def test_the_dashboard_runs_a_task_workspace(tmp_path):
    """Step on a fit-curve workspace: the dashboard shows the task and its metric, the timeout
    instead of a budget, and records the baseline like a GPT experiment."""
    from autoresearch_lib.widgets import Dashboard

    ws = Workspace.create(tmp_path / "ws", task="fit-curve")
    d = Dashboard(ws)
    assert "task fit-curve" in d.widget.children[0].value and d.budget.disabled
    assert d.budget.description == "timeout (s)"
    assert d.step() and d.wait(120)
    assert d.error is None, d.error
    [row] = ws.results()
    assert row["description"] == "baseline" and row["status"] == "keep" and row["mse"] > 0
