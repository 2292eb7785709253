"""The research loop: propose → commit → train → decide → record → keep, or reset.

    ws = Workspace.create("runs/demo", preset="cpu", budget=30)
    loop.run(ws, OfflineAgent(), max_experiments=6)    # or loop.step(ws, agent): exactly one

Each experiment is one commit of train.py on the workspace's branch. The first experiment is
always the unmodified baseline. A lower val_bpb than the best so far keeps the commit (the branch
advances); anything else — a worse result, a crash, a proposal that fails validation — is
recorded in results.tsv and undone with `git reset --hard` to the best commit.

The order of the steps makes a kill at any instant safe: the row is written before the reset,
and `Workspace.open` undoes a commit that has no `keep` row. So resuming is simply
`loop.run(Workspace.open(path), agent)`.

Faults. A proposal that fails - the agent's ProposalError, an unusable Proposal, or any other
exception raised inside `agent.propose` (a bug in an agent must not end an unattended night) - is
a crash row "proposal: ..." and the loop goes on; only unexpected errors three times in a
row stop it (LoopError), as does Ctrl-C. After two failed proposals in a row `run` waits before
asking again (10 s, doubling, at most 10 minutes), so an API that is down all night costs a few
dozen crash rows rather than thousands. A full or read-only disk stops the loop with a
WorkspaceError saying what to do; resuming afterwards is the usual `Workspace.open`. Text the
loop writes or sends (results.tsv, events, logs, the crash tail an agent is sent) has the values
of secret-looking environment variables replaced by <redacted>.

Tampering. A training script runs as you, so it can write anywhere you can. The loop trusts only
what it wrote itself: results.tsv as it holds it in memory (a run that changed the file, or moved
HEAD, is a crash "tampered: ...", and the file is put back), and, before every experiment, the
kit's code and the evaluation data as the workspace pinned them (a LoopError says what changed).
See Workspace.hold and pins.py.

Company. Sandboxes on one machine separate files, networks and processes, not every channel of
the kernel they share: a run could train a model for another run beside it, which would then
score the work of two budgets. So a candidate that could be kept, and whose run had other
experiments' code beside it on its machine (a wave's other candidates, or another loop's runs),
trains once more alone there and is judged on that run (`_Loop.judge`).

Fair comparisons (`recheck=True`, the default; see fairness.py): with a fixed wall-clock budget
val_bpb depends on how busy the machine is, so before a candidate is kept the incumbent (the best
commit) is trained again right after it whenever the machine's speed changed, the model's size
changed, or the win is small, and the decision is made on the pair. The re-run is its own row,
status `recheck`, commit = the incumbent's, and its val_bpb becomes the best's reference
(`Workspace.best()`). `recheck=False` is upstream's rule: keep whatever scores lower.

Noise-aware mode (`noise_runs=k`): the baseline is trained k times to estimate the run-to-run
spread σ of val_bpb. With fair comparisons, σ sets the tie band: a change must beat the best by
more than z·σ·√2 (the spread of a difference of two runs). Without them, a change is kept only if
it beats the best by more than z·σ, and an apparent win is confirmed by one re-run of the
candidate (the two are averaged).

Any task. The same loop runs a workspace made for another task (`Workspace.create(path,
task="fit-curve")`, tasks.py): each experiment commits the task's editable file(s), runs them
with `tasks.run_task`, and judges the task's metric in its direction ("better" is lower, or
higher for a task that maximizes; the noise margin and fair comparisons follow it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import logging
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from . import sandbox
from .agents import Proposal, ProposalError, State
from .config import quick_mode
from .fairness import Guard, Measurement, decisive
from .records import write_atomic
from .redact import redact
from .runner import TrainResult, run_training
from .tasks import run_task
from .workspace import Workspace, one_line, storage_error

log = logging.getLogger(__name__)
NOISE_PREFIX = "baseline noise run"
RECHECK = "recheck"  # the status (and agent) of a row that re-measured the incumbent
NO_PROPOSAL = "proposal: "  # the reason of a crash row whose proposal failed (nothing trained)
AGENT_ERROR = "agent error: "  # ... because of an unexpected exception in the agent
MAX_AGENT_ERRORS = 3  # that many in a row: the agent is broken, not unlucky
PROPOSAL_RETRY_MAX = 600.0  # seconds: the longest wait between failing proposals
REPEAT_TRIES = 3  # a wave asks this often for a candidate that wasn't tried before


class LoopError(RuntimeError):
    """The loop cannot go on (e.g. the baseline itself crashes): what to fix is in the message."""


@dataclass
class Event:
    """Something the loop did, for a dashboard or a log.

    kind: "experiment" (a new one starts), "proposal" (description, diff), "progress" (a
    runner.Progress), "line" (a log line), "result" (a TrainResult), "decision" (status,
    val_bpb, best), "waiting" (seconds, failures, reason: proposals keep failing, so `run`
    pauses before the next), "recheck" (the incumbent trains again, as row `index`: commit,
    why, headline, candidate: the experiment it is compared with), "stopped", "error".
    A parallel loop adds "parallel" (describe: where experiments run), "wave" (wave, candidates:
    slot, commit, description, diff) and, for one run of the wave (index -1, data["slot"]),
    "started" (host, device, pid), "progress", "line", "result"; its rows come with "decision".
    "alone" (commit, beside, host, value): a candidate that could be kept, whose first run had
    other experiments' code beside it (`beside` of them, on `host`; it scored `value`), trains
    again alone there (see _Loop.judge); a wave's leader is the usual case.
    """

    kind: str
    index: int
    data: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """One finished experiment: what was tried and how it was judged."""

    index: int
    commit: str
    description: str
    status: str  # keep, discard, crash — or "stopped" (not recorded: the user stopped it)
    val_bpb: float | None = None  # the metric: val_bpb for GPT, else the task's (e.g. mse)
    best_before: float | None = None
    reason: str = ""
    diff: str = ""
    result: TrainResult | None = None
    seconds: float = 0.0
    extra_runs: int = 0  # runs beyond the candidate's first, for a fair decision
    rechecks: list = field(default_factory=list)  # the incumbent's re-runs: Experiments, own rows


def noise_sigma(rows: list[dict], metric: str = "val_bpb") -> float:
    """Run-to-run spread of the metric, from the baseline's repeated runs (0 if there are none)."""
    runs = [r for r in rows if str(r.get("description", "")).startswith(NOISE_PREFIX) and r[metric]]
    values = [r[metric] for r in runs if r["status"] == "discard"]
    kept = [r[metric] for r in runs if r["status"] == "keep"]
    if kept:  # the keep row holds the mean of all the runs: recover the last run's own value
        values.append(len(runs) * kept[0] - sum(values))
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def beats(value: float, best: float, direction: str = "minimize", margin: float = 0.0) -> bool:
    """Does `value` beat `best` by more than `margin`? Lower is better, or higher to maximize."""
    return value > best + margin if direction == "maximize" else value < best - margin


