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
    with _holding(ws):
        _check_pins(ws)
        return _step(ws, agent, on_event or (lambda e: None), stop, noise_runs, z, executor, recheck)


def run(ws: Workspace, agent, max_experiments: int | None = None,
        stop: threading.Event | None = None, on_event: Callable[[Event], None] | None = None,
        noise_runs: int = 0, z: float = 2.0, executor=None,
        recheck: bool | Guard = True) -> list[Experiment]:
    """Run experiments until `max_experiments` are done (None: forever) or `stop` is set.

    Re-checks of the incumbent don't count as experiments: they are in their candidate's
    `Experiment.rechecks`, and `recheck_cost(done)` sums them up.
    """
    emit = on_event or (lambda e: None)
    done: list[Experiment] = []
    with _holding(ws):
        while max_experiments is None or len(done) < max_experiments:
            if stop is not None and stop.is_set():
                break
            _check_pins(ws)
            exp = _step(ws, agent, emit, stop, noise_runs, z, executor, recheck)
            if exp.status == "stopped":
                break
            done.append(exp)
            failures = sum(1 for _ in itertools.takewhile(
                lambda e: e.reason.startswith(NO_PROPOSAL), reversed(done)))  # in a row, till now
            wait = proposal_retry_delay(failures)
            if wait and (max_experiments is None or len(done) < max_experiments):
                emit(Event("waiting", exp.index, {"seconds": wait, "failures": failures,
                                                  "reason": exp.reason}))
                if (stop or threading.Event()).wait(wait):  # a stop ends the wait at once
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


def _step(ws, agent, emit, stop, noise_runs, z, executor, recheck=True) -> Experiment:
    t0 = time.time()
    rows, index = ws.results(), ws.next_index()
    best = ws.best()
    emit(Event("experiment", index, {"best": best}))
    noise_done = sum(str(r["description"]).startswith(NOISE_PREFIX) for r in rows)
    if best is None and any(r["status"] == "crash" for r in rows):
        raise LoopError("the baseline crashed (see results.tsv and logs/): the agent needs a "
                        "working baseline to improve on. Pick a smaller preset or budget, check "
                        "the data, then start a new workspace.")
    if best is None:  # the first experiment is always the unmodified baseline
        return _baseline(ws, index, emit, stop, executor, noise_runs, noise_done, t0)
    if ws.head() != best[0][:7]:
        ws.reset_to(best[0])
    state = _state(ws, rows, best, index)
    try:
        proposal = _usable(agent.propose(state))
    except ProposalError as e:
        return _no_proposal(ws, index, emit, best, agent, t0, str(e))
    except Exception as e:  # a bug in the agent; KeyboardInterrupt and SystemExit still stop us
        return _agent_error(ws, index, emit, best, agent, t0, e)
    if stop is not None and stop.is_set():
        return _stopped(ws, index, emit, best, proposal.description)
    commit = ws.commit(proposal.description, proposal.files)
    emit(Event("proposal", index, {"description": proposal.description, "diff": proposal.diff,
                                   "commit": commit, "usage": proposal.usage}))
    result = _train(ws, index, emit, stop, executor)
    if result.status == "stopped":
        return _stopped(ws, index, emit, best, proposal.description)
    if recheck:
        guard = _guard(recheck, rows, z, ws.metric)
        return _decide_fairly(ws, index, emit, stop, executor, guard, rows, best, agent, proposal,
                              commit, result, t0)
    sigma, direction = noise_sigma(rows, ws.metric), ws.direction
    val = _value(ws, result)
    if result.ok and sigma and beats(val, best[1], direction, z * sigma):  # confirm a win once
        again = _train(ws, index, emit, stop, executor)
        if again.status == "stopped":
            return _stopped(ws, index, emit, best, proposal.description)
        # a crash of the re-run is the experiment's crash (not a discard with val_bpb inf)
        result, val = (result, (val + _value(ws, again)) / 2) if again.ok else (again, None)
    status = ("crash" if not result.ok else "keep" if beats(val, best[1], direction, z * sigma)
              else "discard")
    exp = Experiment(index, commit, proposal.description, status,
                     val if result.ok else None, best[1], result.reason, proposal.diff, result,
                     time.time() - t0)
    return _record(ws, index, emit, exp, best, getattr(agent, "name", "?"), proposal)


