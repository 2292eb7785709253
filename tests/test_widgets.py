"""The notebook dashboard, driven headlessly: buttons → loop state → widgets.

Most tests inject a fake executor (no training, milliseconds per experiment); one test trains
for real in quick mode, then stops a second run half-way.
"""

import html
import json
import threading
import time
from pathlib import Path

import pytest

from autoresearch_lib import loop
from autoresearch_lib.agents import ScriptedAgent
from autoresearch_lib.agents.offline import read_constants
from autoresearch_lib.runner import Progress, TrainResult
from autoresearch_lib.widgets import (AWAITING, IDLE, RUNNING, STOPPING, Dashboard, diff_html,
                                      results_html)
from autoresearch_lib.workspace import Workspace, _git

KEY = "sk-test-Zq8Secret-do-not-show-1234567890"


class FakeExecutor:
    """Stands in for runner.run_training: val_bpb from MATRIX_LR (best at 0.03), no training.

    With `gate` set, each run waits for it (or for stop) like a long training run would.
    """

    def __init__(self, gate: threading.Event | None = None, crash: bool = False):
        self.gate, self.crash, self.calls = gate, crash, 0

    def __call__(self, script_text, settings, run_dir, on_progress=None, on_line=None,
                 stop=None, timeout=None, log_path=None):
        self.calls += 1
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = Path(log_path or run_dir / "run.log")
        log.write_text(f"fake run {self.calls}\n")
        on_line(f"fake run {self.calls}: training")
        on_progress(Progress(step=1, percent=50.0, loss=3.0, remaining=1.0))
        while self.gate is not None and not self.gate.wait(0.05):
            if stop is not None and stop.is_set():
                return TrainResult(status="stopped", reason="stopped by the user", log_path=str(log))
        if self.crash:
            return TrainResult(status="crash", reason="exception: boom", log_path=str(log))
        val = 2.0 + abs(read_constants(script_text)["MATRIX_LR"] - 0.03)
        on_line(f"val_bpb: {val:.6f}")
        return TrainResult(status="ok", val_bpb=val, peak_vram_mb=512, log_path=str(log),
                           run_dir=str(run_dir))


def until(condition, timeout=10.0):
    """Poll `condition` until it holds; fail the test if it doesn't within `timeout` seconds."""
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.02)


def buttons(d: Dashboard) -> dict:
    """Which buttons can be clicked now."""
    return {b.description: not b.disabled for b in (d.start_button, d.stop_button, d.step_button,
                                                    d.accept_button, d.reject_button)}


def clean(ws: Workspace) -> bool:
    """No uncommitted change to tracked files, and HEAD is the best kept commit."""
    return not _git(ws.path, "status", "--porcelain", "--untracked-files=no").strip() \
        and ws.head() == ws.best()[0]


@pytest.fixture
def ws(tmp_path, cache):
    return Workspace.create(tmp_path / "ws", preset="quick")


