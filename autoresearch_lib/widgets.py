"""A notebook dashboard for the research loop: pick an agent, then Start, Stop or Step.

    dashboard = Dashboard(workspace)   # a Workspace or its path; a cell ending in `dashboard` shows it

The loop runs in a background thread, so the kernel stays free while experiments train. The
dashboard listens to the loop's events and redraws a few coarse pieces: status line, progress bar,
the proposal's diff, the log tail, the last rows of results.tsv and the progress chart (throttled).
States: idle → running ⇄ awaiting approval → (stopping →) idle. Each button calls a plain method,
so the dashboard can be driven and tested without a browser:

    start(max_experiments)  step()  stop()  approve()  reject()  wait(timeout)
    state  experiments  last_event  error

Stop kills the training run within seconds; that experiment is undone and not recorded, and
Start resumes. "parallel" > 1 makes Start run waves of that many experiments at once on Ray
(loop.py, parallel.py; `pip install -e ".[ray]"`), one GPU each; a table shows the wave's runs
live (queued, training, done) and where each one runs. Step always runs exactly one. "fair comparisons" (on by default; `recheck=False` turns it off) trains the best
again beside a candidate when the machine's speed changed or the win is small (loop.py); the
status line says so while it happens, and afterwards counts the extra runs per kept change.
Approval mode wraps the chosen agent in a HumanAgent whose callback waits, on the loop's thread
(never on stdin), for Accept or Reject; a rejected proposal becomes a crash row, "rejected by
the instructor", as any failed proposal does.

A typed API key is taken out of its Password field as soon as the agent is built: it lives in this
process's memory only, never in a widget value a saved notebook could keep, in results.tsv or in
the logs (the runner strips secrets from the training environment).
"""

from __future__ import annotations

import html
import io
import os
import threading
import time
from collections import deque

import ipywidgets as w
from matplotlib.figure import Figure

from . import data, loop
from .agents import HumanAgent, Proposal, ProposalError, make_agent
from .agents.openai_agent import DEFAULT_MODEL
from .agents.scripted import parse_edits
from .plots import metric_of, progress_chart, summary
from .runner import run_training
from .workspace import Workspace

IDLE, RUNNING, STOPPING, AWAITING = "idle", "running", "stopping", "awaiting approval"
LOG_LINES = 20  # lines of the running experiment's log shown
TABLE_ROWS = 10  # rows of results.tsv shown
CHART_EVERY = 1.0  # seconds between chart redraws, at most
REFRESH_EVERY = 0.5  # seconds between status / progress / log redraws, at most
DEMO_EDITS = ('[["MATRIX_LR = 0.03", {"MATRIX_LR": 0.03}],\n'
              ' ["WARMDOWN_RATIO = 0.5", {"WARMDOWN_RATIO": 0.5}]]')
WAITING_NOTE = "<i>in approval mode each proposal waits here for Accept or Reject</i>&nbsp;"
PRE = ("font-size:11px; line-height:1.35; max-height:280px; overflow:auto; margin:0; "
       "padding:4px; background:#f7f7f7; white-space:pre; max-width:100%; box-sizing:border-box")


# ---------------------------------------------------------------- pieces of HTML and PNG

def diff_html(description: str, diff: str) -> str:
    """A proposal as HTML: its description, then its diff with added/removed lines coloured."""
    styles = {"+": "color:#116611; background:#e6ffec", "-": "color:#aa1111; background:#ffebe9",
              "@": "color:#555599"}
    lines = []
    for line in diff.splitlines():
        style = None if line.startswith(("+++", "---")) else styles.get(line[:1])
        text = html.escape(line)
        lines.append(f'<span style="{style}">{text}</span>' if style else text)
    body = "\n".join(lines) or "(train.py unchanged: the unmodified baseline)"
    return f"<b>{html.escape(description)}</b><pre style='{PRE}'>{body}</pre>"


def log_html(lines) -> str:
    """The tail of a log as an escaped <pre> block."""
    return f"<pre style='{PRE}'>{html.escape(chr(10).join(lines)) or '(no output yet)'}</pre>"