def step(ws: Workspace, agent, on_event: Callable[[Event], None] | None = None,
         stop: threading.Event | None = None, noise_runs: int = 0, z: float = 2.0,
         executor=None, recheck: bool | Guard = True) -> Experiment:
    """Run exactly one experiment (the baseline if none ran yet) and record it.

    `executor` runs one experiment: for GPT `run_training(train_py, settings, run_dir, ...)`
    (the default), for a task workspace `run_task(task, files, run_dir, ...)` (the default).
    recheck: True judges the candidate against the incumbent under the same conditions (the
    module docstring), a fairness.Guard does so with its thresholds, False is upstream's rule.
    """
    loop = _Loop(ws, agent, on_event, stop, executor, noise_runs, z, recheck)
    with _holding(ws):
        _check_pins(ws)
        return loop.step()


def run(ws: Workspace, agent, max_experiments: int | None = None,
        stop: threading.Event | None = None, on_event: Callable[[Event], None] | None = None,
        noise_runs: int = 0, z: float = 2.0, executor=None,
        recheck: bool | Guard = True, parallel: int = 1,
        ray_address: str | None = None) -> list[Experiment]:
    """Run experiments until `max_experiments` are done (None: forever) or `stop` is set.

    Re-checks of the incumbent don't count as experiments: they are in their candidate's
    `Experiment.rechecks`, and `recheck_cost(done)` sums them up.

    parallel: experiments at once. 1 (the default) is the loop above, one at a time. More runs
    waves of that many candidates on Ray (parallel.py; `ray_address` or $RAY_ADDRESS: an
    existing cluster, else a local instance): see the module docstring.
    """
    if parallel > 1:
        from .parallel import Engine
        engine = Engine(parallel, ray_address)
        try:
            engine.check(None if ws.is_task else ws.settings)
            loop = _Loop(ws, agent, on_event, stop, engine.executor, noise_runs, z, recheck, engine)
            log.info("%s", engine.describe())
            loop.emit(Event("parallel", -1, {"describe": engine.describe()}))
            return _run(loop, max_experiments)
        finally:
            engine.close()
    return _run(_Loop(ws, agent, on_event, stop, executor, noise_runs, z, recheck), max_experiments)


def _run(loop: "_Loop", max_experiments: int | None) -> list[Experiment]:
    done: list[Experiment] = []
    with _holding(loop.ws):
        while max_experiments is None or len(done) < max_experiments:
            if loop.stopping:
                break
            _check_pins(loop.ws)
            if loop.engine is not None and loop.ws.best() is not None:  # a wave (the baseline is one run)
                wave = loop.wave(loop.engine.parallel if max_experiments is None
                                 else min(loop.engine.parallel, max_experiments - len(done)))
            else:
                wave = [loop.step()]
            done += [exp for exp in wave if exp.status != "stopped"]
            if any(exp.status == "stopped" for exp in wave):
                break
            failures = sum(1 for _ in itertools.takewhile(
                lambda e: e.reason.startswith(NO_PROPOSAL), reversed(done)))  # in a row, till now
            wait = proposal_retry_delay(failures)
            if wait and (max_experiments is None or len(done) < max_experiments):
                loop.emit(Event("waiting", done[-1].index, {"seconds": wait, "failures": failures,
                                                            "reason": done[-1].reason}))
                if (loop.stop or threading.Event()).wait(wait):  # a stop ends the wait at once
                    break
    return done


def proposal_retry_delay(failures: int) -> float:
    """Seconds to wait after `failures` failed proposals in a row: none after the first (it may
    be bad luck), then 10 s doubling up to PROPOSAL_RETRY_MAX (0.1 s with AUTORESEARCH_QUICK=1)."""
    if failures < 2:
        return 0.0
    return min(PROPOSAL_RETRY_MAX, (0.1 if quick_mode() else 10.0) * 2 ** (failures - 2))


