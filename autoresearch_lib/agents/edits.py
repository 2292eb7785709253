"""Turn a model's reply into a new train.py, or explain exactly why it cannot be used.

A reply is a one-line description, then either SEARCH/REPLACE blocks (the format aider and
OpenEvolve use), optionally after a line naming the file, which must be `train.py`:

    Raise the matrix learning rate
    train.py
    <<<<<<< SEARCH
    MATRIX_LR = 0.02
    =======
    MATRIX_LR = 0.03
    >>>>>>> REPLACE

or the complete new train.py in one ```python block. Every problem raises EditError with a
message written for the model to read: the OpenAI agent sends it back so the model can fix it.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings

from .base import ProposalError

SEARCH = re.compile(r"^\s*<{5,9} ?SEARCH\s*$")
DIVIDER = re.compile(r"^\s*={5,9}\s*$")
REPLACE = re.compile(r"^\s*>{5,9} ?REPLACE\s*$")
MARKERS = {"<<<<<<< SEARCH": SEARCH, "=======": DIVIDER, ">>>>>>> REPLACE": REPLACE}
FENCE = re.compile(r"^\s*```")
THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)
PATH_LIKE = re.compile(r"[\w.~/\\-]*[./\\][\w.~/\\-]*")
ALLOWED_FILE = "train.py"
REQUIRED_NAMES = {"GPTConfig", "GPT"}  # the evaluator rebuilds the model from these two
MAX_DESCRIPTION = 200

FORMAT_HELP = (
    "Reply with a one-line description of the change, then either SEARCH/REPLACE blocks "
    "(a '<<<<<<< SEARCH' line, the exact lines to find in train.py, a '=======' line, the new "
    "lines, a '>>>>>>> REPLACE' line) or the complete new train.py in one ```python block."
)


class EditError(ProposalError, ValueError):
    """A reply that cannot be applied. A ProposalError too, so the loop logs it as a crash."""


def apply_reply(reply: str, train_py: str) -> tuple[str, str]:
    """Return (description, new_train_py) built from a model's reply, or raise EditError."""
    if not isinstance(reply, str) or not reply.strip():
        raise EditError(f"The reply is empty. {FORMAT_HELP}")
    reply = THINKING.sub("", reply)  # reasoning models (deepseek-r1, qwen3) think out loud first
    lines = reply.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not any(line.strip() for line in lines):
        raise EditError(f"The reply has nothing after its <think> section. {FORMAT_HELP}")
    first = next(i for i, line in enumerate(lines) if line.strip())
    description, body = _description(lines[first]), lines[first + 1:]
    if any(SEARCH.match(line) for line in body):
        new_train_py = _apply_blocks(body, train_py)
    elif any(FENCE.match(line) for line in body):
        new_train_py = _full_file(body)
    else:
        raise EditError(f"The reply has no SEARCH/REPLACE block and no ```python block. {FORMAT_HELP}")
    _check_result(new_train_py, train_py)
    return description, new_train_py


def _description(line: str) -> str:
    """The first line, cleaned: no markdown decoration, no tabs (results.tsv is tab-separated)."""
    if SEARCH.match(line) or FENCE.match(line) or DIVIDER.match(line) or REPLACE.match(line):
        raise EditError(f"The reply must start with a one-line description of the change. {FORMAT_HELP}")
    if _filename_before([line]) is not None:
        raise EditError(f"The reply must start with a one-line description of the change, not with a "
                        f"file name ({line.strip()!r}). {FORMAT_HELP}")
    text = " ".join(line.replace("\t", " ").split()).strip("#*_` ")
    if not text:
        raise EditError(f"The first line must describe the change in words. {FORMAT_HELP}")
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def _apply_blocks(lines: list[str], text: str) -> str:
    """Apply each SEARCH/REPLACE block in order to `text`."""
    for number, (filename, search, replace) in enumerate(_parse_blocks(lines), 1):
        _check_filename(filename, f"SEARCH/REPLACE block {number}")
        text = _replace_once(text, search, replace, number)
    return text


def _parse_blocks(lines: list[str]) -> list[tuple[str | None, str, str]]:
    """Split the reply into (filename or None, search text, replace text) triples."""
    blocks, i, start = [], 0, 0
    while i < len(lines):
        if not SEARCH.match(lines[i]):
            i += 1
            continue
        number = len(blocks) + 1
        filename = _filename_before(lines[start:i])
        search, i = _section(lines, i + 1, "=======", number)
        replace, i = _section(lines, i + 1, ">>>>>>> REPLACE", number)
        blocks.append((filename, search, replace))
        i = start = i + 1
    return blocks


