"""tasks: task.toml is checked with clear messages; a run is sandboxed, timed from outside,
its metric read honestly; fixed files can't change; the shipped tasks work and can improve."""

import os
import pickle
import re
import sys
import threading
import uuid
from pathlib import Path

import pytest

from autoresearch_lib import runner, sandbox, tasks
from autoresearch_lib.agents.base import State
from autoresearch_lib.agents.offline import OfflineAgent, read_constants
from autoresearch_lib.tasks import Task, TaskError, load_task, run_task

TOML = {"name": '"demo"', "editable": '["solve.py"]', "command": '"python score.py"',
        "metric": '"score"', "direction": '"minimize"', "timeout": "20"}
SANDBOXED = pytest.mark.skipif(sandbox.mode() != "bwrap", reason="needs bubblewrap")


def write_task(folder: Path, score: str = "print('score: 1.5')", **keys) -> Path:
    """A task folder: task.toml (TOML's values, overridden by `keys`; None drops a key),
    program.md, solve.py and score.py (`score` is its code)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {**TOML, **keys}
    lines = [f"{k} = {v}" for k, v in values.items() if v is not None]
    (folder / "task.toml").write_text("[task]\n" + "\n".join(lines) + "\n")
    (folder / "program.md").write_text("# demo\nMake the score small.\n")
    (folder / "solve.py").write_text("X = 1.0\n")
    (folder / "score.py").write_text(score + "\n")
    return folder


def run(task: Task, tmp_path: Path, files: dict | None = None, **kw):
    return run_task(task, files or task.files(), tmp_path / "run", **kw)


# --- task.toml: every field and its bad values ------------------------------------------------

BAD_FIELDS = [
    # (key, its TOML value or None to leave it out, words the message must hold)
    *[(key, None, [f"no `{key}`", "Add a line"]) for key in TOML],
    ("name", '""', ["`name`", "letters, digits"]),
    ("name", '"my task"', ["`name`", "letters, digits"]),
    ("name", "3", ["`name`", "e.g. name ="]),
    ("editable", '"solve.py"', ["`editable`", "list of file names"]),
    ("editable", "[]", ["`editable`", "is empty"]),
    ("editable", "[1]", ["`editable`", "list of file names"]),
    ("editable", '["../solve.py"]', ["`editable`", "outside the task folder"]),
    ("editable", '["/etc/passwd"]', ["`editable`", "outside the task folder"]),
    ("editable", '["missing.py"]', ["`editable`", "'missing.py'", "does not exist"]),
    ("editable", '["solve.py", "solve.py"]', ["`editable`", "twice"]),
    ("editable", '["task.toml"]', ["`editable`", "can't be editable"]),
    ("editable", '["program.md"]', ["`editable`", "can't be editable"]),
    ("command", '""', ["`command`", "python score.py"]),
    ("command", '"   "', ["`command`", "python score.py"]),
    ("command", "5", ["`command`", "python score.py"]),
    ("command", "\"python 'score.py\"", ["`command`", "quotes"]),
    ("metric", '""', ["`metric`", "simple name"]),
    ("metric", '"my score"', ["`metric`", "simple name"]),
    ("metric", '"1st"', ["`metric`", "simple name"]),
    ("metric", '"score:"', ["`metric`", "simple name"]),
    ("metric", "1", ["`metric`", "simple name"]),
    ("direction", '"minimise"', ["`direction`", '"minimize"', '"maximize"']),
    ("direction", '"lower"', ["`direction`", '"minimize"']),
    ("direction", "-1", ["`direction`", '"minimize"']),
    ("timeout", "0", ["`timeout`", "above 0"]),
    ("timeout", "-5", ["`timeout`", "above 0"]),
    ("timeout", '"60"', ["`timeout`", "above 0"]),
    ("timeout", "true", ["`timeout`", "above 0"]),
    ("timeout", "inf", ["`timeout`", "above 0"]),
    ("timeout", "nan", ["`timeout`", "above 0"]),
]


@pytest.mark.parametrize("key, value, words", BAD_FIELDS,
                         ids=[f"{k}={v}" for k, v, _ in BAD_FIELDS])
def test_a_bad_field_is_named_with_what_to_do(tmp_path, key, value, words):
    folder = write_task(tmp_path / "t", **{key: value})
    with pytest.raises(TaskError) as err:
        Task.load(folder)
    message = str(err.value)
    assert str(folder / "task.toml") in message  # the file
    for word in words:  # the key, what is wrong, what to write instead
        assert word in message, message


@pytest.mark.parametrize("text, words", [
    ("[task]\nname = \"demo\nx", ["not valid TOML", "Fix the syntax"]),
    ("name = \"demo\"\n", ["no [task] table"]),
    ("[task]\n" + "\n".join(f"{k} = {v}" for k, v in TOML.items()) + "\n[extra]\na = 1\n",
     ["unknown table(s) extra"]),
    ("[task]\n" + "\n".join(f"{k} = {v}" for k, v in TOML.items()) + "\ntimout = 5\n",
     ["unknown key(s) timout", "check the spelling"]),
])
def test_a_bad_file_is_named_with_what_to_do(tmp_path, text, words):
    folder = write_task(tmp_path / "t")
    (folder / "task.toml").write_text(text)
    with pytest.raises(TaskError) as err:
        Task.load(folder)
    assert str(folder / "task.toml") in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_folder_without_its_parts_is_refused(tmp_path):
    with pytest.raises(TaskError, match="no such task folder"):
        Task.load(tmp_path / "nowhere")
    folder = write_task(tmp_path / "t")
    (folder / "program.md").unlink()
    with pytest.raises(TaskError, match=r"program\.md: missing.*goal, the rules"):
        Task.load(folder)
    (folder / "task.toml").unlink()
    with pytest.raises(TaskError, match=r"task\.toml: missing"):
        Task.load(folder)


def test_links_are_refused_in_a_task_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the run")
    folder = write_task(tmp_path / "t")
    (folder / "data.txt").symlink_to(secret)
    with pytest.raises(TaskError, match="a link or special file"):
        Task.load(folder)
    (folder / "data.txt").unlink()
    (folder / "solve.py").unlink()
    (folder / "solve.py").symlink_to(secret)
    with pytest.raises(TaskError, match="`editable` has 'solve.py', which is a link"):
        Task.load(folder)


# --- a loaded task ------------------------------------------------------------------------------

def test_a_task_loads_with_its_fixed_files_fingerprinted(tmp_path):
    folder = write_task(tmp_path / "t", direction='"maximize"', timeout="2.5")
    (folder / "data").mkdir()
    (folder / "data" / "points.csv").write_text("1,2\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "score.cpython.pyc").write_bytes(b"cache")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    task = Task.load(folder)
    assert (task.name, task.editable, task.metric, task.direction, task.timeout) == (
        "demo", ("solve.py",), "score", "maximize", 2.5)
    # the editable file, program.md (the human's), caches and hidden files are not fixed
    assert sorted(task.fixed) == ["data/points.csv", "score.py", "task.toml"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", sha) for sha in task.fixed.values())
    assert task.files() == {"solve.py": "X = 1.0\n"}
    assert task.program.startswith("# demo")
    assert pickle.loads(pickle.dumps(task)) == task  # a Ray task can carry it
    # a fingerprint recorded earlier (say by a workspace) must still hold
    assert Task.load(folder, expect=task.fixed) == task
    (folder / "data" / "points.csv").write_text("1,3\n")
    with pytest.raises(TaskError, match=r"fixed files changed since .*: data/points\.csv"):
        Task.load(folder, expect=task.fixed)
    assert Task.load(folder).digest != task.digest


def test_better_follows_the_direction(tmp_path):
    low = Task.load(write_task(tmp_path / "a"))
    high = Task.load(write_task(tmp_path / "b", direction='"maximize"'))
    assert low.better(1.0, 2.0) and not low.better(2.0, 1.0) and not low.better(1.0, 1.0)
    assert high.better(2.0, 1.0) and not high.better(1.0, 2.0)
    assert low.better(5.0, None) and not low.better(None, 5.0) and not low.better(None, None)
    assert not high.better(float("nan"), 1.0) and not low.better(float("inf"), None)


def test_tasks_are_found_by_name_and_gpt_is_built_in(quick_settings):
    from autoresearch_lib.baseline import default_program, render_train_py

    assert {"fit-curve", "speed-up"} <= set(tasks.examples())
    assert load_task("fit-curve").folder == tasks.examples_dir() / "fit-curve"
    with pytest.raises(TaskError, match="no task 'nope'.*gpt, fit-curve"):
        load_task("nope")
    gpt = load_task("gpt", quick_settings)
    assert (gpt.name, gpt.editable, gpt.metric, gpt.direction, gpt.is_gpt) == (
        "gpt", ("train.py",), "val_bpb", "minimize", True)
    assert gpt.timeout == runner.default_timeout(quick_settings)
    assert gpt.files() == {"train.py": render_train_py("quick")}
    assert gpt.program == default_program()


def test_the_gpt_task_runs_through_run_training_unchanged(tmp_path, quick_settings, monkeypatch):
    calls = []

    def fake(script_text, settings, run_dir, **kw):
        calls.append((script_text, settings, run_dir, kw))
        return runner.TrainResult(status="ok", val_bpb=1.5, metric=1.5)

    monkeypatch.setattr(runner, "run_training", fake)
    gpt, stop = tasks.gpt_task(quick_settings), threading.Event()
    result = run_task(gpt, {"train.py": "print(1)"}, tmp_path / "r", stop=stop, timeout=9,
                      log_path=tmp_path / "l.log")
    assert result.metric == 1.5
    (text, settings, run_dir, kw), = calls
    assert (text, settings, run_dir) == ("print(1)", quick_settings, tmp_path / "r")
    assert kw["stop"] is stop and kw["timeout"] == 9 and kw["log_path"] == tmp_path / "l.log"


def test_a_run_needs_exactly_the_editable_files(tmp_path):
    task = Task.load(write_task(tmp_path / "t"))
    for files in ({}, {"solve.py": "X = 1", "score.py": "print('score: 0')"}, {"solve.py": 3}):
        with pytest.raises(TaskError, match="the text of each editable file"):
            run_task(task, files, tmp_path / "run")


# --- the shipped tasks --------------------------------------------------------------------------

@pytest.mark.parametrize("name, metric", [("fit-curve", "mse"), ("speed-up", "median_seconds")])
def test_each_shipped_task_runs_and_reports_its_metric(tmp_path, name, metric):
    task = load_task(name)
    assert task.metric == metric and task.direction == "minimize" and task.editable == ("solve.py",)
    assert "Rules" in task.program and "solve.py" in task.program
    assert read_constants(task.files()["solve.py"])  # knobs for the offline agent
    result = run(task, tmp_path)
    assert result.ok, result.error_tail
    assert result.metric > 0 and result.val_bpb is None
    assert result.sandbox == sandbox.mode() and result.wall_seconds < task.timeout
    assert re.search(rf"^{metric}: [\d.]+$", Path(result.log_path).read_text(), re.MULTILINE)
    if name == "fit-curve":  # deterministic: the starting constants give this
        assert result.metric == pytest.approx(0.388976, abs=1e-6)


def test_fit_curve_improves_by_the_offline_agents_moves(tmp_path):
    """A mini hill-climb: the offline agent's proposals on solve.py, kept when mse falls."""
    task = load_task("fit-curve")
    agent, best_text = OfflineAgent(seed=0), task.files()["solve.py"]
    start = best = run(task, tmp_path / "base").metric
    rows = []
    for i in range(1, 11):  # 10: its integer moves (DEGREE, STEPS) widen the search
        proposal = agent.propose(State(task.program, best_text, rows, experiment=i))
        result = run(task, tmp_path / str(i), {"solve.py": proposal.train_py})
        status = "keep" if task.better(result.metric, best) else (
            "discard" if result.ok else "crash")
        rows.append({"description": proposal.description, "status": status})
        if status == "keep":
            best, best_text = result.metric, proposal.train_py
    assert sum(row["status"] == "keep" for row in rows) >= 2, rows
    assert best < 0.75 * start, rows  # 0.39 -> below 0.29