@contextlib.contextmanager
def _holding(ws: Workspace):
    """Hold the workspace (its lock, and results.tsv in memory: see Workspace.hold); a full or
    read-only disk becomes a WorkspaceError saying what to do."""
    sandbox.mode()  # AUTORESEARCH_SANDBOX=1 where none can be made: say so before any commit
    try:
        with ws.hold():
            yield
    except OSError as e:
        raise storage_error(e, ws.path) or e


def _check_pins(ws: Workspace) -> None:
    """Stop before an experiment whose score would not be comparable: the kit's code or the
    evaluation data differ from what the workspace pinned (a train.py may have changed them)."""
    problem = ws.check_pins()
    if problem:
        raise LoopError(problem)


def recheck_cost(done: list[Experiment]) -> dict:
    """What fair comparisons cost over `done` (what `run` returned): extra runs, per kept change."""
    extra = sum(e.extra_runs for e in done)
    kept = sum(e.status == "keep" and e.best_before is not None for e in done)  # not the baseline
    return {"experiments": len(done), "kept": kept, "rechecks": sum(len(e.rechecks) for e in done),
            "extra_runs": extra, "per_kept": extra / kept if kept else float(extra)}


@dataclass
class _Trial:
    """One experiment on its way: its row, what the loop knew when it started, what it tries."""

    index: int  # its row in results.tsv (and logs/NNNN.log)
    rows: list  # results.tsv before it
    best: tuple | None  # (commit, metric) of the best so far; None for the baseline
    t0: float = field(default_factory=time.time)
    proposal: Proposal | None = None
    commit: str = ""
    wave: int | None = None  # its wave, in a parallel loop