def _tampered(ws: Workspace, exp: Experiment) -> bool:
    """Did something change the loop's records during the experiment? Then it is a crash.

    results.tsv must be exactly what the loop last wrote (else it is put back and the foreign
    lines kept in results.rejected.tsv), the kit's code and data as pinned (the next experiment
    then stops), and HEAD still the commit under test: a training script that appends a `keep`
    row, edits the harness or commits on the branch is never kept.
    """
    pins_problem = ws.check_pins()
    problems = [ws.restore_results(), pins_problem and pins_problem.split(". ")[0]]
    if ws.head() != exp.commit[:7]:
        problems.append(f"HEAD moved during the run (to {ws.head()}, not {exp.commit[:7]})")
    problems = [p for p in problems if p]
    if problems:
        exp.status, exp.val_bpb = "crash", None
        exp.reason = "tampered: " + "; ".join(problems)
        log.warning("experiment %d: %s", exp.index, exp.reason)
    return bool(problems)


def recheck_cost(done: list[Experiment]) -> dict:
    """What fair comparisons cost over `done` (what `run` returned): extra runs, per kept change."""
    extra = sum(e.extra_runs for e in done)
    kept = sum(e.status == "keep" and e.best_before is not None for e in done)  # not the baseline
    return {"experiments": len(done), "kept": kept, "rechecks": sum(len(e.rechecks) for e in done),
            "extra_runs": extra, "per_kept": extra / kept if kept else float(extra)}


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


def _decide_fairly(ws, index, emit, stop, executor, guard: Guard, rows, best, agent, proposal,
                   commit, result, t0) -> Experiment:
    """Judge the candidate against the incumbent under the same conditions (see fairness.py):
    train the incumbent again (rows index+1, ...) when the guard asks, then decide on the pair."""
    reference = _reference(ws, rows, best)
    runs = _fair_runs(ws, index, emit, stop, executor, guard, rows, best, reference, result)
    if runs is None:
        return _stopped(ws, index, emit, best, proposal.description)
    exp = _fair_experiment(ws, index, commit, proposal, guard, best, reference, runs, t0)
    return _record(ws, index, emit, exp, best, getattr(agent, "name", "?"), proposal)


def _fair_experiment(ws, index, commit, proposal, guard: Guard, best, reference: Measurement, runs,
                     t0) -> Experiment:
    """The candidate's Experiment from its runs and the incumbent's, with the re-checks' rows."""
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
    seconds = time.time() - t0 - sum(r.wall_seconds for r in reruns)  # theirs are in their rows
    sign = _sign(ws)
    exp = Experiment(index, commit, proposal.description, status, _value(ws, shown), sign * against.value,
                     reason, proposal.diff, shown, seconds, extra_runs=len(candidate) + len(reruns) - 1)
    exp.rechecks = [_recheck_experiment(ws, index, k, best, reference, rerun, why)
                    for k, (rerun, why) in enumerate(zip(reruns, runs["why"]))]
    return exp


def _fair_runs(ws, index, emit, stop, executor, guard: Guard, rows, best, reference,
               result) -> dict | None:
    """Train what the guard asks for beside the candidate's first run; None if the user stopped.

    Returns {"candidate": (results, measurements), "incumbent": (results, measurements),
    "why": why each incumbent run was made}.
    """
    sign = _sign(ws)
    runs = {"candidate": ([result], [Measurement.of_result(result, sign)]), "incumbent": ([], []),
            "why": []}
    while plan := guard.next_run(reference, runs["candidate"][1], runs["incumbent"][1]):
        what, why = plan
        if what == "incumbent":  # rows index+1, index+2: right after the candidate's own
            runs["why"].append(why)
            row = index + len(runs["why"])
            emit(Event("recheck", row, {"commit": best[0], "why": why, "candidate": index,
                                        "headline": _headline(why, rows, best)}))
            again = _train(ws, row, emit, stop, executor, commit=best[0])
        else:  # the pair saw two machines: the candidate again, as the same row
            again = _train(ws, index, emit, stop, executor, again=True)
        if again.status == "stopped":
            return None
        runs[what][0].append(again)
        runs[what][1].append(Measurement.of_result(again, sign))
    return runs


