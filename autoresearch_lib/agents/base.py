"""The agent protocol: what an agent is given (`State`) and what it hands back (`Proposal`).

Every agent - offline, LLM, scripted or human - answers one question: "given program.md, the
current train.py and the results so far, what should the next experiment be?" The loop does
the rest (commit, train, keep or reset), so agents stay small and easy to swap.
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
    train_py: str  # the current (best kept) train.py
    # results.tsv rows so far: commit, val_bpb, memory_gb, status (keep/discard/crash), description
    results: list[dict] = field(default_factory=list)
    best_val_bpb: float | None = None  # lowest val_bpb kept so far (None before the baseline)
    last_crash_log: str | None = None  # tail of the last crashed run's log, if the last run crashed
    experiment: int = 0  # index of the experiment about to run (0 is the baseline)


@dataclass
class Proposal:
    """One experiment: a one-line description and the full new train.py."""

    description: str  # one short line, written to results.tsv
    train_py: str  # the complete new train.py
    usage: dict = field(default_factory=dict)  # LLM tokens: prompt_, completion_, total_tokens
    original: str = ""  # the train.py the edit started from, for the diff

    @property
    def diff(self) -> str:
        """A unified diff of train.py, as `git diff` would show it."""
        lines = difflib.unified_diff(
            self.original.splitlines(), self.train_py.splitlines(),
            fromfile="a/train.py", tofile="b/train.py", lineterm="",
        )
        return "\n".join(lines)


@runtime_checkable
class Agent(Protocol):
    """Anything with a `name` and a `propose(state)` method is an agent."""

    name: str

    def propose(self, state: State) -> Proposal:
        """Return the next experiment, or raise ProposalError saying why there is none."""
        ...