@dataclass
class _Loop:
    """What every experiment of one loop shares: the workspace, the agent, how runs are made
    and judged. The loop's steps are its methods, each given the _Trial it works on."""

    ws: Workspace
    agent: object
    on_event: Callable[[Event], None] | None = None
    stop: threading.Event | None = None
    executor: Callable | None = None  # runs one experiment (default: run_training / run_task)
    noise_runs: int = 0
    z: float = 2.0
    recheck: bool | Guard = True
    engine: object = None  # parallel.Engine, for waves

    def emit(self, event: Event) -> None:
        if self.on_event:
            self.on_event(event)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @property
    def agent_name(self) -> str:
        return getattr(self.agent, "name", "?")

    # ------------------------------------------------------------ one experiment

    def step(self) -> Experiment:
        ws = self.ws
        rows, best = ws.results(), ws.best()
        t = _Trial(ws.next_index(), rows, best)
        self.emit(Event("experiment", t.index, {"best": best}))
        if best is None and any(r["status"] == "crash" for r in rows):
            raise LoopError("the baseline crashed (see results.tsv and logs/): the agent needs a "
                            "working baseline to improve on. Pick a smaller preset or budget, check "
                            "the data, then start a new workspace.")
        if best is None:  # the first experiment is always the unmodified baseline
            return self.baseline(t)
        if ws.head() != best[0][:7]:
            ws.reset_to(best[0])
        failed = self.ask(t, self.state(t))
        if failed is not None:
            return failed
        if self.stopping:
            return self.stopped(t)
        t.commit = ws.commit(t.proposal.description, t.proposal.files)
        self.emit(Event("proposal", t.index, {"description": t.proposal.description, "diff": t.proposal.diff,
                                              "commit": t.commit, "usage": t.proposal.usage}))
        result = self.train(t.index)
        if result.status == "stopped":
            return self.stopped(t)
        exp = self.judge(t, result)
        return self.stopped(t) if exp is None else self.record(t, exp)

    def ask(self, t: _Trial, state: State) -> Experiment | None:
        """Ask the agent for t's proposal (into t.proposal); a failure is recorded as its crash
        row and returned. `state` is built by the caller: a damaged workspace is not the agent's
        fault, and must not be recorded as if it were."""
        try:
            t.proposal = _usable(self.agent.propose(state))
        except ProposalError as e:
            return self.no_proposal(t, str(e))
        except Exception as e:  # a bug in the agent; KeyboardInterrupt and SystemExit still stop us
            return self.agent_error(t, e)
        return None

    def judge(self, t: _Trial, result: TrainResult) -> Experiment | None:
        """The candidate's verdict from its first run (re-running what the rule asks for); None
        if the user stopped it.

        Not on a run that had company, if it could be kept: other experiments' code ran on its
        machine while it trained (a wave's other candidates, another loop: `result.beside`), and
        sandboxes on one kernel can still talk (sandbox.py). One could have trained a model and
        handed it over, and this one would score the work of two budgets. So it trains once
        more, alone on its machine (runner.run_training's `alone`), and is judged on that run."""
        first, where = result, result.host or socket.gethostname()
        if first.beside and self.could_keep(t, first):
            self.emit(Event("alone", t.index, {"commit": t.commit, "beside": first.beside,
                                               "host": where, "value": _value(self.ws, first)}))
            result = self.train_again(t, alone=True)
            if result.status == "stopped":
                return None
        exp = self.decide_fairly(t, result) if self.recheck else self.upstream_rule(t, result)
        if exp is not None and result is not first:
            exp.extra_runs += 1
            exp.reason = (f"judged on a run alone (its first run, {self.ws.metric} "
                          f"{_value(self.ws, first):.6g}, had other experiments' code beside it on "
                          f"{where})" + (f": {exp.reason}" if exp.reason else ""))
        return None if exp is None else self.comparable(t, exp)

    def could_keep(self, t: _Trial, result: TrainResult) -> bool:
        """Could `result` be kept, whatever the re-runs its decision asks for turn out to be?"""
        ws = self.ws
        if not result.ok:
            return False
        if self.recheck:
            guard = _guard(self.recheck, t.rows, self.z, ws.metric)
            return guard.could_keep(_reference(ws, t.rows, t.best), Measurement.of_result(result, _sign(ws)))
        return beats(_value(ws, result), t.best[1], ws.direction, self.z * noise_sigma(t.rows, ws.metric))

    def comparable(self, t: _Trial, exp: Experiment) -> Experiment:
        """A keep must have beaten a measurement made on the same kind of device (a parallel loop
        on a cluster of mixed GPUs, a workspace resumed on another machine): else a discard."""
        if exp.status != "keep" or t.best is None or exp.result is None:
            return exp
        reruns = [r.result for r in exp.rechecks if r.result is not None and r.result.ok]
        rows = [r for r in t.rows if r["commit"] == t.best[0] and r["status"] in ("keep", RECHECK)]
        theirs = reruns[-1].device if reruns else (rows[-1].get("device") if rows else None)
        mine = exp.result.device
        if theirs and mine and _device(theirs) != _device(mine):
            exp.status = "discard"
            exp.reason = (f"not comparable: it ran on {_device(mine)}, the best was measured on "
                          f"{_device(theirs)} ({exp.reason}); with fair comparisons on, the best is "
                          "trained again on this device before a keep")
        return exp

    def upstream_rule(self, t: _Trial, result: TrainResult) -> Experiment | None:
        """Keep what scores better than the best's recorded number (beyond z·σ if noise was
        measured, then confirmed by one more run)."""
        ws, best = self.ws, t.best
        sigma, direction = noise_sigma(t.rows, ws.metric), ws.direction
        val = _value(ws, result)
        if result.ok and sigma and beats(val, best[1], direction, self.z * sigma):  # confirm a win once
            again = self.train_again(t)
            if again.status == "stopped":
                return None
            # a crash of the re-run is the experiment's crash (not a discard with val_bpb inf)
            result, val = (result, (val + _value(ws, again)) / 2) if again.ok else (again, None)
        status = ("crash" if not result.ok else "keep" if beats(val, best[1], direction, self.z * sigma)
                  else "discard")
        return Experiment(t.index, t.commit, t.proposal.description, status,
                          val if result.ok else None, best[1], result.reason, t.proposal.diff, result,
                          time.time() - t.t0)

    def baseline(self, t: _Trial) -> Experiment:
        ws, repeats = self.ws, max(1, self.noise_runs)
        noise_done = sum(str(r["description"]).startswith(NOISE_PREFIX) for r in t.rows)
        t.commit = ws.head()
        desc = "baseline" if repeats == 1 else f"{NOISE_PREFIX} {noise_done + 1}/{repeats}"
        t.proposal = Proposal(description=desc, train_py="")
        self.emit(Event("proposal", t.index, {"description": desc, "diff": "", "commit": t.commit,
                                              "usage": {}}))
        result = self.train(t.index)
        if result.status == "stopped":
            return self.stopped(t)
        last = noise_done + 1 >= repeats
        status = "crash" if not result.ok else "keep" if last else "discard"
        val = _value(ws, result)
        if result.ok and repeats > 1 and last:  # keep the mean of all the baseline's runs
            earlier = [r[ws.metric] for r in ws.results() if str(r["description"]).startswith(NOISE_PREFIX)]
            val = statistics.mean(earlier + [val])
        exp = Experiment(t.index, t.commit, desc, status, val if result.ok else None, None,
                         result.reason, "", result, time.time() - t.t0)
        return self.record(t, exp, agent_name="baseline")

    def state(self, t: _Trial, pending: list[str] = ()) -> State:
        """What the agent is shown: program.md, the best files, the results, the last crash."""
        ws, rows, last_crash = self.ws, t.rows, None
        if rows and rows[-1]["status"] == "crash":
            path = ws.log_path(len(rows) - 1)
            last_crash = path.read_text(errors="replace")[-3000:] if path.exists() else rows[-1]["reason"]
            last_crash = redact(last_crash)  # an LLM agent sends it to its server
        info = ws.task_info
        return State(program=ws.program, train_py=ws.train_py, results=rows, best_val_bpb=t.best[1],
                     last_crash_log=last_crash, experiment=t.index, task=info["name"],
                     metric=info["metric"], direction=info["direction"], files=ws.files(),
                     pending=list(pending))

    def train(self, index: int, commit: str | None = None, again: bool = False,
              alone: bool = False) -> TrainResult:
        """Run the workspace's editable files (those of `commit`: the incumbent, for a re-check) as
        row `index`: runs/NNNN, logs/NNNN.log. For GPT `run_training(train_py, settings, ...)`,
        for a task `run_task(task, files, ...)`, unless the loop has an executor.

        again: the same row's second run; its log goes after the first one's in logs/NNNN.log.
        alone: nothing else untrusted runs on its machine meanwhile (a result that had company).
        """
        ws = self.ws
        files = ws.files() if commit is None else {name: ws.show(commit, name) for name in ws.editable}
        first, second = _inputs(ws, files)
        executor = self.executor or (run_task if ws.is_task else run_training)
        log_path = ws.log_path(index)
        first_log = log_path.read_text(errors="replace") if again and log_path.exists() else None
        result = executor(first, second, ws.path / "runs" / f"{index:04d}",
                          on_progress=lambda p: self.emit(Event("progress", index, {"progress": p})),
                          on_line=lambda line: self.emit(Event("line", index, {"line": redact(line)})),
                          stop=self.stop, log_path=log_path,  # where the workspace keeps it, out of the run's reach
                          **({"alone": True} if alone else {}))
        self.finish_log(index, result, first_log, "trained again, alone on its machine" if alone else "trained again")
        return result

    def train_again(self, t: _Trial, alone: bool = False) -> TrainResult:
        """t's candidate once more, as its own row (a wave's candidate is not on the branch: its
        commit); see train for `alone`. What it returns can decide the keep (noise-aware keeping
        averages it in, fair comparisons may pick it), so a run that had company is replaced by
        one alone, for the reason judge gives."""
        commit = t.commit if t.wave is not None else None
        result = self.train(t.index, commit=commit, again=True, alone=alone)
        if result.ok and result.beside:
            result = self.train(t.index, commit=commit, again=True, alone=True)
        return result

    def finish_log(self, index: int, result: TrainResult, first_log: str | None = None,
                   heading: str = "trained again") -> None:
        """Redact what a run printed (a key it found, say): the runner redacts what it captures;
        this also covers any other executor. A row's second run goes after its first in the log."""
        result.reason, result.error_tail = redact(result.reason), redact(result.error_tail)
        path = self.ws.log_path(index)
        text = path.read_text(errors="replace") if path.exists() else ""
        if first_log is not None:
            text = f"{first_log}\n=== the same code, {heading} ===\n{text}"
        if redact(text) != text or first_log is not None:
            write_atomic(path, redact(text).encode())
        self.emit(Event("result", index, {"result": result}))

    # ------------------------------------------------------------ fair comparisons (fairness.py)

    def decide_fairly(self, t: _Trial, result: TrainResult) -> Experiment | None:
        """Judge the candidate against the incumbent under the same conditions (see fairness.py):
        train the incumbent again (rows index+1, ...) when the guard asks, then decide on the pair."""
        guard = _guard(self.recheck, t.rows, self.z, self.ws.metric)
        reference = _reference(self.ws, t.rows, t.best)
        runs = self.fair_runs(t, guard, reference, result)
        return None if runs is None else self.fair_experiment(t, guard, reference, runs)

    def fair_runs(self, t: _Trial, guard: Guard, reference: Measurement, result: TrainResult) -> dict | None:
        """Train what the guard asks for beside the candidate's first run; None if the user stopped.

        Returns {"candidate": (results, measurements), "incumbent": (results, measurements),
        "why": why each incumbent run was made}.
        """
        sign = _sign(self.ws)
        runs = {"candidate": ([result], [Measurement.of_result(result, sign)]), "incumbent": ([], []),
                "why": []}
        while plan := guard.next_run(reference, runs["candidate"][1], runs["incumbent"][1]):
            what, why = plan
            if what == "incumbent":  # rows index+1, index+2: right after the candidate's own
                runs["why"].append(why)
                row = t.index + len(runs["why"])
                self.emit(Event("recheck", row, {"commit": t.best[0], "why": why, "candidate": t.index,
                                                 "headline": _headline(why, t.rows, t.best)}))
                again = self.train(row, commit=t.best[0])
            else:  # the pair saw two machines: the candidate again, as the same row
                again = self.train_again(t)
            if again.status == "stopped":
                return None
            runs[what][0].append(again)
            runs[what][1].append(Measurement.of_result(again, sign))
        return runs

    def fair_experiment(self, t: _Trial, guard: Guard, reference: Measurement, runs) -> Experiment:
        """The candidate's Experiment from its runs and the incumbent's, with the re-checks' rows."""
        ws, index = self.ws, t.index
        (candidate, measured), (reruns, remeasured) = runs["candidate"], runs["incumbent"]
        crashed = [r for r in candidate if not r.ok]  # a crash of its second run is its crash too
        if crashed:
            shown, verdict = crashed[0], None
        else:
            shown = candidate[measured.index(decisive(measured))]
            verdict = guard.decide(reference, measured, remeasured)
        status = "crash" if verdict is None else "keep" if verdict.keep else "discard"
        reason = shown.reason if verdict is None else verdict.reason
        if reruns and verdict is not None:
            reason = f"against the best's re-run {' and '.join(f'#{index + 1 + k}' for k in range(len(reruns)))}: {reason}"
        ran = [m for m in remeasured if m.ok]
        against = min(ran, key=lambda m: m.value) if ran else reference
        seconds = time.time() - t.t0 - sum(r.wall_seconds for r in reruns)  # theirs are in their rows
        exp = Experiment(index, t.commit, t.proposal.description, status, _value(ws, shown),
                         _sign(ws) * against.value, reason, t.proposal.diff, shown, seconds,
                         extra_runs=len(candidate) + len(reruns) - 1)
        exp.rechecks = [self.recheck_experiment(t, k, reference, rerun, why)
                        for k, (rerun, why) in enumerate(zip(reruns, runs["why"]))]
        return exp

    def recheck_experiment(self, t: _Trial, k: int, reference: Measurement, result: TrainResult,
                           why: str) -> Experiment:
        """The row of the incumbent's k-th re-run for #index: its commit, the new measurement, why."""
        status = RECHECK if result.ok else "crash"
        reason = why if result.ok else f"{why}; the re-run crashed: {result.reason}"
        best = t.best[0]
        return Experiment(t.index + 1 + k, best, f"{RECHECK} {best}: the best so far, trained again "
                          f"beside #{t.index}", status, _value(self.ws, result) if result.ok else None,
                          _sign(self.ws) * reference.value, reason, "", result, result.wall_seconds)

    # ------------------------------------------------------------ endings

    def no_proposal(self, t: _Trial, problem: str) -> Experiment:
        """Record a failed proposal as a crash row (nothing was committed) and move on."""
        problem = redact(problem)
        exp = Experiment(t.index, self.ws.head(), f"proposal failed: {problem}"[:200], "crash",
                         best_before=t.best[1], reason=f"{NO_PROPOSAL}{problem}"[:300],
                         seconds=time.time() - t.t0)
        return self.record(t, exp)

    def agent_error(self, t: _Trial, error: Exception) -> Experiment:
        """An unexpected exception in agent.propose: a crash row, unless it keeps happening."""
        name = self.agent_name
        problem = f"{AGENT_ERROR}{type(error).__name__}: {error}"
        log.warning("agent %s raised an unexpected error:\n%s", name, redact(traceback.format_exc()))
        exp = self.no_proposal(t, problem)
        recent = [r["reason"] for r in self.ws.results()[-MAX_AGENT_ERRORS:]]
        if len(recent) == MAX_AGENT_ERRORS and all(r.startswith(NO_PROPOSAL + AGENT_ERROR) for r in recent):
            raise LoopError(f"the agent {name!r} failed with an unexpected error {MAX_AGENT_ERRORS} times "
                            f"in a row, the last: {redact(problem)[:300]}. That is a bug in the agent "
                            "or its set-up (e.g. a base_url that serves a web page, not an API), not a "
                            "bad proposal: fix it, then resume. Each failure is a crash row in "
                            "results.tsv and its traceback was logged as a warning.") from None
        return exp

    def stopped(self, t: _Trial) -> Experiment:
        if t.best is not None:
            self.ws.reset_to(t.best[0])
        description = t.proposal.description if t.proposal else ""
        self.emit(Event("stopped", t.index, {"description": description}))
        return Experiment(t.index, self.ws.head(), description, "stopped", reason="stopped by the user")

    def record(self, t: _Trial, exp: Experiment, agent_name: str | None = None) -> Experiment:
        """Write the row (and its re-checks') first, then undo a non-kept commit: a kill in
        between is repaired on open. A wave's candidates were never on the branch: a kept one
        moves it forward (its parent is the best)."""
        ws, best = self.ws, t.best
        base = best[0] if t.wave is not None else exp.commit  # where HEAD must be now
        tampered = _tampered(ws, exp, base)
        usage = t.proposal.usage if t.proposal else {}
        ws.append_result(_row(ws, exp, agent_name or self.agent_name, usage, t.wave))
        for recheck in exp.rechecks:  # after the candidate's row: rows and logs/NNNN.log stay in step
            ws.append_result(_row(ws, recheck, RECHECK, {}, t.wave))
        if t.commit and not exp.reason.startswith(NO_PROPOSAL):
            ws.mark_tried(exp.index, t.commit)  # refs/autoresearch/tried/NNNN: its diff stays there
        if exp.status == "keep" and t.wave is not None:
            ws.reset_to(exp.commit)
        elif exp.status != "keep" and best is not None:
            ws.reset_to(best[0])
        elif tampered and best is None:  # the baseline's own run moved HEAD: back to the baseline
            ws.reset_to(exp.commit)
        self.emit(Event("decision", exp.index, {"status": exp.status, "val_bpb": exp.val_bpb,
                                                "metric": ws.metric, "best": best[1] if best else None,
                                                "commit": exp.commit, "description": exp.description,
                                                "reason": exp.reason, "experiment": exp, "wave": t.wave}))
        return exp

    # ------------------------------------------------------------ waves (parallel > 1)

    def wave(self, size: int) -> list[Experiment]:
        """One wave: `size` distinct candidates from the best commit, run at once on Ray; each
        result is recorded as it arrives, except the wave's leader, which is judged (with
        re-runs, fair or noise-aware, as one experiment would be) when the wave is done."""
        ws = self.ws
        rows, best = ws.results(), ws.best()
        if ws.head() != best[0][:7]:
            ws.reset_to(best[0])
        number = 1 + max((int(r["wave"]) for r in rows if r.get("wave") not in (None, "")), default=0)
        done, trials = self.propose_wave(rows, best, number, size)
        if not trials or self.stopping:
            return done + ([self.stopped(trials[0])] if trials else [])
        self.emit(Event("wave", ws.next_index(), {"wave": number, "candidates": [
            {"slot": k, "commit": t.commit, "description": t.proposal.description,
             "diff": t.proposal.diff} for k, t in enumerate(trials)]}))
        jobs = {}
        for k, t in enumerate(trials):
            first, second = _inputs(ws, {n: ws.show(t.commit, n) for n in ws.editable})
            jobs[k] = self.engine.submit(
                first, second,
                on_progress=lambda p, k=k: self.emit(Event("progress", -1, {"progress": p, "slot": k, "wave": number})),
                on_line=lambda line, k=k: self.emit(Event("line", -1, {"line": redact(line), "slot": k, "wave": number})),
                on_start=lambda w, k=k: self.emit(Event("started", -1, {"slot": k, "wave": number, **w})))
        leader = None  # (trial, result, log text) of the best result so far in this wave
        try:
            while jobs:
                if self.stopping:
                    self.engine.cancel(list(jobs.values()))
                    jobs = {}
                    break
                for job in self.engine.wait(list(jobs.values()), on_waiting=self._waiting):
                    k = next(k for k, j in jobs.items() if j is job)
                    del jobs[k]
                    result, text = self.engine.result(job)
                    result.reason, result.error_tail = redact(result.reason), redact(result.error_tail)
                    self.emit(Event("result", -1, {"result": result, "slot": k, "wave": number}))
                    leader = self.arrived(trials[k], result, text, leader, done)
        except BaseException:  # Ctrl-C, or an error: nothing of the wave may go on running
            self.engine.cancel(list(jobs.values()))
            raise
        if leader is not None:
            t, result, text = leader
            self.take_row(t, text)
            if self.stopping:  # not judged: a row all the same, so nothing is lost
                done.append(self.record(t, self.wave_discard(t, result, "the loop was stopped before "
                                                             "its wave was judged")))
            else:
                exp = self.judge(t, result)
                done.append(self.record(t, exp if exp is not None else self.wave_discard(
                    t, result, "stopped while it was re-checked")))
        if self.stopping:
            done.append(Experiment(ws.next_index(), ws.head(), "", "stopped", reason="stopped by the user"))
            self.emit(Event("stopped", ws.next_index(), {"description": f"wave {number}"}))
        return done

    def propose_wave(self, rows, best, number: int, size: int) -> tuple[list[Experiment], list[_Trial]]:
        """Ask the agent for `size` distinct candidates, none a repeat of one tried before; each
        is committed and the branch put back at once (the candidates live under tried refs).
        A failed proposal is its crash row, as in the serial loop."""
        ws, done, trials = self.ws, [], []
        seen = ws.trees(r["commit"] for r in rows if r.get("commit")) | ws.trees(ws.tried().values())
        for slot in range(size):
            repeated = []
            for attempt in range(REPEAT_TRIES):
                t = _Trial(ws.next_index() + slot, ws.results(), best, wave=number)
                state = self.state(t, pending=[x.proposal.description for x in trials])
                t.index = ws.next_index()  # its row, should the proposal fail (recorded at once)
                failed = self.ask(t, state)
                if failed is not None:
                    done.append(failed)
                    break
                t.commit = ws.commit(t.proposal.description, t.proposal.files)
                tree = ws.trees([t.commit])
                ws.reset_to(best[0])
                if tree & seen:  # the same files as an experiment tried before: ask again
                    repeated.append(t.proposal.description)
                    continue
                seen |= tree
                trials.append(t)
                break
            else:  # only repeats: a failed proposal, so a stuck agent backs off as in the serial loop
                done.append(self.no_proposal(t, f"the agent proposed only experiments already "
                                                f"tried ({'; '.join(repeated)[:150]}), {REPEAT_TRIES} "
                                                "times: a wave runs distinct, new candidates"))
            if self.stopping:
                break
        return done, trials

    def arrived(self, t: _Trial, result: TrainResult, text: str, leader, done: list) -> tuple | None:
        """A wave's result: a crash or a loser is recorded now; the best so far waits to be judged."""
        value = _value(self.ws, result)
        if result.ok and (leader is None or beats(value, _value(self.ws, leader[1]), self.ws.direction)):
            if leader is not None:
                old_t, old_result, old_text = leader
                self.take_row(old_t, old_text)
                done.append(self.record(old_t, self.wave_discard(
                    old_t, old_result, f"wave {t.wave}: {t.commit} did better ({self.ws.metric} {value:.6g})")))
            return t, result, text
        self.take_row(t, text)
        if result.ok:
            reason = (f"wave {t.wave}: {leader[0].commit} did better "
                      f"({self.ws.metric} {_value(self.ws, leader[1]):.6g})")
            done.append(self.record(t, self.wave_discard(t, result, reason)))
        else:
            done.append(self.record(t, Experiment(t.index, t.commit, t.proposal.description, "crash",
                                                  None, t.best[1], result.reason, t.proposal.diff,
                                                  result, time.time() - t.t0)))
        return leader

    def take_row(self, t: _Trial, text: str) -> None:
        """Give a finished candidate the next row and write its log there (logs/NNNN.log)."""
        t.index, t.rows = self.ws.next_index(), self.ws.results()
        write_atomic(self.ws.log_path(t.index), redact(text).encode("utf-8", "replace"))

    def wave_discard(self, t: _Trial, result: TrainResult, reason: str) -> Experiment:
        return Experiment(t.index, t.commit, t.proposal.description, "discard", _value(self.ws, result),
                          t.best[1], reason, t.proposal.diff, result, time.time() - t.t0)

    def _waiting(self, message: str) -> None:
        log.warning("%s", message)
        self.emit(Event("waiting", -1, {"seconds": 0, "failures": 0, "reason": message}))