def _recheck_experiment(ws, index, k, best, reference: Measurement, result: TrainResult,
                        why: str) -> Experiment:
    """The row of the incumbent's k-th re-run for #index: its commit, the new measurement, why."""
    status = RECHECK if result.ok else "crash"
    reason = why if result.ok else f"{why}; the re-run crashed: {result.reason}"
    return Experiment(index + 1 + k, best[0], f"{RECHECK} {best[0]}: the best so far, trained again "
                      f"beside #{index}", status, _value(ws, result) if result.ok else None,
                      _sign(ws) * reference.value, reason, "", result, result.wall_seconds)


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


def _no_proposal(ws, index, emit, best, agent, t0, problem: str) -> Experiment:
    """Record a failed proposal as a crash row (nothing was committed) and move on."""
    problem = redact(problem)
    exp = Experiment(index, ws.head(), f"proposal failed: {problem}"[:200], "crash",
                     best_before=best[1], reason=f"{NO_PROPOSAL}{problem}"[:300], seconds=time.time() - t0)
    return _record(ws, index, emit, exp, best, agent_name=getattr(agent, "name", "?"))


def _agent_error(ws, index, emit, best, agent, t0, error: Exception) -> Experiment:
    """An unexpected exception in agent.propose: a crash row, unless it keeps happening."""
    name = getattr(agent, "name", "?")
    problem = f"{AGENT_ERROR}{type(error).__name__}: {error}"
    log.warning("agent %s raised an unexpected error:\n%s", name, redact(traceback.format_exc()))
    exp = _no_proposal(ws, index, emit, best, agent, t0, problem)
    recent = [r["reason"] for r in ws.results()[-MAX_AGENT_ERRORS:]]
    if len(recent) == MAX_AGENT_ERRORS and all(r.startswith(NO_PROPOSAL + AGENT_ERROR) for r in recent):
        raise LoopError(f"the agent {name!r} failed with an unexpected error {MAX_AGENT_ERRORS} times "
                        f"in a row, the last: {redact(problem)[:300]}. That is a bug in the agent "
                        "or its set-up (e.g. a base_url that serves a web page, not an API), not a "
                        "bad proposal: fix it, then resume. Each failure is a crash row in "
                        "results.tsv and its traceback was logged as a warning.") from None
    return exp


def _baseline(ws, index, emit, stop, executor, noise_runs, noise_done, t0) -> Experiment:
    commit = ws.head()
    repeats = max(1, noise_runs)
    desc = "baseline" if repeats == 1 else f"{NOISE_PREFIX} {noise_done + 1}/{repeats}"
    emit(Event("proposal", index, {"description": desc, "diff": "", "commit": commit, "usage": {}}))
    result = _train(ws, index, emit, stop, executor)
    if result.status == "stopped":
        return _stopped(ws, index, emit, None, desc)
    last = noise_done + 1 >= repeats
    status = "crash" if not result.ok else "keep" if last else "discard"
    val = _value(ws, result)
    if result.ok and repeats > 1 and last:  # keep the mean of all the baseline's runs
        earlier = [r[ws.metric] for r in ws.results() if str(r["description"]).startswith(NOISE_PREFIX)]
        val = statistics.mean(earlier + [val])
    exp = Experiment(index, commit, desc, status, val if result.ok else None, None,
                     result.reason, "", result, time.time() - t0)
    return _record(ws, index, emit, exp, None, "baseline")


