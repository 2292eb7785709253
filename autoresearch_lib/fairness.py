"""Fair comparisons on a busy machine: a kept change must beat the best under the same conditions.

With a fixed wall-clock budget the score depends on how busy the machine is: a run that shares
the CPU (or GPU) with other work trains fewer steps and scores worse. Compare a change measured
now with a best measured minutes ago, on a machine that has got quieter since, and a change
that did nothing looks like a win. So before a candidate is kept, the loop runs the incumbent
(the best commit) again, right after the candidate, and decides on the pair.

Each run is a `Measurement`: its score and the conditions it ran under (tokens per second, the
model's size, the machine's load where it is known, and how steady its speed was from step to
step). For an unchanged model size, throughput measures the machine: a 30 % faster run means a
30 % quieter machine. A run whose speed jumped about from step to step (`jitter` above
`unsteady`) shared the machine with work that came and went while it trained: its score is less
certain, so its tie band is wider (`tie_unsteady`). `Guard` decides:

- `why_recheck`: does the incumbent's last measurement still say how it would score now? Not
  when the candidate ran more than `speed` faster (it may owe its win to a quieter machine) or
  slower (it may hide a real gain behind a busier one: re-checked unless it lost by more than
  the lost speed can explain); not when the model's size changed (its speed then says nothing
  about the machine) and it wins; not for a win within `margin` of the tie band (a load change
  too small to see in the throughput can explain that much).
- `judge(candidate, incumbent)`: keep when the candidate beats the incumbent by more than the
  tie band: the spread of two runs of the same code under the same conditions (`tie`, or
  z·σ·√2 with σ from noise_runs; at least `tie_unsteady` for an unsteady run), plus, if the
  candidate ran faster (the same model), what that extra speed is worth at the steepest
  measured (`margin` per `speed`). The incumbent is its re-run when there was one, else its
  last measurement. A parallel wave can call it for each of its candidates against one re-run
  of the incumbent in the same wave. The price: a change whose only merit is speed must win by
  more than speed alone usually gives, since one run of each can't tell a faster train.py from
  a quieter machine.
- `next_run`: which run the decision needs next, or none. The incumbent again, as above. Then,
  when the candidate won the pair while running more than `speed` faster than the incumbent's
  re-run (the same model), a burst of other work may have slowed one of the two: both run once
  more, and the candidate's worse run is judged against the incumbent's better one. A burst
  rarely hits twice in the same place, while a change that really makes training faster wins
  again.

Scores are "lower is better" (val_bpb; a task's metric to maximize comes in negated) and
thresholds are relative to the score, so nothing here knows about GPT training beyond the names
of the fields it reads.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

# measured on a shared 2-core CPU, quick preset, 99 runs at loads 0.2-12 (bench/results/
# fairness-calibration-2026-11-30.json, bench/bench_fairness.py, docs/benchmarks.md)
SPEED = 0.05  # same model, throughput 5 % apart: another machine (a quiet one: within 4.7 %)
MARGIN = 0.005  # wins up to 0.5 % above the tie band are re-checked: 5 % of speed moves val_bpb up
                # to 0.5 %; margin/speed (0.1 % per 1 % of speed) also prices a faster candidate's
                # extra speed, and covers every one of the 828 same-code pairs measured
TIE = 0.002  # the same code at the same speed, steady runs: within the speed allowance alone
UNSTEADY = 0.10  # speed varying more than this from step to step: the load changed during the run
                 # (quiet runs: 0.03-0.08; under a constant load: 0.02-0.10)
TIE_UNSTEADY = 0.01  # ... and its tie band (unsteady pairs: up to 0.58 % beyond the allowance)
SIZE_TOLERANCE = 0.01  # parameters and FLOPs/token this close: the same model size
WARMUP_STEPS = 2  # progress lines left out of the jitter: the first steps are slow anyway
STEP_SPEED = re.compile(r"^step \d+ \(.*\| tok/sec: ([\d,]+(?:\.\d+)?)")  # runner's progress lines


@dataclass
class Measurement:
    """One run's score and the conditions it ran under; 0 (or less) means unknown."""

    value: float | None  # the score (val_bpb); None for a crash
    tok_per_sec: float = 0.0
    params_M: float = 0.0
    flops_per_token: float = 0.0
    load: float = 0.0  # the machine's load average at the end of the run: recorded, not judged
                       # (a 1-minute average lags a run of seconds and counts the run itself)
    jitter: float = 0.0  # step-to-step spread of its speed (coefficient of variation)

    @classmethod
    def of_result(cls, result, sign: int = 1) -> Measurement:
        """From a runner.TrainResult (and its log, for the jitter). sign=-1 for a task's metric
        to maximize: scores here are always "lower is better"."""
        value = result.metric if result.metric is not None else result.val_bpb
        return cls(sign * value if result.ok and value is not None else None,
                   result.tokens_per_second or 0.0, result.num_params_M or 0.0,
                   result.flops_per_token or 0.0, result.load_avg or 0.0, jitter(result.log_path))

    @classmethod
    def of_row(cls, row: dict, metric: str = "val_bpb", sign: int = 1) -> Measurement:
        """From a results.tsv row (Workspace.results()); the metric's column, signed as above."""
        value = sign * row[metric] if row["status"] != "crash" else None
        return cls(value, *(row.get(k) or 0.0 for k in ("tok_per_sec", "params_M", "flops_per_token", "load")))

    @property
    def ok(self) -> bool:
        return self.value is not None