def _device(name: str) -> str:
    """A device's name as rows and summaries write it ("NVIDIA_H200" is "NVIDIA H200")."""
    return str(name).replace("_", " ").strip()


def _inputs(ws: Workspace, files: dict) -> tuple:
    """What an executor is given for these editable files: (train.py, settings) for GPT, else
    (task, files)."""
    if ws.is_task:
        return ws.task, files
    settings = ws.settings
    settings.checkpoint = None  # experiments are judged by their number, not kept as models
    return files["train.py"], settings


def _tampered(ws: Workspace, exp: Experiment, head: str) -> bool:
    """Did something change the loop's records during the experiment? Then it is a crash.

    results.tsv must be exactly what the loop last wrote (else it is put back and the foreign
    lines kept in results.rejected.tsv), the kit's code and data as pinned (the next experiment
    then stops), and HEAD still `head` (the commit under test; a wave's base): a training
    script that appends a `keep` row, edits the harness or commits on the branch is never kept.
    """
    pins_problem = ws.check_pins()
    problems = [ws.restore_results(), pins_problem and pins_problem.split(". ")[0]]
    if ws.head() != head[:7]:
        problems.append(f"HEAD moved during the run (to {ws.head()}, not {head[:7]})")
    problems = [p for p in problems if p]
    if problems:
        exp.status, exp.val_bpb = "crash", None
        exp.reason = "tampered: " + "; ".join(problems)
        log.warning("experiment %d: %s", exp.index, exp.reason)
    return bool(problems)