def test_speed_up_turns_a_wrong_answer_into_a_crash(tmp_path):
    task = load_task("speed-up")
    wrong = task.files()["solve.py"].replace("return primes[n - 1]", "return primes[n]")
    result = run(task, tmp_path, {"solve.py": wrong})
    assert result.status == "crash" and result.metric is None
    assert result.reason.startswith("exit code 1: score.py: wrong answer: the ")


def test_fit_curve_is_judged_on_the_candidates_answers_not_its_words(tmp_path):
    task = load_task("fit-curve")
    liar = task.files()["solve.py"].replace(
        "def main() -> None:\n",
        "def main() -> None:\n    print('mse: 0.0')\n    print('mse: 0.0', file=sys.stderr)\n")
    result = run(task, tmp_path / "liar", {"solve.py": liar})
    assert result.ok and result.metric == pytest.approx(0.388976, abs=1e-6)
    blown = task.files()["solve.py"].replace("LEARNING_RATE = 0.01", "LEARNING_RATE = 8.0")
    result = run(task, tmp_path / "blown", {"solve.py": blown})
    assert result.status == "crash" and "non-finite error: the fit blew up" in result.reason


# --- reading the metric -------------------------------------------------------------------------

@pytest.mark.parametrize("score, reason", [
    ("print('all done')", 'no metric: the output has no line "score: <number>"'),
    ("print('score: fast')", 'bad metric: "score: fast" is not a number'),
    ("print('score: nan')", "bad metric: score is nan, not a finite number"),
    ("print('score: -inf')", "bad metric: score is -inf, not a finite number"),
    ("print('score: 2'); print('score: 0.5 (best)')",
     'bad metric: "score: 0.5 (best)" is not a number'),
    ("import sys; print('score: 1'); sys.exit(3)", "exit code 3: score: 1"),
    ("raise ValueError('no data')", "exception: ValueError: no data"),
])
def test_a_command_without_a_good_metric_is_a_crash(tmp_path, score, reason):
    task = Task.load(write_task(tmp_path / "t", score=score))
    result = run(task, tmp_path)
    assert (result.status, result.reason, result.metric) == ("crash", reason, None)
    assert reason in result.error_tail and f"FAIL {reason}" in Path(result.log_path).read_text()