def jitter(log_path) -> float:
    """How much a run's speed varied from step to step: the coefficient of variation of the
    tokens/s of its progress lines (0: unknown, e.g. a task that prints none)."""
    try:
        text = Path(log_path).read_text(errors="replace") if log_path else ""
    except OSError:
        return 0.0
    speeds = [float(m[1].replace(",", "")) for m in map(STEP_SPEED.match, text.splitlines()) if m]
    speeds = [v for v in speeds if v > 0][WARMUP_STEPS:]
    return statistics.stdev(speeds) / statistics.mean(speeds) if len(speeds) >= 3 else 0.0


def same_size(a: Measurement, b: Measurement) -> bool | None:
    """Whether a and b trained the same size of model (None: a size is unknown)."""
    pairs = [(x, y) for x, y in ((a.params_M, b.params_M), (a.flops_per_token, b.flops_per_token))
             if x > 0 and y > 0]
    if not pairs:
        return None
    return all(abs(y / x - 1) <= SIZE_TOLERANCE for x, y in pairs)


def speed_ratio(before: Measurement, after: Measurement) -> float | None:
    """after's throughput over before's, or None when unknown or not the same model size."""
    if before.tok_per_sec <= 0 or after.tok_per_sec <= 0 or same_size(before, after) is False:
        return None
    return after.tok_per_sec / before.tok_per_sec


@dataclass
class Verdict:
    """A decision on a pair: keep or not, by how much, and why in words."""

    keep: bool
    gain: float  # incumbent - candidate: positive when the candidate scored better
    tie: float  # the tie band the gain had to beat
    reason: str


