"""The scripted agent: replays prepared edits, for demos, notebooks and tests.

Each edit is one of
- a reply string, in the format an LLM would send (parsed by `edits.apply_reply`);
- a callable `state -> (description, new_train_py)`;
- a pair `(description, {NAME: value})` that sets UPPERCASE constants of train.py.
"""

from __future__ import annotations

from typing import Callable, Iterable, Union

from .base import Proposal, ProposalError, State
from .edits import EditError, apply_reply
from .offline import set_constants

Edit = Union[str, Callable[[State], tuple], tuple]


class ScriptedAgent:
    """Hands out the given edits one by one, in order."""

    name = "scripted"

    def __init__(self, edits: Iterable[Edit]):
        self.edits = list(edits)
        self.used = 0  # how many edits have been handed out

    def __repr__(self) -> str:
        return f"ScriptedAgent({len(self.edits)} edits, {self.remaining} left)"

    @property
    def remaining(self) -> int:
        return len(self.edits) - self.used

    def propose(self, state: State) -> Proposal:
        if self.remaining <= 0:
            raise ProposalError(f"The scripted agent has no edits left: all {len(self.edits)} were "
                                "used. Give it more edits, or stop the loop here.")
        edit, number = self.edits[self.used], self.used + 1
        self.used += 1
        try:
            description, train_py = self._apply(edit, state)
        except EditError as err:
            raise ProposalError(f"Scripted edit {number} does not apply: {err}") from None
        return Proposal(description=description, train_py=train_py, original=state.train_py)

    @staticmethod
    def _apply(edit: Edit, state: State) -> tuple[str, str]:
        if isinstance(edit, str):
            return apply_reply(edit, state.train_py)
        if callable(edit):
            description, train_py = edit(state)
            return description, train_py
        if isinstance(edit, tuple) and len(edit) == 2 and isinstance(edit[1], dict):
            return edit[0], set_constants(state.train_py, edit[1])
        raise ProposalError(f"A scripted edit must be a reply string, a callable or a (description, "
                            f"{{NAME: value}}) pair, not {type(edit).__name__}.")