def test_step_runs_exactly_one_experiment_and_updates_the_views(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    assert d.state == IDLE and buttons(d) == {"Start": True, "Stop": False, "Step": True,
                                              "Accept": False, "Reject": False}
    assert "results.tsv is empty" in d.table.value
    chart, status = d.chart.value, d.status.value
    assert d.step() and d.wait(10)
    assert d.state == IDLE and d.error is None and len(ws.results()) == 1
    assert [e.description for e in d.experiments] == ["baseline"]
    assert d.last_event.kind == "decision" and d.last_event.data["status"] == "keep"
    assert "baseline" in d.table.value and "keep" in d.table.value
    assert d.chart.value != chart and d.chart.value[:4] == b"\x89PNG"
    assert d.status.value != status and "1 experiment, 1 kept" in d.status.value
    assert "fake run 1" in d.log_tail.value and d.progress.value == 100
    assert buttons(d)["Start"] and buttons(d)["Step"] and not buttons(d)["Stop"]
    assert d.budget.disabled  # fixed once the baseline ran


def test_start_runs_until_max_experiments_with_the_offline_agent(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    assert d.start(max_experiments=3) and d.wait(20)
    rows = ws.results()
    assert len(rows) == 3 and rows[0]["description"] == "baseline" and d.error is None
    assert [r["agent"] for r in rows] == ["baseline", "offline", "offline"]
    assert d.max_experiments.value == 3 and len(d.experiments) == 3 and clean(ws)
    assert "<pre" in d.diff.value and "-&gt;" in d.diff.value  # the last proposal's diff, escaped


def test_an_agent_that_keeps_failing_shows_the_pause_and_stop_ends_it(ws, monkeypatch):
    monkeypatch.setattr(loop, "proposal_retry_delay", lambda failures: 30.0 if failures >= 2 else 0)

    def server_down(state):
        from autoresearch_lib.agents import ProposalError
        raise ProposalError("the model server is down")

    d = Dashboard(ws, agent=ScriptedAgent([server_down] * 5), executor=FakeExecutor())
    assert d.start(max_experiments=5)
    until(lambda: d.last_event is not None and d.last_event.kind == "waiting")
    assert "failed 2 times in a row" in d.status.value and "server is down" in d.status.value
    assert "30 s" in d.status.value and len(ws.results()) == 3  # the baseline and two crash rows
    t0 = time.time()
    assert d.stop() and d.wait(5) and time.time() - t0 < 2  # the 30 s pause ends at once
    assert d.state == IDLE and len(ws.results()) == 3 and clean(ws)


def test_buttons_follow_the_state_and_stop_undoes_the_unfinished_experiment(ws):
    gate = threading.Event()
    d = Dashboard(ws, executor=FakeExecutor(gate))
    assert d.step()
    assert d.state == RUNNING and not d.step() and not d.start()  # one run at a time
    assert buttons(d) == {"Start": False, "Stop": True, "Step": False, "Accept": False, "Reject": False}
    assert d.agent_choice.disabled and d.max_experiments.disabled and d.budget.disabled
    gate.set()
    assert d.wait(10) and len(ws.results()) == 1
    gate.clear()
    d.start(max_experiments=5)
    until(lambda: d.last_event.kind == "progress" and d.last_event.index == 1)
    assert d.stop() and d.state == STOPPING and not buttons(d)["Stop"]
    t0 = time.time()
    assert d.wait(5) and time.time() - t0 < 2
    assert d.state == IDLE and "stopped" in d.status.value and d.error is None
    assert len(ws.results()) == 1 and clean(ws)  # not recorded, and undone
    assert Workspace.open(ws.path).repairs == []
    gate.set()  # Start after Stop resumes where the loop was
    assert d.start(max_experiments=2) and d.wait(10)
    assert len(ws.results()) == 3 and clean(ws)


def test_approval_reject_records_a_failed_proposal_and_approve_runs_it(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    d.step()
    d.wait(10)
    d.approval.value = True
    assert d.approval_box.layout.display == ""
    assert d.step()
    until(lambda: d.state == AWAITING)
    assert buttons(d) == {"Start": False, "Stop": True, "Step": False, "Accept": True, "Reject": True}
    suggestion = d.approval_note.value
    assert "experiment #1" in suggestion and "<pre" in d.diff.value
    head = ws.head()
    assert d.reject() and d.wait(10)
    row = ws.results()[-1]
    assert row["status"] == "crash" and "rejected by the instructor" in row["description"]
    assert row["agent"] == "human" and ws.head() == head and d.state == IDLE
    assert d.step()
    until(lambda: d.state == AWAITING)
    suggestion = d.approval_note.value
    assert d.approve() and d.wait(10)
    row = ws.results()[-1]
    assert row["status"] in ("keep", "discard") and row["description"] in html.unescape(suggestion)
    assert not d.approve() and not d.reject()  # nothing is waiting now


def test_stop_while_awaiting_approval_records_nothing(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    d.step()
    d.wait(10)
    d.approval.value = True
    d.start(max_experiments=3)
    until(lambda: d.state == AWAITING)
    assert d.stop() and d.wait(5)
    assert d.state == IDLE and len(ws.results()) == 1 and clean(ws)


def test_scripted_agent_from_the_chooser_and_a_bad_edits_list(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    d.agent_choice.value = "scripted"
    assert d.edits.layout.display == "" and d.openai_box.layout.display == "none"
    d.edits.value = "not json"
    assert not d.start() and d.state == IDLE and isinstance(d.error, ValueError)
    assert "can't start" in d.status.value
    d.edits.value = json.dumps([["MATRIX_LR = 0.03", {"MATRIX_LR": 0.03}], ["DEPTH = 3", {"DEPTH": 3}]])
    assert d.start(max_experiments=3) and d.wait(10)
    rows = ws.results()
    # the fake's optimum wins by 0.5 %, a close call: the best is trained again beside it first
    assert [(r["description"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("MATRIX_LR = 0.03", "keep"),
        (f"recheck {rows[0]['commit']}: the best so far, trained again beside #1", "recheck"),
        ("DEPTH = 3", "discard")]


def test_a_given_agent_is_the_default_choice(ws):
    agent = ScriptedAgent([("MATRIX_LR = 0.01", {"MATRIX_LR": 0.01})])
    d = Dashboard(ws, agent=agent, executor=FakeExecutor())
    assert d.agent_choice.value == "given"
    d.start(max_experiments=2)
    d.wait(10)
    assert ws.results()[1]["description"] == "MATRIX_LR = 0.01" and agent.remaining == 0


def test_budget_can_change_until_the_baseline_runs(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    d.budget.value = 7
    d.step()
    d.wait(10)
    assert ws.settings.budget == 7 and clean(ws)
    assert _git(ws.path, "rev-list", "--count", "HEAD").strip() == "1"  # the baseline, amended
    assert d.budget.disabled


def test_a_crashed_baseline_stops_the_loop_with_a_message(ws):
    d = Dashboard(ws, executor=FakeExecutor(crash=True))
    d.step()
    d.wait(10)
    assert ws.results()[0]["status"] == "crash" and d.error is None
    d.step()
    d.wait(10)
    assert isinstance(d.error, loop.LoopError) and "baseline crashed" in d.status.value
    assert d.state == IDLE and buttons(d)["Step"]


def test_diff_and_results_html_escape_what_they_show():
    shown = diff_html("<b>x</b>", "--- a/train.py\n+++ b/train.py\n-A = '<1>'\n+A = '<2>'")
    assert "&lt;b&gt;x&lt;/b&gt;" in shown and "<1>" not in shown
    assert shown.count("#ffebe9") == 1 and shown.count("#e6ffec") == 1  # --- / +++ not coloured
    rows = [dict(commit=f"c{i}", val_bpb=2.0, memory_gb=0.0, status="discard",
                 description="<script>") for i in range(15)]
    table = results_html(rows)
    assert "<script>" not in table and "5 earlier rows not shown" in table and "c14" in table


# ---------------------------------------------------------------- the API key

def widget_texts():
    """The state of every live widget, as the frontend (and a saved notebook) would get it."""
    from ipywidgets.widgets.widget import _instances

    return [str(widget.get_state()) for widget in list(_instances.values())]


def test_the_api_key_is_used_but_never_shown_saved_or_logged(ws, monkeypatch, llm):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm.reply("Raise the matrix learning rate\ntrain.py\n<<<<<<< SEARCH\nMATRIX_LR = 0.02\n=======\n"
              "MATRIX_LR = 0.03\n>>>>>>> REPLACE\n", 9, 3)
    d = Dashboard(ws, executor=FakeExecutor())
    d.agent_choice.value = "openai"
    assert d.openai_box.layout.display == "" and not d.key_from_env.value
    assert not d.start() and "No API key" in d.status.value  # none typed, none in the env
    d.base_url.value = llm.url
    d.model.value = "fake-model"
    d.api_key.value = KEY
    assert d.start(max_experiments=2) and d.wait(20)
    rows = ws.results()
    assert rows[1]["description"] == "Raise the matrix learning rate" and rows[1]["agent"] == "openai"
    assert [r["auth"] for r in llm.requests] == [f"Bearer {KEY}"]  # the key was used ...
    assert d.api_key.value == ""  # ... and taken out of the widget
    seen = widget_texts() + [repr(d.widget), str(d.widget._repr_mimebundle_()), repr(d._agent)]
    seen += [p.read_text(errors="replace") for p in ws.path.rglob("*")
             if p.is_file() and ".git" not in p.parts]
    assert not [text for text in seen if KEY in text]


# ---------------------------------------------------------------- for real, in quick mode

@pytest.mark.slow
def test_a_real_step_then_a_real_stop(ws):
    d = Dashboard(ws)
    chart = d.chart.value
    assert d.step() and d.wait(120)
    assert d.error is None and [r["description"] for r in ws.results()] == ["baseline"]
    assert ws.results()[0]["status"] == "keep" and "baseline" in d.table.value
    assert d.chart.value != chart and "val_bpb" in d.log_tail.value
    d.start(max_experiments=3)
    until(lambda: d.last_event.kind == "progress" and d.last_event.index == 1, timeout=120)
    t0 = time.time()
    assert d.stop() and d.wait(15)
    assert time.time() - t0 < 8, "Stop should end the training process within seconds"
    assert d.state == IDLE and d.error is None and len(ws.results()) == 1 and clean(ws)
    assert Workspace.open(ws.path).repairs == []


def test_fair_comparisons_show_in_the_status_line_and_one_switch_turns_them_off(ws):
    d = Dashboard(ws, executor=FakeExecutor())
    assert d.fair.value  # on by default
    seen = []
    d._on_recheck = lambda e, show=d._on_recheck: (show(e), seen.append(d.status.value))
    d.agent_choice.value = "scripted"
    d.edits.value = json.dumps([["MATRIX_LR = 0.03", {"MATRIX_LR": 0.03}]])
    assert d.start(max_experiments=2) and d.wait(10)
    assert "a close call" in seen[0] and "re-checking the baseline" in seen[0]
    assert "fair comparisons: 1 extra run(s), 1.0 per kept change" in d.status.value
    assert "recheck" in d.table.value

    other = Workspace.create(ws.path.parent / "ws2", preset="quick")
    d = Dashboard(other, executor=FakeExecutor(), recheck=False)
    assert not d.fair.value
    d.agent_choice.value = "scripted"
    d.edits.value = json.dumps([["MATRIX_LR = 0.03", {"MATRIX_LR": 0.03}]])
    assert d.start(max_experiments=2) and d.wait(10)
    assert [r["status"] for r in other.results()] == ["keep", "keep"]  # upstream's rule
    assert "fair comparisons" not in d.status.value


def test_the_parallel_control_runs_waves_and_shows_them_live(tmp_path):
    """parallel 2 on a task (seconds per run), on a real local Ray instance: the wave's table
    lists both candidates with where they ran and how they ended; Step still runs just one."""
    pytest.importorskip("ray")
    ws = Workspace.create(tmp_path / "task", task="fit-curve", tag="test")
    dash = Dashboard(ws, parallel=2, max_experiments=3, recheck=False)
    assert dash.parallel.value == 2 and "parallel" in [c.description for c in dash.widget.children[4].children]
    tables = []
    dash._refresh_wave = (lambda original: lambda force=False: (original(True), tables.append(dash.wave_table.value)))(dash._refresh_wave)
    statuses = []
    dash._set_status = (lambda original: lambda text, *a, **kw: (statuses.append(text), original(text, *a, **kw)))(dash._set_status)
    assert dash.start()
    assert dash.parallel.disabled  # no change mid-run
    assert dash.wait(240) and dash.error is None, dash.error
    rows = ws.results()
    assert [r["wave"] for r in rows] == [None, 1, 1] and dash.state == IDLE
    final = tables[-1]
    for r in rows[1:]:
        assert html.escape(r["description"]) in final
    assert final.count("done:") + final.count("crash:") == 2 and "CPU cores" in final
    assert not dash.parallel.disabled
    for n, r in enumerate(rows):  # a run that had company trains again alone first, and says so
        said = any(f"experiment #{n} (mse " in text and "again alone" in text for text in statuses)
        assert said == r["reason"].startswith("judged on a run alone"), (n, r["reason"], statuses)