@dataclass
class Guard:
    """The fairness guard's thresholds (module constants by default) and its rules."""

    speed: float = SPEED  # relative throughput change that means another machine
    margin: float = MARGIN  # relative: wins less than this above the tie band are re-checked
    tie: float = TIE  # relative tie band of steady runs, used while sigma is unknown
    unsteady: float = UNSTEADY  # jitter above which a run is unsteady
    tie_unsteady: float = TIE_UNSTEADY  # relative: the smallest tie band for unsteady runs
    sigma: float = 0.0  # run-to-run spread of one score, from noise_runs (absolute)
    z: float = 2.0  # with sigma: the tie band is z·σ·√2, the spread of a difference of two runs

    def tie_band(self, incumbent: Measurement, candidate: Measurement, speed: bool = True) -> float:
        """How much better than `incumbent` the candidate must score to count as better: noise,
        wider for unsteady runs, plus (speed=True) what its extra speed, if any, is worth."""
        size = abs(incumbent.value)
        band = self.z * self.sigma * math.sqrt(2) if self.sigma > 0 else self.tie * size
        if max(incumbent.jitter, candidate.jitter) > self.unsteady:
            band = max(band, self.tie_unsteady * size)
        ratio = speed_ratio(incumbent, candidate)
        if speed and ratio is not None and ratio > 1:  # the steepest measured: margin per `speed`
            band += self.margin / self.speed * math.log(ratio) * size
        return band

    def why_recheck(self, reference: Measurement, candidate: Measurement) -> str | None:
        """Why the incumbent must run again before `candidate` is judged, or None."""
        if not (candidate.ok and reference.ok):
            return None
        # without the speed allowance: a win on a quieter machine is re-checked, not guessed at
        gain, tie = reference.value - candidate.value, self.tie_band(reference, candidate, speed=False)
        ratio = speed_ratio(reference, candidate)
        if same_size(reference, candidate) is False:
            if gain > tie:
                return "the model's size changed, so its speed says nothing about the machine"
        elif ratio is not None and ratio > 1 + self.speed:
            if gain > tie:
                return f"machine quieter than when the best was measured ({ratio - 1:.0%} faster)"
        elif ratio is not None and ratio < 1 - self.speed:
            # the score loses about margin/speed per unit of log(speed): could that hide a win?
            hidden = self.margin / self.speed * math.log(1 / ratio) * abs(reference.value)
            if gain + hidden > tie and gain <= tie + self.margin * abs(reference.value):
                return f"machine busier than when the best was measured ({1 - ratio:.0%} slower)"
        elif tie < gain <= tie + self.margin * abs(reference.value):
            return f"a close call (better by {_pct(gain, reference)}, within the re-check margin)"
        return None

    def ambiguous(self, candidate: Measurement, rerun: Measurement) -> bool:
        """True when the candidate beat the incumbent's re-run while running more than `speed`
        faster, the same model: the machine changed between the two (a burst of other work
        during one run), unless the change itself makes training faster."""
        ratio = speed_ratio(rerun, candidate)
        return (candidate.ok and rerun.ok and ratio is not None and ratio > 1 + self.speed
                and rerun.value - candidate.value > self.tie_band(rerun, candidate))

    def judge(self, candidate: Measurement, incumbent: Measurement) -> Verdict:
        """Keep the candidate if it beats the incumbent by more than the tie band."""
        if not incumbent.ok:
            return Verdict(False, 0.0, 0.0, "the best crashed when it ran again, so there is no fair "
                           "comparison: discarded to be safe (see the re-check's log)")
        gain, tie = incumbent.value - candidate.value, self.tie_band(incumbent, candidate)
        shaky, ratio = max(incumbent.jitter, candidate.jitter), speed_ratio(incumbent, candidate) or 1
        notes = ([f"the speed varied {shaky:.0%} from step to step"] if shaky > self.unsteady else []) + (
            [f"it ran {ratio - 1:.0%} faster"] if ratio > 1 + self.speed / 5 else [])
        band = f"the tie band of {_pct(tie, incumbent)}" + (f" ({'; '.join(notes)})" if notes else "")
        if gain > tie:
            return Verdict(True, gain, tie, f"better by {_pct(gain, incumbent)}, beyond {band}")
        if gain > 0:
            return Verdict(False, gain, tie, f"better by only {_pct(gain, incumbent)}, within {band}: "
                           "noise, not a change")
        return Verdict(False, gain, tie, f"not better ({_pct(-gain, incumbent)} worse)")

    def could_keep(self, reference: Measurement, candidate: Measurement) -> bool:
        """False when the candidate loses whatever the runs `next_run` may ask for turn out to be:
        it would not be kept against `reference`, and the guard would not re-check the incumbent."""
        return candidate.ok and (self.why_recheck(reference, candidate) is not None
                                 or self.judge(candidate, reference).keep)

    def decide(self, reference: Measurement, candidate: list[Measurement],
               incumbent: list[Measurement]) -> Verdict:
        """The verdict once `next_run` has nothing more to run: the candidate's worse run against
        the incumbent's better re-run (or its last measurement, if it did not run again)."""
        ran = [m for m in incumbent if m.ok]
        against = min(ran, key=lambda m: m.value) if ran else incumbent[-1] if incumbent else reference
        return self.judge(decisive(candidate), against)

    def next_run(self, reference: Measurement, candidate: list[Measurement],
                 incumbent: list[Measurement]) -> tuple[str, str] | None:
        """("incumbent" or "candidate", why) for the run the decision needs next, or None.

        `candidate` and `incumbent` are the runs made so far for this decision, oldest first;
        `reference` is the incumbent's last measurement before it.
        """
        if not candidate[-1].ok or (incumbent and not incumbent[-1].ok):
            return None
        if not incumbent:
            why = self.why_recheck(reference, candidate[-1])
            return ("incumbent", why) if why else None
        if len(candidate) == 1 and self.ambiguous(candidate[-1], incumbent[-1]):
            ratio = speed_ratio(incumbent[-1], candidate[-1])
            return "candidate", (f"it won while running {ratio - 1:.0%} faster than the best's re-run: "
                                 "both once more")
        if len(candidate) == 2 and len(incumbent) == 1 and self.judge(decisive(candidate), incumbent[-1]).keep:
            return "incumbent", "once more, beside the candidate's second run"  # could still lose
        return None


def decisive(candidate: list[Measurement]) -> Measurement:
    """The candidate run a decision rests on: the worse one, when it ran twice."""
    return max(candidate, key=lambda m: m.value)


def _pct(amount: float, of: Measurement) -> str:
    return f"{amount / abs(of.value):.2%}" if of.value else f"{amount:.6f}"
