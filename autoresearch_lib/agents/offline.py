"""The offline agent: a seeded hill-climber over train.py's UPPERCASE hyperparameters.

No network, no API key. It reads the block of top-level constants (`MATRIX_LR = 0.02`, ...)
with `ast`, picks one and moves it a little (learning rates x0.5 / x0.7 / x1.4 / x2, depth
+-1, batch sizes x2 or /2, ratios +-0.1, any other integer +-1, x2 or /2), and rewrites only
that line. Because the loop hands it the best kept train.py, this is hill-climbing. It reads
the results so far to never repeat a change that was discarded or crashed, and prefers
directions that helped before.

Any task works the same way: the agent turns the UPPERCASE numeric constants of its editable
Python file(s) (fit-curve's `DEGREE = 16`, `RIDGE = 0.3`, ...). A file without any gets a
ProposalError saying what to add.

program.md steers it through one section: a heading `## Constants to explore` followed by a
list of constant names restricts the agent to moves of those constants (a move of both batch
sizes counts as a move of its first one: TOTAL_BATCH_SIZE, or DEVICE_BATCH_SIZE when the device
batch grows). Anything else in a list item is free text for the reader:

    ## Constants to explore
    - MATRIX_LR: Muon's step size
    - `WARMDOWN_RATIO`

No such section, or an empty one, leaves every constant in play. A listed name that no editable
file defines is a ProposalError naming it (a typo would otherwise silently leave the agent with
fewer knobs); with several editable files a name may say its file, `solve.py:DEGREE`. The rest of
program.md is for LLM agents: this agent reads only this section.

Its descriptions are machine-readable, one change per `;` (with several editable files, each
name is prefixed by its file, `solve.py:DEGREE 16 -> 8`):
    MATRIX_LR 0.02 -> 0.028
    TOTAL_BATCH_SIZE 2**19 -> 2**18; DEVICE_BATCH_SIZE 128 -> 64
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass

from .base import Proposal, ProposalError, State

LR_FACTORS = (0.5, 0.7, 1.4, 2.0)
WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL")  # S: short (local) window, L: full context
# kept in [0, 1], moved by +-0.1: a momentum or beta scaled like a learning rate would pass 1 and diverge
RATIOS = ("WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "WEIGHT_DECAY", "WEIGHT_DECAY_FINAL_FRAC",
          "MUON_MOMENTUM", "MUON_MOMENTUM_START", "NORMUON_BETA2")
PREFERRED_WEIGHT = 3  # how much likelier a move is if the same direction helped before
INT_LIMIT = 10**9  # integers move within [1, INT_LIMIT] (from a positive start)
SMALL_INT = 8  # up to this, an integer also moves by +-1
EXPLORE_HEADING = re.compile(r"^#{1,6}\s*constants to explore\s*$", re.IGNORECASE)
LISTED_NAME = re.compile(r"^\s*[-*+]\s+`?((?:[\w./-]+:)?[A-Z][A-Z0-9_]*)`?(?![\w`])")
CHANGE = re.compile(r"^((?:[\w./-]+:)?[A-Z][A-Z0-9_]*) (.+?) -> (.+)$")
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
             ast.Div: operator.truediv, ast.Pow: operator.pow}


# --- reading and rewriting the constants -------------------------------------------------

@dataclass
class Constant:
    """One `NAME = literal` line of train.py."""

    value: object  # the evaluated literal: int, float, str, bool or tuple
    text: str  # the literal as written, e.g. "2**19"
    line: int  # 0-based line number
    start: int  # byte offsets of the literal within that line (what ast reports)
    end: int


def read_constants(train_py: str, name: str = "train.py") -> dict[str, object]:
    """The UPPERCASE top-level constants of train.py, e.g. {"DEPTH": 8, "MATRIX_LR": 0.04}."""
    return {key: c.value for key, c in _constants(train_py, name).items()}


def _constants(train_py: str, name: str = "train.py") -> dict[str, Constant]:
    try:
        tree = ast.parse(train_py)
    except (SyntaxError, ValueError) as err:
        raise ProposalError(f"{name} is not valid Python ({err}), so its constants cannot be read. "
                            "Reset it to the last kept version.") from None
    lines, found = train_py.split("\n"), {}
    for node in tree.body:
        name = _constant_name(node)
        if name is None:
            continue
        try:
            value = _literal(node.value)
        except (ValueError, ArithmeticError):
            continue  # an expression such as `DIM = DEPTH * 64` is not a knob to turn
        start, end = node.value.col_offset, node.value.end_col_offset
        text = lines[node.lineno - 1].encode()[start:end].decode()
        found[name] = Constant(value, text, node.lineno - 1, start, end)
    return found


def _constant_name(node: ast.stmt) -> str | None:
    """NAME if the statement is a one-line `NAME = ...` with an UPPERCASE name."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
        return None
    target = node.targets[0]
    if isinstance(target, ast.Name) and target.id.isupper() and node.lineno == node.end_lineno:
        return target.id
    return None