def results_html(rows: list[dict], last: int = TABLE_ROWS) -> str:
    """The last rows of results.tsv as an HTML table (status coloured)."""
    if not rows:
        return "<i>results.tsv is empty: the first experiment is the unmodified baseline.</i>"
    colours = {"keep": "#11771a", "discard": "#777777", "crash": "#bb1111", "recheck": "#b35c00"}
    metric = metric_of(rows)  # val_bpb, or a task's metric
    head = "".join(f"<th style='text-align:left; padding:0 6px'>{c}</th>"
                   for c in ("#", "commit", metric, "memory_gb", "status", "description"))
    body = []
    for i, r in list(enumerate(rows))[-last:]:
        status = f"<b style='color:{colours.get(r['status'], '#000')}'>{r['status']}</b>"
        cells = [i, r["commit"], f"{r[metric]:.6f}", f"{r['memory_gb']:.1f}", status,
                 html.escape(str(r["description"])[:70])]
        body.append("<tr>" + "".join(f"<td style='padding:0 6px'>{c}</td>" for c in cells) + "</tr>")
    more = f"<i>({len(rows) - last} earlier rows not shown)</i>" if len(rows) > last else ""
    return f"{more}<table style='font-size:12px'><tr>{head}</tr>{''.join(body)}</table>"


def chart_png(rows: list[dict]) -> bytes:
    """The upstream-style progress chart as PNG bytes (a Figure, not pyplot: thread-safe)."""
    fig = Figure(figsize=(6.4, 3.4), dpi=80)
    ax = fig.subplots()
    if any(r["status"] != "crash" for r in rows):
        progress_chart(rows, ax=ax)
        ax.set_xlim(-0.5, max(len(rows), 2) - 0.5)  # whole-number ticks, even for one point
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes,
                color="#777777")
        ax.set(xlabel="experiment #", ylabel="val_bpb (lower is better)", xticks=[], yticks=[])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------- the dashboard