def test_the_last_metric_line_counts(tmp_path):
    score = "print('score: 9'); print('progress'); print('score:  0.25')"
    task = Task.load(write_task(tmp_path / "t", direction='"maximize"', score=score))
    lines = []
    result = run(task, tmp_path, on_line=lines.append, log_path=tmp_path / "logs" / "0.log")
    assert result.ok and result.metric == 0.25
    start = lines.index("score: 9")  # after the no-sandbox warning, where there is one
    assert lines[start:start + 3] == ["score: 9", "progress", "score:  0.25"]
    assert lines[-1].split() == ["sandbox:", result.sandbox]  # the runner's own line, last
    assert result.log_path == str(tmp_path / "logs" / "0.log")
    assert "progress" in Path(result.log_path).read_text()


# --- fixed files ----------------------------------------------------------------------------------

def test_a_run_that_edits_a_fixed_file_is_a_crash(tmp_path):
    task = Task.load(write_task(tmp_path / "t", score=(
        "open('score.py', 'a').write('# better now')\nprint('score: 0.001')")))
    result = run(task, tmp_path)
    assert result.status == "crash" and result.metric is None
    assert result.reason == "fixed files changed: score.py (during the run)"
    deleter = Task.load(write_task(tmp_path / "u", score=(
        "import os; os.remove('task.toml'); os.mkfifo('task.toml'); print('score: 0')")))
    result = run(deleter, tmp_path / "u-run")
    assert result.reason == "fixed files changed: task.toml (during the run)"