def _literal(node: ast.expr) -> object:
    """Evaluate a literal: numbers, strings, tuples, and arithmetic on numbers like 2**19."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_literal(item) for item in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")  # keep 10**10**10 from hanging us
        value = OPERATORS[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > 256:
            raise ValueError("number too large")
        return value
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")


def _number(node: ast.expr) -> int | float:
    value = _literal(node)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


def format_value(value: object, like: str = "") -> str:
    """Write a value as Python source, in the style of `like` (the old text) where it can."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int) and re.fullmatch(r"2\s*\*\*\s*\d+", like.strip()) and _power_of_two(value):
        return f"2**{value.bit_length() - 1}"
    if isinstance(value, float):
        return repr(float(f"{value:.4g}"))  # 0.028000000000000004 -> 0.028
    if isinstance(value, str) and like.startswith('"') and '"' not in value and "\\" not in value:
        return f'"{value}"'
    if isinstance(value, tuple):
        return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def set_constants(train_py: str, changes: dict[str, object], file: str = "train.py") -> str:
    """Return train.py with each NAME's literal replaced by its new value; other lines untouched."""
    constants, lines = _constants(train_py, file), train_py.split("\n")
    for name in changes:
        if name not in constants:
            known = ", ".join(constants) or "none"
            raise ProposalError(f"{file} has no top-level constant {name} (a one-line "
                                f"`{name} = literal`). Its constants are: {known}.")
    # right to left, so that two constants on one line (A = 1; B = 2) keep valid offsets
    for name in sorted(changes, key=lambda n: (constants[n].line, constants[n].start), reverse=True):
        c, new = constants[name], format_value(changes[name], constants[name].text)
        raw = lines[c.line].encode()
        lines[c.line] = (raw[: c.start] + new.encode() + raw[c.end:]).decode()
    return "\n".join(lines)


def describe(changes: dict[str, object], train_py: str, prefix: str = "") -> str:
    """The one-line description, e.g. `MATRIX_LR 0.02 -> 0.028` (`prefix`: 'solve.py:')."""
    constants = _constants(train_py)
    return "; ".join(f"{prefix}{name} {constants[name].text} -> "
                     f"{format_value(value, constants[name].text)}" for name, value in changes.items())


def parse_description(description: str) -> list[tuple[str, object, object]]:
    """The (name, old, new) changes in a description written by `describe` ([] for others)."""
    changes = []
    for part in str(description).split("; "):
        match = CHANGE.match(part.strip())
        try:
            old, new = (_literal(ast.parse(text, mode="eval").body) for text in match.groups()[1:])
        except (AttributeError, SyntaxError, ValueError, ArithmeticError, RecursionError):
            continue  # not one of ours: free text from another agent
        changes.append((match[1], old, new))
    return changes


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- the moves -----------------------------------------------------------------------------

def _scaled(value, factors, low, high) -> list:
    return [float(f"{value * f:.4g}") for f in factors if low <= value * f <= high]


def _stepped(value, steps, low, high) -> list:
    return [round(value + s, 6) for s in steps if low <= round(value + s, 6) <= high]