def _guard(recheck: bool | Guard, rows: list[dict], z: float, metric: str = "val_bpb") -> Guard:
    """The guard for this decision: the caller's thresholds, with σ from noise_runs if measured."""
    guard = recheck if isinstance(recheck, Guard) else Guard()
    sigma = noise_sigma(rows, metric)
    return dataclasses.replace(guard, sigma=sigma, z=z) if sigma else guard


def _sign(ws) -> int:
    """Fairness scores are "lower is better": a metric to maximize is negated for them."""
    return -1 if ws.direction == "maximize" else 1


def _reference(ws, rows: list[dict], best: tuple[str, float]) -> Measurement:
    """The incumbent's last measurement (its keep row, or a later recheck row) and its conditions."""
    mine = [r for r in rows if r["commit"] == best[0] and r["status"] in ("keep", RECHECK)]
    sign = _sign(ws)
    reference = Measurement.of_row(mine[-1], ws.metric, sign) if mine else Measurement(sign * best[1])
    reference.value = sign * best[1]  # a noise-aware baseline's keep row holds the mean of its runs
    return reference


def _headline(why: str, rows: list[dict], best) -> str:
    """The re-check's reason in a few words, for a status line."""
    kept = [r for r in rows if r["status"] == "keep"]
    what = "the baseline" if len(kept) == 1 else f"the best ({best[0]})"
    for word in ("busier", "quieter"):
        if f"machine {word}" in why:
            return f"machine {word} than during {what}: re-checking"
    return f"{why.split(' (')[0]}: re-checking {what}"