def _section(lines: list[str], i: int, end: str, number: int) -> tuple[str, int]:
    """The text from line i up to the `end` marker, and the index of that marker."""
    for j in range(i, len(lines)):
        if MARKERS[end].match(lines[j]):
            return "\n".join(lines[i:j]), j
        if any(pattern.match(lines[j]) for pattern in MARKERS.values()):
            raise EditError(f"SEARCH/REPLACE block {number} is malformed: expected a '{end}' line "
                            f"before {lines[j].strip()!r}. {FORMAT_HELP}")
    raise EditError(f"SEARCH/REPLACE block {number} is not closed: a '{end}' line is missing. "
                    + FORMAT_HELP)


def _filename_before(lines: list[str]) -> str | None:
    """The file a block or code fence names on the line just above it, if it names one."""
    for line in reversed(lines):
        if not line.strip() or FENCE.match(line):
            continue
        name = re.sub(r"^(file|filename|path)\s*:\s*", "", line.strip().strip("*`#: "), flags=re.I)
        # prose (words with spaces) is not a filename; only a path-like token is
        return name if PATH_LIKE.fullmatch(name) and not name.endswith(".") else None
    return None


def _check_filename(filename: str | None, where: str) -> None:
    if filename is not None and filename != ALLOWED_FILE:
        raise EditError(f"{where} targets {filename!r}, but only train.py may be edited: data, "
                        "tokenizer, evaluation and the harness are fixed. Edit train.py only.")


def _replace_once(text: str, search: str, replace: str, number: int) -> str:
    """Replace `search` by `replace`, insisting that `search` occurs exactly once."""
    if not search.strip():
        raise EditError(f"SEARCH/REPLACE block {number} has an empty SEARCH section. Copy the lines "
                        "to change from train.py, or send the whole new file in one ```python block.")
    count = text.count(search)
    if count == 1:
        return text.replace(search, replace, 1)
    after = " (after applying the blocks before it)" if number > 1 else ""
    if count == 0:
        raise EditError(f"The SEARCH section of block {number} matched 0 times in train.py{after}. "
                        "Copy the lines exactly, with the same spaces and indentation."
                        + _closest(search, text))
    raise EditError(f"The SEARCH section of block {number} matched {count} times in train.py{after}. "
                    "Include more of the surrounding lines so that it matches exactly once.")


def _closest(search: str, text: str) -> str:
    """A hint: the line of train.py most like the first line the model searched for."""
    wanted = next(line.strip() for line in search.splitlines() if line.strip())[:200]
    # compare code without its trailing comment: "X = 1  # why" is still close to "X = 2"
    lines = {line.split("#")[0].strip()[:200]: line.strip() for line in text.splitlines()
             if line.split("#")[0].strip()}
    match = difflib.get_close_matches(wanted.split("#")[0].strip(), list(lines), n=1, cutoff=0.6)
    return f" The closest line in train.py is: {lines[match[0]]!r}" if match else ""


def _full_file(lines: list[str]) -> str:
    """The text of the single ```python block that holds the whole new train.py."""
    fences = [i for i, line in enumerate(lines) if FENCE.match(line)]
    if len(fences) < 2:
        raise EditError("The ```python block is not closed: end it with a line of three backticks.")
    if len(fences) > 2:
        raise EditError("The reply has more than one code block. Send the whole new train.py in "
                        "exactly one ```python block, or use SEARCH/REPLACE blocks.")
    _check_filename(_filename_before(lines[: fences[0]]), "The code block")
    return "\n".join(lines[fences[0] + 1: fences[1]]) + "\n"


def _check_result(new: str, old: str) -> None:
    """The new train.py must differ from the old one, parse, and still define the model."""
    if new == old:
        raise EditError("The edit changes nothing: train.py would stay the same. Propose a real change.")
    tree = _parse(new)
    lost = (REQUIRED_NAMES & _defined(_parse(old, quiet=True))) - _defined(tree)
    if lost:
        raise EditError(f"The new train.py no longer defines {', '.join(sorted(lost))}, which the "
                        "evaluation needs. To change only part of the file, use SEARCH/REPLACE blocks.")


def _parse(source: str, quiet: bool = False) -> ast.Module | None:
    """ast.parse, turning any failure into an EditError that names the line (or None if quiet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "\d": not our business here
            return ast.parse(source)
    except SyntaxError as err:
        if quiet:
            return None
        raise EditError(f"The new train.py is not valid Python: {err.msg}{_where(err.lineno, source)}. "
                        "Fix it and send the edit again.") from None
    except (ValueError, RecursionError, MemoryError) as err:
        if quiet:
            return None
        raise EditError(f"The new train.py cannot be parsed as Python ({type(err).__name__}: {err}). "
                        "Fix it and send the edit again.") from None


def _where(lineno: int | None, source: str) -> str:
    """' at line N: <that line>', for an error message."""
    lines = source.splitlines()
    if not lineno or not 0 < lineno <= len(lines):
        return ""
    return f" at line {lineno}: {lines[lineno - 1].strip()!r}"


def _defined(tree: ast.Module | None) -> set[str]:
    """Names of the classes, functions and variables defined at the top level."""
    names = set()
    for node in tree.body if tree else []:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names