def _batch_moves(c: dict) -> list[dict]:
    """Batch sizes move by factors of 2, so TOTAL stays a multiple of DEVICE * seq_len."""
    total, device = c.get("TOTAL_BATCH_SIZE"), c.get("DEVICE_BATCH_SIZE")
    if not (isinstance(total, int) and isinstance(device, int) and _power_of_two(device)):
        return []
    moves = [{"TOTAL_BATCH_SIZE": total * 2}] if total <= 2**24 else []
    if device >= 2:  # halving the device batch keeps the multiple; halve both to shrink the total
        moves += [{"DEVICE_BATCH_SIZE": device // 2},
                  {"TOTAL_BATCH_SIZE": total // 2, "DEVICE_BATCH_SIZE": device // 2}]
    if device <= 512:  # a bigger device batch needs a bigger total (it may run out of memory)
        moves.append({"DEVICE_BATCH_SIZE": device * 2, "TOTAL_BATCH_SIZE": total * 2})
    return moves


def _moves_for(name: str, value: object) -> list:
    """New values to try for one constant (the batch sizes are handled together, above)."""
    if name == "DEPTH" and isinstance(value, int):
        return _stepped(value, (-1, 1), 1, 64)
    if name in ("ASPECT_RATIO", "HEAD_DIM") and isinstance(value, int) and value % 2 == 0:
        return [v for v in (value // 2, value * 2) if 8 <= v <= 512]
    if name == "DEVICE_BATCH_SIZE" and isinstance(value, int):  # alone, without TOTAL_BATCH_SIZE
        return [v for v in (value // 2, value * 2) if 1 <= v <= 1024]
    if name == "WINDOW_PATTERN" and isinstance(value, str):
        return [p for p in WINDOW_PATTERNS if p != value]
    if name == "ADAM_BETAS" and isinstance(value, tuple) and len(value) == 2:
        beta1, beta2 = value
        return ([(b1, beta2) for b1 in _stepped(beta1, (-0.05, 0.05), 0.5, 0.99)]
                + [(beta1, b2) for b2 in (0.9, 0.95, 0.99) if b2 != beta2])
    if name in RATIOS and isinstance(value, (int, float)):
        return _stepped(value, (-0.1, 0.1), 0.0, 1.0)
    if isinstance(value, float):  # learning rates and any other float knob
        return _scaled(value, LR_FACTORS, 1e-6, 10.0)
    if isinstance(value, int) and not isinstance(value, bool):  # counts, sizes, degrees
        return _int_moves(value)
    return []


def _int_moves(value: int) -> list[int]:
    """An integer knob: x2 and /2, and +-1 for small ones (300 steps -> 301 would waste a run),
    staying positive (and below INT_LIMIT) if it was."""
    if value <= 0:
        return [value - 1, value + 1] if value < 0 else [1]
    moves = ([value - 1, value + 1] if value <= SMALL_INT else []) + [value * 2, value // 2]
    return list(dict.fromkeys(v for v in moves if 1 <= v <= INT_LIMIT and v != value))


def numeric(constants: dict[str, object]) -> list[str]:
    """The names of the constants that are numbers: the knobs the offline agent can turn."""
    return [name for name, value in constants.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def candidate_changes(constants: dict[str, object]) -> list[dict]:
    """Every single move the agent could make from these constants, in file order."""
    moves = []
    for name, value in constants.items():
        if name == "TOTAL_BATCH_SIZE":
            moves += _batch_moves(constants)
        elif name != "DEVICE_BATCH_SIZE" or "TOTAL_BATCH_SIZE" not in constants:
            moves += [{name: new} for new in _moves_for(name, value)]
    return moves


# --- what program.md lets it explore ------------------------------------------------------

def explore_list(program: str) -> list[str]:
    """The constant names listed under program.md's `## Constants to explore` heading, in order
    ([] when there is no such section or it lists none: every constant is in play).

    A list item's first word is the name (backticks allowed); the rest of the line is ignored.
    The section ends at the next heading; HTML comments (`<!-- ... -->`) and fenced code
    blocks are skipped.
    """
    program = re.sub(r"<!--.*?-->", "", program, flags=re.DOTALL)
    names, inside, fenced = [], False, False
    for line in program.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            continue
        elif line.lstrip().startswith("#"):
            inside = bool(EXPLORE_HEADING.match(line.strip()))
        elif inside and (match := LISTED_NAME.match(line)):
            names.append(match[1])
    return list(dict.fromkeys(names))


def allowed_names(program: str, files: dict[str, str]) -> set[str] | None:
    """The constants program.md lets the agent move, as `file:NAME` (None: all of them).

    Raises ProposalError for a listed name that no editable file defines.
    """
    listed = explore_list(program)
    if not listed:
        return None
    defined = {f"{file}:{name}" for file, text in files.items() for name in read_constants(text, file)}
    allowed, unknown = set(), []
    for name in listed:
        matches = {d for d in defined if d == name or d.split(":", 1)[1] == name}
        allowed |= matches
        if not matches:
            unknown.append(name)
    if unknown:
        known = ", ".join(sorted({d.split(":", 1)[1] for d in defined})) or "none"
        raise ProposalError(
            f"program.md's 'Constants to explore' lists {', '.join(unknown)}, but "
            f"{' and '.join(files)} has no such one-line UPPERCASE constant, so the offline agent "
            f"cannot move it. The constants it can move are: {known}. Fix the name in program.md "
            "(or remove the line), commit program.md, then go on.")
    return allowed


def eligible(moves: list[dict], allowed: set[str] | None, file: str) -> list[dict]:
    """The moves whose main knob (their first name) program.md allows (all, if allowed is None)."""
    if allowed is None:
        return moves
    return [move for move in moves if f"{file}:{next(iter(move))}" in allowed]


# --- reading the history -------------------------------------------------------------------

def _key(name: str, value: object) -> tuple[str, str]:
    return name, format_value(value)  # compare values as written: 0.028 == 0.028000000000000004


def _direction(name: str, old: object, new: object) -> tuple[str, int] | None:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old != new:
        return name, 1 if new > old else -1
    return None


def read_history(results: list[dict]) -> tuple[set, set]:
    """(tried, helped): (name, value) pairs not to try again, and (name, direction) that helped."""
    tried, helped = set(), set()
    for row in results:
        for name, old, new in parse_description(row.get("description", "")):
            if row.get("status") == "keep":
                tried.add(_key(name, old))  # going back to a value we moved away from is a repeat
                helped.add(_direction(name, old, new))
            else:
                tried.add(_key(name, new))
    return tried, helped


class OfflineAgent:
    """Hill-climbs the UPPERCASE hyperparameters of train.py; seeded and reproducible."""

    name = "offline"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __repr__(self) -> str:
        return f"OfflineAgent(seed={self.seed})"

    def propose(self, state: State) -> Proposal:
        """One change to one constant (or to both batch sizes together)."""
        files = {name: text for name, text in state.files.items() if name.endswith(".py")}
        prefix = len(state.files) > 1  # several files: names in descriptions say which file
        # the candidates already in this wave count as tried: a wave holds distinct changes
        tried, helped = read_history(state.results + [{"description": d, "status": "pending"}
                                                      for d in state.pending])
        allowed = allowed_names(state.program, files)  # program.md's "Constants to explore"
        fresh, weights, count = [], [], 0  # count: the constants seen, for the messages
        for file, text in files.items():
            constants, label = read_constants(text, file), f"{file}:" if prefix else ""
            count += len(constants)
            for c in eligible(candidate_changes(constants), allowed, file):
                if not any(_key(label + name, value) in tried for name, value in c.items()):
                    fresh.append((file, c))
                    weights.append(PREFERRED_WEIGHT if self._helped(c, constants, helped, label) else 1)
        if not fresh:
            raise ProposalError(self._stuck(state, files, count, allowed))
        # seeded by (seed, experiment, rows): the same state always gives the same proposal
        rng = random.Random(f"{self.seed}:{state.experiment}:{len(state.results)}")
        file, changes = rng.choices(fresh, weights)[0]
        text = files[file]
        description = describe(changes, text, f"{file}:" if prefix else "")
        new = set_constants(text, changes, file)
        if state.task == "gpt":
            return Proposal(description=description, train_py=new, original=state.train_py)
        return Proposal(description=description, files={**state.files, file: new},
                        originals=dict(state.files))

    @staticmethod
    def _helped(changes: dict, constants: dict, helped: set, label: str = "") -> bool:
        name, new = next(iter(changes.items()))  # the first name is the move's main knob
        return _direction(label + name, constants[name], new) in helped

    @staticmethod
    def _stuck(state: State, files: dict, count: int, allowed: set[str] | None = None) -> str:
        """Why there is no proposal: no knobs at all (say what to add), or all of them tried."""
        names = " and ".join(state.files)
        if not any(numeric(read_constants(text, file)) for file, text in files.items()):
            return (f"The offline agent has nothing to change: {names} has no UPPERCASE numeric "
                    "constants. It tunes one-line top-level constants such as `LEARNING_RATE = "
                    "0.01` or `STEPS = 300`: put the knobs you want tuned at the top of "
                    f"{names} (and use them in its code), or use an LLM agent (--agent openai), "
                    "which can edit any code.")
        if allowed is not None:
            listed = ", ".join(sorted(name.split(":", 1)[1] for name in allowed))
            return (f"The offline agent has run out of new changes to the constants program.md "
                    f"lets it explore ({listed}): every nearby value was already tried. List "
                    "more names under '## Constants to explore' in program.md (or remove the "
                    "section to explore them all), commit it, then go on.")
        return (f"The offline agent has run out of new changes: every nearby value "
                f"of the {count} constants in {names} was already tried. "
                "Stop the loop, or go on with an LLM agent (make_agent('openai')).")