def test_a_fixed_file_changed_before_the_run_is_refused(tmp_path):
    folder = write_task(tmp_path / "t", score="open('ran', 'w'); print('score: 1')")
    task = Task.load(folder)
    (folder / "score.py").write_text("print('score: 0')\n")  # after loading: not the task loaded
    result = run(task, tmp_path)
    assert result.status == "crash"
    assert result.reason == "fixed files changed: score.py (before the run)"
    assert result.returncode is None and not (tmp_path / "run" / "ran").exists()  # never started
    (folder / "program.md").write_text("# new instructions\n")  # the human's file: no problem
    (folder / "score.py").write_text("open('ran', 'w'); print('score: 1')\n")
    assert run(task, tmp_path).ok


# --- the outside clock and the sandbox ------------------------------------------------------------

def marked_processes(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker in Path(f"/proc/{entry}/cmdline").read_text():
                found.append(entry)
        except OSError:
            pass
    return found


def test_a_hung_command_times_out_and_leaves_no_process(tmp_path):
    marker = f"hung-{uuid.uuid4().hex}"
    task = Task.load(write_task(tmp_path / "t", timeout="1.5", score=(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])\n"
        "print('score: 1', flush=True)\ntime.sleep(300)")))
    result = run(task, tmp_path)
    assert (result.status, result.reason, result.metric) == ("crash", "timeout", None)
    assert 1.5 <= result.wall_seconds < 12
    assert "timeout: the command was still running after 1.5s" in Path(result.log_path).read_text()
    assert marked_processes(marker) == []