def _usable(proposal) -> Proposal:
    """The agent's proposal with a clean one-line description, or ProposalError saying why not."""
    if not isinstance(proposal, Proposal):
        raise ProposalError(f"the agent returned {type(proposal).__name__}, not a Proposal")
    for name, text in proposal.files.items():
        if not isinstance(text, str):
            raise ProposalError(f"the agent's proposal holds {name} as "
                                f"{type(text).__name__}, not text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ProposalError(f"the new {name} is not valid text ({e.reason} at character "
                                f"{e.start}): it can't be saved") from None
    proposal.description = redact(" ".join(one_line(str(proposal.description)).split())) or "experiment"
    if not isinstance(proposal.usage, dict):
        proposal.usage = {}
    return proposal


def _value(ws, result: TrainResult) -> float | None:
    """The number an experiment is judged by: val_bpb for GPT, the task's metric otherwise."""
    return result.metric if ws.is_task else result.val_bpb


def _row(ws, exp: Experiment, agent_name: str, usage: dict, wave: int | None = None) -> dict:
    """An experiment as a results.tsv row, with the conditions it ran under."""
    r = exp.result
    return {
        "commit": exp.commit, ws.metric: exp.val_bpb or 0.0,
        "memory_gb": r.memory_gb if r and exp.status != "crash" else 0.0,
        "status": exp.status, "description": exp.description,
        "seconds": exp.seconds, "steps": r.num_steps if r else 0,
        "tokens_M": r.total_tokens_M if r else 0.0, "agent": agent_name,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0), "reason": redact(exp.reason),
        "tok_per_sec": r.tokens_per_second if r else None,
        "params_M": r.num_params_M if r else None,
        "flops_per_token": r.flops_per_token if r else None,
        "load": r.load_avg if r else None, "sandbox": r.sandbox if r else None,
        "host": (r.host or socket.gethostname()) if r else None,
        "device": (r.device or None) if r else None, "wave": wave}
