"""The scripted agent: replays prepared edits, for demos, notebooks and tests.

Each edit is one of
- a reply string, in the format an LLM would send (parsed by `edits.apply_reply`);
- a callable `state -> (description, new_text)` (new_text: train.py, or a task's editable
  file; a dict {name: text} for several);
- a pair `(description, {NAME: value})` that sets UPPERCASE constants of the editable file(s).

`parse_edits(text)` reads such a list from JSON (the command line's --edits file, the
dashboard's box): replies as strings, pairs as `["description", {"NAME": value}]`.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Union

from .base import Proposal, ProposalError, State
from .edits import EditError, apply_reply
from .offline import read_constants, set_constants

Edit = Union[str, Callable[[State], tuple], tuple]
EDITS_HELP = ('a JSON list of edits, each a reply string (a description line, then SEARCH/REPLACE '
              'blocks) or a pair ["description", {"NAME": value}], e.g. '
              '[["deeper", {"DEPTH": 6}]]')


def parse_edits(text: str) -> list[Edit]:
    """The edits in a JSON text (see the module docstring); ValueError says what is wrong."""
    try:
        edits = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the scripted edits are not valid JSON ({e}): give {EDITS_HELP}.") from None
    if not isinstance(edits, list):
        raise ValueError(f"the scripted edits are a {type(edits).__name__}: give {EDITS_HELP}.")
    parsed = []
    for number, edit in enumerate(edits, 1):
        if isinstance(edit, list) and len(edit) == 2 and isinstance(edit[0], str) \
                and isinstance(edit[1], dict):
            parsed.append(tuple(edit))
        elif isinstance(edit, str):
            parsed.append(edit)
        else:
            raise ValueError(f"scripted edit {number} is {json.dumps(edit)[:80]}: each edit must be "
                             f"a reply string or a [description, {{NAME: value}}] pair; {EDITS_HELP}.")
    return parsed


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
            description, new = self._apply(edit, state)
        except EditError as err:
            raise ProposalError(f"Scripted edit {number} does not apply: {err}") from None
        if state.task == "gpt":
            return Proposal(description=description, train_py=new, original=state.train_py)
        files = new if isinstance(new, dict) else {next(iter(state.files)): new}
        return Proposal(description=description, files={**state.files, **files},
                        originals=dict(state.files))

    @staticmethod
    def _apply(edit: Edit, state: State) -> tuple[str, str | dict]:
        if isinstance(edit, str):
            return apply_reply(edit, state.train_py if state.task == "gpt" else state.files)
        if callable(edit):
            description, new = edit(state)
            return description, new
        if isinstance(edit, tuple) and len(edit) == 2 and isinstance(edit[1], dict):
            return edit[0], _set(state, edit[1])
        raise ProposalError(f"A scripted edit must be a reply string, a callable or a (description, "
                            f"{{NAME: value}}) pair, not {type(edit).__name__}.")


def _set(state: State, changes: dict) -> str | dict:
    """Set UPPERCASE constants: in train.py, or in whichever editable file defines each one."""
    if state.task == "gpt":
        return set_constants(state.train_py, changes)
    files = dict(state.files)
    for name, value in changes.items():
        owner = next((f for f, text in files.items() if f.endswith(".py")
                      and name in read_constants(text, f)), next(iter(files)))
        files[owner] = set_constants(files[owner], {name: value}, owner)
    return files