@pytest.mark.parametrize("where", ["its /tmp", "its run folder"])
def test_a_command_that_fills_the_disk_is_stopped_at_its_share_and_what_it_wrote_is_deleted(
        tmp_path, monkeypatch, where):
    monkeypatch.setenv(sandbox.DISK_ENV, "0.05")
    task = Task.load(write_task(tmp_path / "t", timeout="60", score=(
        "import os, tempfile, time\n"  # (its /tmp: the sandbox's, or unsandboxed the runner's TMPDIR)
        f"with open(os.path.join(tempfile.gettempdir() if {where == 'its /tmp'} else '', 'fill'), 'wb') as f:\n"
        "    for _ in range(25): f.write(os.urandom(8 << 20)); f.flush()\n"
        "print('score: 0', flush=True)\ntime.sleep(300)")))
    result = run(task, tmp_path)
    assert result.status == "crash" and result.reason.startswith("disk: "), result.reason
    assert "more than the 0.05 GB a run may write here (the AUTORESEARCH_RUN_DISK_GB setting)" in result.reason
    assert result.wall_seconds < 30 and result.metric is None
    assert os.listdir(tmp_path / "run") == ["run.log"]  # what it wrote is gone; its log stays
    assert "It was stopped, and what it wrote was deleted." in Path(result.log_path).read_text()


def test_stop_ends_a_run(tmp_path):
    task = Task.load(write_task(tmp_path / "t", score="import time; time.sleep(300)"))
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    result = run(task, tmp_path, stop=stop)
    assert (result.status, result.reason) == ("stopped", "stopped by the user")
    assert result.wall_seconds < 10


@SANDBOXED
def test_the_command_runs_in_the_sandbox(tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdef")
    task = Task.load(write_task(tmp_path / "t", score=(
        "import os\n"
        f"for path in [{str(outside)!r}, {__file__!r}, {str(tmp_path / 't' / 'task.toml')!r}]:\n"
        "    try:\n        open(path).read(); print('read:', path)\n"
        "    except OSError:\n        print('not found:', path)\n"
        f"try:\n    open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n"
        "except OSError:\n    pass\n"
        "print('secrets:', [k for k in os.environ if 'KEY' in k or 'TOKEN' in k])\n"
        "open('output.txt', 'w').write('mine')\n"  # its own folder is writable
        "print('score: 1')")))
    result = run(task, tmp_path)
    log = Path(result.log_path).read_text()
    assert result.ok and result.sandbox == "bwrap", log
    assert "read:" not in log and log.count("not found:") == 3 and "secrets: []" in log
    # what it wrote outside its folder went to its private /tmp, not to ours
    assert not (tmp_path / "new.txt").exists() and (tmp_path / "run" / "output.txt").exists()


def test_without_a_sandbox_the_run_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, "0")
    task = Task.load(write_task(tmp_path / "t"))
    result = run(task, tmp_path)
    assert result.ok and result.sandbox == "none"
    log = Path(result.log_path).read_text()
    assert "warning: NO SANDBOX: solve.py runs with your rights" in log


def test_output_is_capped_and_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    task = Task.load(write_task(tmp_path / "t", score=(
        "print('key: sk-test-0123456789abcdef')\n"
        "for i in range(60_000): print('x' * 99)\n"  # 6 MB of output
        "print('score: 0.5')")))
    result = run(task, tmp_path)
    log = Path(result.log_path).read_text()
    assert result.ok and result.metric == 0.5  # the last line is kept, and read
    assert "key: <redacted>" in log and "sk-test" not in log
    assert len(log) < 2.5e6 and "lines left out" in log