class Dashboard:
    """Controls and live views of one workspace's research loop (see the module docstring)."""

    def __init__(self, workspace, agent=None, executor=None, max_experiments: int = 10,
                 recheck: bool = True, parallel: int = 1, ray_address: str | None = None):
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        self.given_agent = agent  # offered first in the chooser when given
        self.executor = executor  # what trains one train.py: loop.run's `executor`
        self.state = IDLE
        self.experiments: list[loop.Experiment] = []  # finished in this dashboard, in order
        self.last_event: loop.Event | None = None
        self.error: BaseException | None = None  # what ended the last run, if it failed
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._answer = threading.Event()  # set by approve() / reject()
        self._approved, self._pending = False, None
        self._agent, self._key = None, ""  # the built agent; a typed API key (memory only)
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._last: dict[str, float] = {}  # throttling: what -> when it was last redrawn
        self._rows: list[dict] = []
        self.ray_address = ray_address  # parallel runs: an existing Ray cluster (else a local one)
        self._wave: dict = {}  # the running wave: slot -> what is known of its run
        self._build(max_experiments, recheck)
        self.parallel.value = parallel
        self._refresh_results(force=True)
        self._set_state(IDLE, self._summary())

    def _repr_mimebundle_(self, **kwargs):  # a cell ending in `dashboard` shows the widgets
        return self.widget._repr_mimebundle_(**kwargs)

    def _build(self, max_experiments: int, recheck: bool) -> None:
        env = os.environ
        # the time a run gets: GPT's training budget (settable until the baseline ran), or a
        # task's timeout (fixed by its task.toml)
        seconds = self.ws.task.timeout if self.ws.is_task else self.ws.settings.budget
        choices = [("offline (no key, no network)", "offline"), ("OpenAI-compatible", "openai"),
                   ("scripted (the edits below)", "scripted")]
        if self.given_agent is not None:
            choices.insert(0, (f"given: {self.given_agent!r}"[:60], "given"))
        self.agent_choice = w.Dropdown(options=choices, description="agent")
        self.approval = w.Checkbox(False, description="approve each proposal", indent=False)
        self.fair = w.Checkbox(recheck, description="fair comparisons", indent=False,
                               tooltip="train the best again beside a candidate when the machine's "
                                       "speed changed or the win is small")
        self.model = w.Text(env.get("OPENAI_MODEL") or DEFAULT_MODEL, description="model")
        self.base_url = w.Text(env.get("OPENAI_BASE_URL", ""), description="base URL",
                               placeholder="OpenAI if empty; Ollama: http://localhost:11434/v1",
                               layout=w.Layout(width="440px"))
        self.api_key = w.Password(description="API key", placeholder="never shown, never saved")
        self.key_from_env = w.Checkbox(bool(env.get("OPENAI_API_KEY")), indent=False,
                                       description="key from $OPENAI_API_KEY")
        self.openai_box = w.VBox([w.HBox([self.model, self.base_url]),
                                  w.HBox([self.api_key, self.key_from_env])])
        self.edits = w.Textarea(DEMO_EDITS, description="edits", layout=w.Layout(width="640px"))
        self.budget = w.BoundedFloatText(seconds, min=1, max=10**6,
                                         description="timeout (s)" if self.ws.is_task else "budget (s)",
                                         tooltip="training seconds; fixed once the baseline ran")
        self.max_experiments = w.BoundedIntText(max_experiments, min=0, max=10**6, description="max exps",
                                                tooltip="Start runs this many (0: no limit)")
        self.parallel = w.BoundedIntText(1, min=1, max=256, description="parallel",
                                         tooltip="experiments at once, in waves, on Ray: one GPU "
                                                 "each (or a share of the CPUs)")
        self.start_button = w.Button(description="Start", icon="play", button_style="success")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger")
        self.step_button = w.Button(description="Step", icon="step-forward", button_style="info",
                                    tooltip="run exactly one experiment")
        self.accept_button = w.Button(description="Accept", icon="check", button_style="success")
        self.reject_button = w.Button(description="Reject", icon="times", button_style="warning")
        for button, action in ((self.start_button, self.start), (self.stop_button, self.stop),
                               (self.step_button, self.step), (self.accept_button, self.approve),
                               (self.reject_button, self.reject)):
            button.on_click(lambda _, act=action: act())
            button.add_class(f"ar-{button.description.lower()}")
        self.progress = w.FloatProgress(0, min=0, max=100, layout=w.Layout(width="260px"))
        self.status, self.approval_note = w.HTML(), w.HTML(WAITING_NOTE)
        self.approval_box = w.HBox([self.approval_note, self.accept_button, self.reject_button])
        self.chart = w.Image(format="png", layout=w.Layout(width="512px"))
        self.table, self.wave_table = w.HTML(), w.HTML()
        full = dict(layout=w.Layout(width="100%", min_width="0"))
        self.diff, self.log_tail = w.HTML(diff_html("no proposal yet", ""), **full), w.HTML(**full)
        for widget, name in ((self.status, "status"), (self.table, "results"), (self.chart, "chart"),
                             (self.diff, "diff"), (self.log_tail, "log"), (self.wave_table, "wave")):
            widget.add_class(f"ar-{name}")
        # min_width 0: a flex item may then be narrower than its longest line, which scrolls
        half = dict(layout=w.Layout(width="50%", min_width="0", padding="0 6px 0 0"))
        self.widget = w.VBox([
            w.HTML(f"<b>autoresearch</b> · {html.escape(str(self.ws.path))} · branch "
                   f"<code>{html.escape(self.ws.branch)}</code> · {html.escape(self._what())}"),
            w.HBox([self.agent_choice, self.approval, self.fair]), self.openai_box, self.edits,
            w.HBox([self.budget, self.max_experiments, self.parallel]),
            w.HBox([self.start_button, self.stop_button, self.step_button, self.progress]),
            self.status, self.approval_box, self.wave_table,
            w.HBox([self.chart, self.table], layout=w.Layout(align_items="flex-start")),
            w.HBox([w.VBox([w.HTML("<b>proposal</b>"), self.diff], **half),
                    w.VBox([w.HTML("<b>log (last lines)</b>"), self.log_tail], **half)])])
        self.widget.add_class("ar-dashboard")
        for control in (self.agent_choice, self.model, self.base_url, self.api_key, self.key_from_env,
                        self.edits):
            control.observe(self._agent_changed, names="value")
        self.approval.observe(lambda _: self._refresh_buttons(), names="value")

    # ------------------------------------------------------------ what the buttons call

    def start(self, max_experiments: int | None = None) -> bool:
        """Run experiments in the background until `max_experiments` are done or Stop."""
        if max_experiments is not None and self.state == IDLE:
            self.max_experiments.value = max_experiments
        limit = self.max_experiments.value or None
        return self._launch(lambda agent: loop.run(self.ws, agent, max_experiments=limit,
                                                   stop=self._stop, on_event=self._on_event,
                                                   executor=self.executor, recheck=self.fair.value,
                                                   parallel=self.parallel.value,
                                                   ray_address=self.ray_address))

    def step(self) -> bool:
        """Run exactly one experiment in the background (for demos), then go back to idle."""
        return self._launch(lambda agent: loop.step(self.ws, agent, on_event=self._on_event,
                                                    stop=self._stop, executor=self.executor,
                                                    recheck=self.fair.value))

    def stop(self) -> bool:
        """Stop the loop: the training run is killed and its experiment undone, not recorded."""
        if self.state in (IDLE, STOPPING):
            return False
        self._stop.set()
        self._answer.set()  # wake a proposal waiting for approval
        self._set_state(STOPPING, "stopping: ending the training run and undoing its experiment")
        return True

    def approve(self) -> bool:
        """Accept the proposal waiting in approval mode: it is committed and trained."""
        return self._decide(True)

    def reject(self) -> bool:
        """Reject the waiting proposal: recorded as a crash row, "rejected by the instructor"."""
        return self._decide(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background run to finish; True if it has (or none was running)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    # ------------------------------------------------------------ the background run

    def _launch(self, job) -> bool:
        if self.state != IDLE:
            return False
        try:
            self._fix_budget()
            agent = self._chosen_agent()
        except (ValueError, ProposalError) as e:  # a bad edits list, a missing API key
            self.error = e
            self._set_state(IDLE, f"can't start: {e}", error=True)
            return False
        if self.approval.value:
            agent = HumanAgent(self._ask_instructor, suggest_with=agent)
        self._stop, self.error = threading.Event(), None
        self._set_state(RUNNING, "starting")
        self._thread = threading.Thread(target=self._work, args=(job, agent), daemon=True,
                                        name="autoresearch-dashboard")
        self._thread.start()
        return True

    def _work(self, job, agent) -> None:
        message, failed = None, False
        try:
            if self.executor in (None, run_training) and not self.ws.is_task:  # a bad corpus
                # fails here, clearly, once
                self._set_status("preparing the data (cached after the first time)")
                data.prepare(self.ws.settings, verbose=False)
            job(agent)
        except Exception as e:  # shown, not raised: nobody could catch it on this thread
            self.error, message, failed = e, f"{type(e).__name__}: {e}", True
        finally:
            self._refresh_log(force=True)
            self._refresh_results(force=True)
            stopped = self._stop.is_set() and not failed
            self._set_state(IDLE, message or ("stopped · " if stopped else "") + self._summary(),
                            error=failed)

    def _fix_budget(self) -> None:
        """Until the baseline has run the budget may change; after that every run gets the same."""
        if self.ws.is_task or self.ws.next_index() or self.budget.value == self.ws.settings.budget:
            return
        self.ws.set_budget(float(self.budget.value))

    def _what(self) -> str:
        """What this workspace researches: a task and its metric, or GPT training's preset."""
        if self.ws.is_task:
            better = "lower" if self.ws.direction == "minimize" else "higher"
            return f"task {self.ws.task_info['name']} · {self.ws.metric} ({better} is better)"
        return f"preset {self.ws.settings.preset}"

    def _chosen_agent(self):
        """The agent the chooser describes; kept between runs (a scripted agent goes on)."""
        if self._agent is not None:
            return self._agent
        choice = self.agent_choice.value
        if choice == "given":
            agent = self.given_agent
        elif choice == "openai":
            if self.api_key.value:  # out of the widget: from here on it lives in memory only
                self._key, self.api_key.value = self.api_key.value, ""
                self.api_key.placeholder = "key kept in memory (type a new one to replace it)"
            key = None if self.key_from_env.value else (self._key or None)
            agent = make_agent("openai", model=self.model.value.strip() or None,
                               base_url=self.base_url.value.strip() or None, api_key=key)
        elif choice == "scripted":
            agent = make_agent("scripted", edits=parse_edits(self.edits.value))
        else:
            agent = make_agent("offline")
        self._agent = agent
        return agent

    def _agent_changed(self, change) -> None:
        if change["owner"] is not self.api_key or change["new"]:  # not our own clearing of the key
            self._agent = None
        self._refresh_buttons()

    def _ask_instructor(self, state, suggestion: Proposal | None):
        """HumanAgent's callback, on the loop's thread: show the suggestion, wait for a click."""
        self._pending, self._approved = suggestion, False
        self._answer.clear()
        if suggestion is not None:
            self.diff.value = diff_html(suggestion.description, suggestion.diff)
        what = html.escape(suggestion.description) if suggestion else "the agent had no suggestion"
        self.approval_note.value = f"<b>experiment #{state.experiment}:</b> {what}&nbsp;"
        self._set_state(AWAITING, "waiting for the instructor: Accept or Reject the proposal")
        while not self._answer.wait(0.5) and not self._stop.is_set():
            pass
        self._pending, self.approval_note.value = None, WAITING_NOTE
        if self._stop.is_set():  # the loop sees the stop before committing anything
            return suggestion or Proposal("stopped", state.train_py, original=state.train_py)
        self._set_state(RUNNING, "accepted" if self._approved else "rejected")
        return suggestion if self._approved else None

    def _decide(self, accept: bool) -> bool:
        if self.state != AWAITING or (accept and self._pending is None):
            return False
        self._approved = accept
        self._answer.set()
        return True

    # ------------------------------------------------------------ loop events -> widgets

    def _on_event(self, event: loop.Event) -> None:
        self.last_event = event
        try:
            getattr(self, f"_on_{event.kind}", lambda e: None)(event)
        except Exception as e:  # a drawing problem must not break the loop mid-experiment
            self.error = e

    def _on_experiment(self, e) -> None:
        self._log.clear()
        self.progress.value = 0
        self._refresh_log(force=True)
        self._set_status(f"experiment #{e.index}: waiting for a proposal")

    def _on_proposal(self, e) -> None:
        self.diff.value = diff_html(e.data["description"], e.data["diff"])
        self._set_status(f"experiment #{e.index}: training “{html.escape(e.data['description'])}”")

    def _on_parallel(self, e) -> None:
        self._set_status(html.escape(e.data["describe"]))

    def _on_wave(self, e) -> None:
        self._wave = {c["slot"]: {"description": c["description"], "state": "queued", "where": ""}
                      for c in e.data["candidates"]}
        self._wave_number = e.data["wave"]
        self.diff.value = diff_html(f"wave {e.data['wave']}: {len(self._wave)} candidates",
                                    "\n\n".join(c["diff"] for c in e.data["candidates"]))
        self._set_status(f"wave {e.data['wave']}: training {len(self._wave)} candidates at once")
        self._refresh_wave(force=True)

    def _on_started(self, e) -> None:
        run = self._wave.get(e.data["slot"])
        if run is not None:
            run["state"], run["where"] = "starting", f"{e.data['host']} · {e.data['device']}"
            self._refresh_wave(force=True)

    def _refresh_wave(self, force: bool = False) -> None:
        if not (force or self._due("wave", REFRESH_EVERY)):
            return
        if not self._wave:
            self.wave_table.value = ""
            return
        rows = "".join(f"<tr><td>{k}</td><td>{html.escape(r['description'])}</td>"
                       f"<td>{html.escape(r['state'])}</td><td>{html.escape(r['where'])}</td></tr>"
                       for k, r in sorted(self._wave.items()))
        self.wave_table.value = (f"<b>wave {self._wave_number}</b><table style='font-size:12px'>"
                                 "<tr><th>#</th><th>candidate</th><th>state</th><th>where</th></tr>"
                                 f"{rows}</table>")

    def _on_progress(self, e) -> None:
        p = e.data["progress"]
        if "slot" in e.data:  # one run of a parallel wave
            run = self._wave.get(e.data["slot"])
            if run is not None:
                run["state"] = f"step {p.step} · loss {p.loss:.3f} · {p.percent:.0f}%"
                self._refresh_wave()
            return
        if self._due("progress", REFRESH_EVERY):
            self.progress.value = min(100.0, p.percent)
            self._set_status(f"experiment #{e.index}: step {p.step} · loss {p.loss:.4f} · "
                             f"{p.remaining:.0f}s of training left")

    def _on_line(self, e) -> None:
        self._log.append(f"[{e.data['slot']}] {e.data['line']}" if "slot" in e.data else e.data["line"])
        self._refresh_log()

    def _on_result(self, e) -> None:
        if "slot" in e.data:  # a run of the wave is done (its row comes with its decision)
            run, r = self._wave.get(e.data["slot"]), e.data["result"]
            if run is not None:
                run["state"] = (f"done: {r.metric if self.ws.is_task else r.val_bpb:.6g}" if r.ok else
                                f"crash: {r.reason[:60]}")
                self._refresh_wave(force=True)
            return
        self.progress.value = 100
        self._refresh_log(force=True)
        self._set_status(f"experiment #{e.index}: evaluated ({e.data['result'].status})")

    def _on_decision(self, e) -> None:
        self.experiments.append(e.data["experiment"])
        self._refresh_results()
        bpb = f"{e.data['val_bpb']:.6f}" if e.data["val_bpb"] is not None else "-"
        self._set_status(f"experiment #{e.index}: <b>{e.data['status']}</b> (val_bpb {bpb}) · "
                         f"{html.escape(e.data['description'])}")

    def _on_recheck(self, e) -> None:
        self.progress.value = 0
        self._set_status(f"experiment #{e.data['candidate']}: {html.escape(e.data['headline'])} "
                         f"(training {e.data['commit']} again as #{e.index}: {html.escape(e.data['why'])})")

    def _on_alone(self, e) -> None:
        self.progress.value = 0
        self._set_status(f"experiment #{e.index} ({self.ws.metric} {e.data['value']:.6g}) trained beside "
                         f"other experiments' code on {html.escape(e.data['host'])}: training it again "
                         "alone there before it can be kept")

    def _on_waiting(self, e) -> None:
        if e.index < 0:  # a parallel run waits for a free GPU / CPUs
            self._set_status(html.escape(e.data["reason"]), error=True)
            return
        self._set_status(f"the agent failed {e.data['failures']} times in a row "
                         f"({html.escape(e.data['reason'][:120])}): asking again in "
                         f"{e.data['seconds']:g} s", error=True)

    def _on_stopped(self, e) -> None:
        self._set_status(f"experiment #{e.index} stopped: undone and not recorded")

    # ------------------------------------------------------------ redrawing

    def _due(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(what, float("-inf")) < every:
            return False
        self._last[what] = now
        return True

    def _refresh_log(self, force: bool = False) -> None:
        if force or self._due("log", REFRESH_EVERY):
            self.log_tail.value = log_html(self._log)

    def _refresh_results(self, force: bool = False) -> None:
        self._rows = self.ws.results()
        self.table.value = results_html(self._rows)
        if force or self._due("chart", CHART_EVERY):
            self.chart.value = chart_png(self._rows)
        self._refresh_buttons()

    def _summary(self) -> str:
        s = summary(self._rows)
        if not s["experiments"]:
            return "no experiments yet: Step runs the baseline"
        n = s["experiments"]
        text = f"{n} experiment{'s' * (n != 1)}, {s['kept']} kept, {s['crashed']} crashed"
        if s["best"] is not None:
            text += f", best val_bpb {s['best']:.6f} (baseline {s['baseline']:.6f})"
        cost = loop.recheck_cost(self.experiments)
        if cost["extra_runs"]:
            text += (f" · fair comparisons: {cost['extra_runs']} extra run(s), "
                     f"{cost['per_kept']:.1f} per kept change")
        return text

    def _set_status(self, text: str, error: bool = False) -> None:
        colour = "#bb1111" if error else "#333333"
        self.status.value = (f"<span style='color:{colour}'><b>{self.state}</b> · {text}</span>")

    def _set_state(self, state: str, text: str, error: bool = False) -> None:
        self.state = state
        self._refresh_buttons()
        self._set_status(text, error)

    def _refresh_buttons(self) -> None:
        busy, waiting = self.state != IDLE, self.state == AWAITING
        self.start_button.disabled = self.step_button.disabled = busy
        self.stop_button.disabled = self.state in (IDLE, STOPPING)
        self.accept_button.disabled = not waiting or self._pending is None
        self.reject_button.disabled = not waiting
        for control in (self.agent_choice, self.approval, self.fair, self.model, self.base_url,
                        self.key_from_env, self.edits, self.max_experiments, self.parallel):
            control.disabled = busy
        self.api_key.disabled = busy or self.key_from_env.value
        self.budget.disabled = busy or bool(self._rows) or self.ws.is_task
        choice = self.agent_choice.value
        self.openai_box.layout.display = "" if choice == "openai" else "none"
        self.edits.layout.display = "" if choice == "scripted" else "none"
        self.approval_box.layout.display = "" if self.approval.value or waiting else "none"
