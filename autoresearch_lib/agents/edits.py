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

For another task (tasks.py) the same format edits the task's editable file(s): pass their texts
as a dict, {"solve.py": text}. With several editable files each block (or the code block) must
name its file on the line above it; a block naming any other file is refused.
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


def format_help(names) -> str:
    """FORMAT_HELP for the editable file(s) `names`."""
    names = list(names)
    if names == [ALLOWED_FILE]:
        return FORMAT_HELP
    if len(names) == 1:
        return FORMAT_HELP.replace("train.py", names[0])
    return (f"Reply with a one-line description of the change, then SEARCH/REPLACE blocks, each "
            f"after a line naming its file ({', '.join(names)}): a '<<<<<<< SEARCH' line, the exact "
            "lines to find in that file, a '=======' line, the new lines, a '>>>>>>> REPLACE' line.")


class EditError(ProposalError, ValueError):
    """A reply that cannot be applied. A ProposalError too, so the loop logs it as a crash."""


def apply_reply(reply: str, files: str | dict[str, str]) -> tuple[str, str | dict[str, str]]:
    """(description, new text) from a model's reply, or raise EditError.

    `files`: train.py's text (the new text comes back), or {name: text} of the editable files
    (a dict of every file comes back, the edited ones changed)."""
    texts = {ALLOWED_FILE: files} if isinstance(files, str) else dict(files)
    help = format_help(texts)
    if not isinstance(reply, str) or not reply.strip():
        raise EditError(f"The reply is empty. {help}")
    reply = THINKING.sub("", reply)  # reasoning models (deepseek-r1, qwen3) think out loud first
    lines = reply.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not any(line.strip() for line in lines):
        raise EditError(f"The reply has nothing after its <think> section. {help}")
    first = next(i for i, line in enumerate(lines) if line.strip())
    description, body = _description(lines[first], help), lines[first + 1:]
    if any(SEARCH.match(line) for line in body):
        new = _apply_blocks(body, texts)
    elif any(FENCE.match(line) for line in body):
        new = _full_file(body, texts)
    else:
        raise EditError(f"The reply has no SEARCH/REPLACE block and no ```python block. {help}")
    changed = [name for name in texts if new[name] != texts[name]]
    if not changed:
        name = " or ".join(texts)
        raise EditError(f"The edit changes nothing: {name} would stay the same. Propose a real change.")
    for name in changed:
        _check_result(new[name], texts[name], name)
    return description, (new[ALLOWED_FILE] if isinstance(files, str) else new)


def _description(line: str, help: str = FORMAT_HELP) -> str:
    """The first line, cleaned: no markdown decoration, no tabs (results.tsv is tab-separated)."""
    if SEARCH.match(line) or FENCE.match(line) or DIVIDER.match(line) or REPLACE.match(line):
        raise EditError(f"The reply must start with a one-line description of the change. {help}")
    if _filename_before([line]) is not None:
        raise EditError(f"The reply must start with a one-line description of the change, not with a "
                        f"file name ({line.strip()!r}). {help}")
    text = " ".join(line.replace("\t", " ").split()).strip("#*_` ")
    if not text:
        raise EditError(f"The first line must describe the change in words. {help}")
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def _apply_blocks(lines: list[str], texts: dict[str, str]) -> dict[str, str]:
    """Apply each SEARCH/REPLACE block in order to the file it names (or the only one)."""
    texts = dict(texts)
    for number, (filename, search, replace) in enumerate(_parse_blocks(lines), 1):
        name = _target(filename, texts, f"SEARCH/REPLACE block {number}")
        texts[name] = _replace_once(texts[name], search, replace, number, name)
    return texts


def _target(filename: str | None, texts: dict[str, str], where: str) -> str:
    """The editable file a block or code block edits: the one it names, or the only one."""
    if filename is not None:
        filename = filename[2:] if filename.startswith("./") else filename
    _check_filename(filename, where, list(texts))
    if filename is not None:
        return filename
    if len(texts) > 1:
        raise EditError(f"{where} names no file, and there are {len(texts)} editable files "
                        f"({', '.join(texts)}): put the file's name alone on the line above it.")
    return next(iter(texts))


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