def _state(ws, rows, best, index) -> State:
    last_crash = None
    if rows and rows[-1]["status"] == "crash":
        log = ws.log_path(len(rows) - 1)
        last_crash = log.read_text(errors="replace")[-3000:] if log.exists() else rows[-1]["reason"]
        last_crash = redact(last_crash)  # an LLM agent sends it to its server
    info = ws.task_info
    return State(program=ws.program, train_py=ws.train_py, results=rows, best_val_bpb=best[1],
                 last_crash_log=last_crash, experiment=index, task=info["name"],
                 metric=info["metric"], direction=info["direction"], files=ws.files())


def _value(ws, result: TrainResult) -> float | None:
    """The number an experiment is judged by: val_bpb for GPT, the task's metric otherwise."""
    return result.metric if ws.is_task else result.val_bpb


def _train(ws, index, emit, stop, executor, commit: str | None = None,
           again: bool = False) -> TrainResult:
    """Run the workspace's editable files (those of `commit`: the incumbent, for a re-check) as
    row `index`: runs/NNNN, logs/NNNN.log. For GPT `run_training(train_py, settings, ...)`, for a
    task `run_task(task, files, ...)`, unless `executor` is given.

    again: the same row's second run; its log goes after the first one's in logs/NNNN.log.
    """
    files = ws.files() if commit is None else {name: ws.show(commit, name) for name in ws.editable}
    if ws.is_task:  # the task's editable files, run by its command (tasks.run_task)
        first, second = ws.task, files
        executor = executor or run_task
    else:
        first, second = files["train.py"], ws.settings
        second.checkpoint = None  # experiments are judged by their number, not kept as models
        executor = executor or run_training
    log = ws.log_path(index)
    first_log = log.read_text(errors="replace") if again and log.exists() else None
    result = executor(first, second, ws.path / "runs" / f"{index:04d}",
                      on_progress=lambda p: emit(Event("progress", index, {"progress": p})),
                      on_line=lambda line: emit(Event("line", index, {"line": redact(line)})), stop=stop,
                      log_path=ws.log_path(index))  # where the workspace keeps it, out of the run's reach
    # a run may print a key it found (in a file, say): what the loop keeps and shows is redacted
    # (the runner redacts what it captures; this also covers any other executor)
    result.reason, result.error_tail = redact(result.reason), redact(result.error_tail)
    log = ws.log_path(index)
    text = log.read_text(errors="replace") if log.exists() else ""
    if first_log is not None:  # the second run of the row: after the first one's log
        text = f"{first_log}\n=== the same code, trained again ===\n{text}"
    if redact(text) != text or first_log is not None:
        write_atomic(log, redact(text).encode())
    emit(Event("result", index, {"result": result}))
    return result


def _stopped(ws, index, emit, best, description) -> Experiment:
    if best is not None:
        ws.reset_to(best[0])
    emit(Event("stopped", index, {"description": description}))
    return Experiment(index, ws.head(), description, "stopped", reason="stopped by the user")


def _record(ws, index, emit, exp: Experiment, best, agent_name: str,
            proposal: Proposal | None = None) -> Experiment:
    """Write the row (and its re-checks') first, then undo a non-kept commit: a kill in between
    is repaired on open."""
    tampered = _tampered(ws, exp)
    usage = proposal.usage if proposal else {}
    ws.append_result(_row(ws, exp, agent_name, usage))
    for recheck in exp.rechecks:  # after the candidate's row: rows and logs/NNNN.log stay in step
        ws.append_result(_row(ws, recheck, RECHECK, {}))
    if exp.status != "keep" and best is not None:
        ws.reset_to(best[0])
    elif tampered and best is None:  # the baseline's own run moved HEAD: back to the baseline
        ws.reset_to(exp.commit)
    emit(Event("decision", index, {"status": exp.status, "val_bpb": exp.val_bpb, "metric": ws.metric,
                                   "best": best[1] if best else None, "commit": exp.commit,
                                   "description": exp.description, "reason": exp.reason,
                                   "experiment": exp}))
    return exp


def _row(ws, exp: Experiment, agent_name: str, usage: dict) -> dict:
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
        "load": r.load_avg if r else None, "sandbox": r.sandbox if r else None}
