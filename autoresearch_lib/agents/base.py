"""The agent protocol: what an agent is given (`State`) and what it hands back (`Proposal`).

Every agent - offline, LLM, scripted or human - answers one question: "given program.md, the
current train.py and the results so far, what should the next experiment be?" The loop does
the rest (commit, train, keep or reset), so agents stay small and easy to swap.

The same question is asked for any task (tasks.py): then the state names the task, its metric
and direction, and holds the text of each editable file (`files`); `train_py` is the first one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ProposalError(Exception):
    """An agent could not produce a valid proposal; the loop logs a crash row and goes on."""


class MissingAPIKeyError(ProposalError):
    """An LLM agent was created without an API key."""


@dataclass
class State:
    """What an agent sees before an experiment."""

    program: str  # program.md: the human's instructions
    train_py: str  # the current (best kept) train.py; for a task, its first editable file
    # results.tsv rows so far: commit, val_bpb (or the task's metric), memory_gb, status, description
    results: list[dict] = field(default_factory=list)
    best_val_bpb: float | None = None  # the best metric kept so far (None before the baseline)
    last_crash_log: str | None = None  # tail of the last crashed run's log, if the last run crashed
    experiment: int = 0  # index of the experiment about to run (0 is the baseline)
    task: str = "gpt"  # the task's name ("gpt": GPT training)
    metric: str = "val_bpb"  # the number experiments are judged by (results.tsv's 2nd column)
    direction: str = "minimize"  # "minimize" (lower is better) or "maximize"
    files: dict = field(default_factory=dict)  # editable file -> its current text
    # a parallel wave: the descriptions of the candidates already proposed for it, from the same
    # best files. Propose something else: two candidates of one wave are never the same edit.
    pending: list = field(default_factory=list)

    def __post_init__(self):
        if not self.files:  # GPT, or a caller that gave only train_py: one editable file
            self.files = {"train.py": self.train_py}

    @property
    def better(self) -> str:
        """'lower' or 'higher': which way the metric improves, for messages and prompts."""
        return "higher" if self.direction == "maximize" else "lower"


@dataclass
class Proposal:
    """One experiment: a one-line description and the full new train.py (or editable files)."""

    description: str  # one short line, written to results.tsv
    train_py: str = ""  # the complete new train.py (for a task: its first file, when files is {})
    usage: dict = field(default_factory=dict)  # LLM tokens: prompt_, completion_, total_tokens
    original: str = ""  # the train.py the edit started from, for the diff
    files: dict = field(default_factory=dict)  # a task's new file texts by name (some or all)
    originals: dict = field(default_factory=dict)  # ... and the texts they started from

    def __post_init__(self):
        if not self.files:  # GPT: train.py is the one file
            self.files = {"train.py": self.train_py}
            self.originals = self.originals or {"train.py": self.original}
        elif not self.train_py:
            self.train_py = next(iter(self.files.values()))

    @property
    def diff(self) -> str:
        """A unified diff of the changed file(s), as `git diff` would show it."""
        parts = []
        for name, text in self.files.items():
            old = self.originals.get(name, "")
            if not (isinstance(text, str) and isinstance(old, str)):
                continue  # not text: the loop refuses the proposal, there is no diff to show
            parts += difflib.unified_diff(old.splitlines(), text.splitlines(),
                                          fromfile=f"a/{name}", tofile=f"b/{name}", lineterm="")
        return "\n".join(parts)


@runtime_checkable
class Agent(Protocol):
    """Anything with a `name` and a `propose(state)` method is an agent."""

    name: str

    def propose(self, state: State) -> Proposal:
        """Return the next experiment, or raise ProposalError saying why there is none."""
        ...