def _check_filename(filename: str | None, where: str, names: list[str] = [ALLOWED_FILE]) -> None:
    if filename is None or filename in names:
        return
    if names == [ALLOWED_FILE]:
        raise EditError(f"{where} targets {filename!r}, but only train.py may be edited: data, "
                        "tokenizer, evaluation and the harness are fixed. Edit train.py only.")
    allowed = " and ".join(names)
    raise EditError(f"{where} targets {filename!r}, but only {allowed} may be edited: the task's "
                    f"other files (its scorer, its data) are fixed. Edit {allowed} only.")


def _replace_once(text: str, search: str, replace: str, number: int, name: str = ALLOWED_FILE) -> str:
    """Replace `search` by `replace`, insisting that `search` occurs exactly once."""
    if not search.strip():
        raise EditError(f"SEARCH/REPLACE block {number} has an empty SEARCH section. Copy the lines "
                        f"to change from {name}, or send the whole new file in one ```python block.")
    count = text.count(search)
    if count == 1:
        return text.replace(search, replace, 1)
    after = " (after applying the blocks before it)" if number > 1 else ""
    if count == 0:
        raise EditError(f"The SEARCH section of block {number} matched 0 times in {name}{after}. "
                        "Copy the lines exactly, with the same spaces and indentation."
                        + _closest(search, text, name))
    raise EditError(f"The SEARCH section of block {number} matched {count} times in {name}{after}. "
                    "Include more of the surrounding lines so that it matches exactly once.")


def _closest(search: str, text: str, name: str = ALLOWED_FILE) -> str:
    """A hint: the line of the file most like the first line the model searched for."""
    wanted = next(line.strip() for line in search.splitlines() if line.strip())[:200]
    # compare code without its trailing comment: "X = 1  # why" is still close to "X = 2"
    lines = {line.split("#")[0].strip()[:200]: line.strip() for line in text.splitlines()
             if line.split("#")[0].strip()}
    match = difflib.get_close_matches(wanted.split("#")[0].strip(), list(lines), n=1, cutoff=0.6)
    return f" The closest line in {name} is: {lines[match[0]]!r}" if match else ""


def _full_file(lines: list[str], texts: dict[str, str]) -> dict[str, str]:
    """The files with the one named above the single ```python block replaced by its text."""
    fences = [i for i, line in enumerate(lines) if FENCE.match(line)]
    if len(fences) < 2:
        raise EditError("The ```python block is not closed: end it with a line of three backticks.")
    name = " or ".join(texts)
    if len(fences) > 2:
        raise EditError(f"The reply has more than one code block. Send the whole new {name} in "
                        "exactly one ```python block, or use SEARCH/REPLACE blocks.")
    target = _target(_filename_before(lines[: fences[0]]), texts, "The code block")
    return {**texts, target: "\n".join(lines[fences[0] + 1: fences[1]]) + "\n"}


def _check_result(new: str, old: str, name: str = ALLOWED_FILE) -> None:
    """A new .py file must parse; a new train.py must still define the model."""
    if not name.endswith(".py"):
        return  # not Python: the task's run will say whether it works
    tree = _parse(new, name=name)
    lost = (REQUIRED_NAMES & _defined(_parse(old, quiet=True))) - _defined(tree)
    if lost:
        raise EditError(f"The new {name} no longer defines {', '.join(sorted(lost))}, which the "
                        "evaluation needs. To change only part of the file, use SEARCH/REPLACE blocks.")


def _parse(source: str, quiet: bool = False, name: str = ALLOWED_FILE) -> ast.Module | None:
    """ast.parse, turning any failure into an EditError that names the line (or None if quiet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "\d": not our business here
            return ast.parse(source)
    except SyntaxError as err:
        if quiet:
            return None
        raise EditError(f"The new {name} is not valid Python: {err.msg}{_where(err.lineno, source)}. "
                        "Fix it and send the edit again.") from None
    except (ValueError, RecursionError, MemoryError) as err:
        if quiet:
            return None
        raise EditError(f"The new {name} cannot be parsed as Python ({type(err).__name__}: {err}). "
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
