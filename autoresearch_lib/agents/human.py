"""The human agent: an instructor types, edits or approves each experiment.

`callback(state, suggestion)` is asked for every experiment. `suggestion` is a Proposal from
`suggest_with` (for example an OfflineAgent), or None. The callback returns
- a Proposal (the suggestion itself to accept it, or one the instructor built);
- a reply string in the LLM format (a description line, then SEARCH/REPLACE blocks or a full
  ```python block), checked by `edits.apply_reply`;
- None to reject: the experiment is skipped and logged as a crash.
A notebook widget is one such callback.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from .base import Agent, Proposal, ProposalError, State
from .edits import apply_reply

Answer = Union[Proposal, str, None]


class HumanAgent:
    """Asks a person (through `callback`) for each proposal."""

    name = "human"

    def __init__(self, callback: Callable[[State, Optional[Proposal]], Answer],
                 suggest_with: Agent | None = None):
        self.callback = callback
        self.suggest_with = suggest_with  # an agent whose proposal pre-fills the instructor's form

    def __repr__(self) -> str:
        return f"HumanAgent(suggest_with={self.suggest_with!r})"

    def propose(self, state: State) -> Proposal:
        answer = self.callback(state, self._suggestion(state))
        if answer is None:
            raise ProposalError("The proposal was rejected by the instructor.")
        if isinstance(answer, str) and state.task != "gpt":  # a task: its editable file(s)
            description, files = apply_reply(answer, state.files)
            return Proposal(description=description, files=files, originals=dict(state.files))
        if isinstance(answer, str):
            description, train_py = apply_reply(answer, state.train_py)
            return Proposal(description=description, train_py=train_py, original=state.train_py)
        if isinstance(answer, Proposal):
            if any(answer.originals.values()):
                return answer
            if state.task != "gpt":
                return Proposal(answer.description, usage=answer.usage, files=answer.files,
                                originals=dict(state.files))
            return Proposal(answer.description, answer.train_py, answer.usage,
                            original=state.train_py)
        raise ProposalError(f"The instructor's callback returned a {type(answer).__name__}; "
                            "it must return a Proposal, a reply string, or None to reject.")

    def _suggestion(self, state: State) -> Proposal | None:
        if self.suggest_with is None:
            return None
        try:
            return self.suggest_with.propose(state)
        except ProposalError:
            return None  # no suggestion this time; the instructor can still type one
