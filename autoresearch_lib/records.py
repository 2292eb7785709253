"""results.tsv, row by row: its columns, its text format, and the signature on every row.

Upstream's five columns come first, so tools written for karpathy/autoresearch read our file;
the extra columns follow. The second column is the metric: `val_bpb` for GPT training, the
task's own metric (`mse`, `accuracy`, ...) for any other task (`columns_for`). The last
column, `sig`, is an HMAC-SHA256 of the row under a key that only the workspace's loop uses
(`.git/autoresearch/key`, made with the workspace). A training script runs as the same user as
the loop and could append a line claiming `keep 0.1`; without the key it can't sign it, so the
line is refused. The signature also covers the header and the
row's number, so a genuine row copied to another place, or moved under renamed columns, fails.

Two readers: `read_results` reads any results.tsv as it is (upstream's too, for analysis);
a workspace reads its own through `verified_rows`, which accepts only signed rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from datetime import datetime
from pathlib import Path

RESULTS_COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "timestamp",
                   "seconds", "steps", "tokens_M", "agent", "prompt_tokens", "completion_tokens",
                   "reason",
                   # the conditions a run was measured under (fair comparisons on a busy machine)
                   "tok_per_sec", "params_M", "flops_per_token", "load",
                   "sandbox",  # how training was isolated: "bwrap", or "none" (see sandbox.py)
                   "host", "device",  # where it ran: the machine, and "cpu" or the GPU's name
                   "wave",  # a parallel loop's wave (empty for one experiment at a time)
                   "sig"]  # the loop's HMAC of the row: rows it did not write are refused
UPSTREAM_COLUMNS = RESULTS_COLUMNS[:5]  # what karpathy/autoresearch writes and its tools read
HEADER = "\t".join(RESULTS_COLUMNS) + "\n"
STATUSES = ("keep", "discard", "crash",
            "recheck")  # the incumbent trained again for a fair comparison (see fairness.py)
MAX_REJECTED = 1000  # lines kept in results.rejected.tsv per rejection
METRIC_FORMAT = "{:.6g}"  # a task's metric (val_bpb keeps upstream's {:.6f})

_INTS = {"steps", "prompt_tokens", "completion_tokens", "wave"}
_FLOATS = {"val_bpb", "memory_gb", "seconds", "tokens_M", "tok_per_sec", "params_M",
           "flops_per_token", "load"}
_FORMATS = {"val_bpb": "{:.6f}", "memory_gb": "{:.1f}", "seconds": "{:.1f}", "tokens_M": "{:.3f}",
            "tok_per_sec": "{:.0f}", "params_M": "{:.3f}", "flops_per_token": "{:.4g}",
            "load": "{:.2f}"}


class ResultsError(ValueError):
    """A line of results.tsv can't be read or trusted; the message names the file and the line."""


def columns_for(metric: str = "val_bpb") -> list[str]:
    """results.tsv's columns for a task whose metric is `metric`: it names the second column."""
    if metric != "val_bpb" and metric in RESULTS_COLUMNS:
        raise ResultsError(f"the metric {metric!r} can't name results.tsv's second column: "
                           f"{metric!r} is already another of its columns "
                           f"({', '.join(RESULTS_COLUMNS[2:])}). Rename the metric in task.toml "
                           f"(and the line the command prints), e.g. \"median_{metric}\".")
    return [RESULTS_COLUMNS[0], metric, *RESULTS_COLUMNS[2:]]


def header_for(metric: str = "val_bpb") -> str:
    """The header line of results.tsv for a task whose metric is `metric`."""
    return "\t".join(columns_for(metric)) + "\n"


# ---------------------------------------------------------------- one row as text

def _cell(name: str, value, metric: bool = False) -> str:
    """One value as results.tsv text (`metric`: the value of a task's metric column)."""
    if value is None:
        return ""
    if metric and name != "val_bpb" and isinstance(value, (int, float)):
        return METRIC_FORMAT.format(value)
    if name in _INTS:
        return str(int(value))
    if name in _FORMATS and isinstance(value, (int, float)):
        return _FORMATS[name].format(value)
    # a tab or newline would split the row; a leading double quote makes pandas read on
    # across the following lines, so upstream's analysis notebook would see one row; other
    # control characters and lone surrogates (which UTF-8 can't store) become spaces too
    return one_line(str(value)).replace('"', "'")


def one_line(text: str) -> str:
    """`text` without control characters or lone surrogates: safe as a TSV cell or git message."""
    return re.sub(r"[\x00-\x1f\x7f\ud800-\udfff]", " ", text)


def format_row(row: dict, columns: list[str], key: bytes | None = None, number: int = 0) -> str:
    """A row dict as one tab-separated line in the order of `columns`, signed if they have `sig`.

    `number` is the row's place in the file (0 for the first row under the header).
    """
    known = set(RESULTS_COLUMNS) | set(columns)
    unknown = set(row) - known
    if unknown:
        raise ValueError(f"unknown results fields {sorted(unknown)}; "
                         f"the columns are {columns}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    # upstream writes 0.000000 and 0.0 for a crash, which has neither
    row = {columns[1]: 0.0, "memory_gb": 0.0, **{k: v for k, v in row.items() if v is not None}}
    fields = {name: _cell(name, row.get(name), metric=i == 1)
              for i, name in enumerate(columns) if name != "sig"}
    return _joined(fields, columns, key, number)


def _joined(fields: dict, columns: list[str], key: bytes | None, number: int) -> str:
    """The line of `fields` (text by column name) under `columns`, its signature filled in."""
    if "sig" in columns:
        fields = {**fields, "sig": signature(key, number, columns, fields)}
    return "\t".join(fields.get(name, "") for name in columns) + "\n"


def _parse_value(name: str, text: str, metric: bool = False):
    """A results.tsv field as a Python value (raises ValueError for a bad number).

    `metric`: the field is the second column, the metric, a number whatever its name."""
    if metric or name in _INTS or name in _FLOATS:
        if not text.strip() and not metric and name != "memory_gb":
            return None  # an extra column left empty
        return int(text) if name in _INTS else float(text)
    return text


def parse_line(path: Path, number: int, header: list[str], line: str) -> dict:
    """One data line of results.tsv (line `number` of the file) as a dict with every column."""
    fields = line.split("\t")
    where = f"{path}, line {number}"
    if len(fields) != len(header):
        raise ResultsError(f"{where}: expected {len(header)} tab-separated fields "
                           f"({', '.join(header)}) but found {len(fields)}. The line was probably "
                           "edited by hand or cut short; fix or delete it, then try again.")
    row = dict.fromkeys(columns_like(header))
    for i, (name, text) in enumerate(zip(header, fields)):
        try:
            row[name] = _parse_value(name, text, metric=i == 1)
        except ValueError:
            raise ResultsError(f"{where}: {name} should be a number but is {text!r}; "
                               "fix or delete that line, then try again.") from None
    return row


def columns_like(header: list[str]) -> list[str]:
    """This kit's columns, with the metric of `header` (its second column) in second place."""
    metric = header[1] if len(header) > 1 else "val_bpb"
    return [RESULTS_COLUMNS[0], metric, *RESULTS_COLUMNS[2:]]


# ---------------------------------------------------------------- a whole file

def split_lines(path: Path, data: bytes) -> tuple[list[str], list[tuple[int, str]]]:
    """(header, [(line number, line), ...]) of results.tsv's bytes; blank lines are skipped."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        number = data[: e.start].count(b"\n") + 1
        raise ResultsError(f"{path}, line {number}: not UTF-8 text (byte {data[e.start]:#04x}); the "
                           "file was damaged or edited with another encoding. Fix or delete that "
                           "line, then try again.") from None
    header = lines[0].split("\t")
    if len(header) < 5 or [header[0], *header[2:5]] != [UPSTREAM_COLUMNS[0], *UPSTREAM_COLUMNS[2:]]:
        raise ResultsError(f"{path}, line 1: the header should start with the tab-separated "
                           f"columns {' '.join(UPSTREAM_COLUMNS)} (the second one named after "
                           f"the metric), but it is {lines[0]!r}.")
    return header, [(n, line) for n, line in enumerate(lines[1:], start=2) if line.strip()]


def read_results(path: Path) -> list[dict]:
    """Every row of any results.tsv, ours or upstream's (five columns), as it is: not verified.

    For analysis. A workspace reads its own file through `verified_rows` instead.
    """
    path = Path(path)
    if not path.exists():
        return []
    header, lines = split_lines(path, path.read_bytes())
    return [parse_line(path, n, header, line) for n, line in lines]


def verified_rows(path: Path, data: bytes, key: bytes) -> tuple[list[dict], list[tuple[int, str]]]:
    """(rows whose signature holds, [(line number, line) of those whose does not]).

    Rows are numbered by how many good rows came before them, as the loop numbered them when it
    signed them: a line slipped in between fails, and the genuine rows after it still verify.
    """
    header, lines = split_lines(path, data)
    rows, bad = [], []
    for number, line in lines:
        row = parse_line(path, number, header, line)  # a damaged line stops here, as always
        if "sig" in header and hmac.compare_digest(
                row["sig"] or "", signature(key, len(rows), header, _fields(header, line))):
            rows.append(row)
        else:
            bad.append((number, line))
    return rows, bad


def unverified_error(path: Path, number: int) -> ResultsError:
    """What to say about a row without a valid signature."""
    workspace = str(Path(path).parent)
    return ResultsError(
        f"{path}, line {number}: this row is not signed by the loop (its `sig` does not match), so "
        "it was written or edited by something else: by hand, or by a training script, which "
        "runs with your rights. It is not trusted. Workspace.open("
        f"{workspace!r}) moves such rows to results.rejected.tsv (kept there, not deleted); "
        "then resume.")


def resigned(header: list[str], lines: list[str], key: bytes, metric: str = "val_bpb") -> bytes:
    """results.tsv with our header and `lines` (whose columns are named by `header`) signed again."""
    columns = columns_for(metric)
    out = [header_for(metric)]
    for number, line in enumerate(lines):
        out.append(_joined(_fields(header, line), columns, key, number))
    return "".join(out).encode()


def _fields(header: list[str], line: str) -> dict:
    return dict(zip(header, line.rstrip("\n").split("\t")))


def difference(ours: bytes, theirs: bytes) -> tuple[list[str], list[str]]:
    """(lines of `theirs` that `ours` lacks, lines of `ours` that `theirs` lacks): what was added
    to the loop's record, and what was taken out of it."""
    ours_lines, their_lines = ours.decode().split("\n"), theirs.decode("utf-8", "replace").split("\n")
    ours_set, theirs_set = set(ours_lines), set(their_lines)
    return ([line for line in their_lines if line.strip() and line not in ours_set],
            [line for line in ours_lines if line.strip() and line not in theirs_set])


def reject(path: Path, lines: list[str], why: str) -> None:
    """Keep lines taken out of results.tsv in results.rejected.tsv (`path`): when, why, the line."""
    if not lines:
        return
    kept = path.read_bytes() if path.is_file() and not path.is_symlink() else b"rejected_at\twhy\tline\n"
    when = datetime.now().isoformat(timespec="seconds")
    if len(lines) > MAX_REJECTED:  # a run that writes a gigabyte of rows can't fill the disk twice
        lines = lines[:MAX_REJECTED] + [f"... and {len(lines) - MAX_REJECTED} more lines, not kept"]
    new = "".join(f"{when}\t{one_line(why)}\t{line[:10_000]}\n" for line in lines)
    write_atomic(path, kept + new.encode())


def repair_results(path: Path, metric: str = "val_bpb") -> str | None:
    """Make results.tsv whole again: recreate it if missing, drop a half-written last line."""
    data = path.read_bytes() if path.exists() else None
    if data is not None and data.endswith(b"\n"):
        return None
    kept = data[: data.rfind(b"\n") + 1] if data else b""
    write_atomic(path, kept or header_for(metric).encode())  # a second kill now can't lose the good rows
    if data is None:
        return f"{path} was missing: started a new one"
    return f"dropped the half-written last line of {path}: {data[len(kept):]!r}"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once (a new file renamed over it, never written through
    a link): a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with open(tmp, "xb") as f:  # "x": a new file, so nothing is written through a planted link
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the signature

def signature(key: bytes | None, number: int, columns: list[str], fields: dict) -> str:
    """HMAC-SHA256 of row `number`: its columns' names and values, the `sig` column left out."""
    if key is None:
        raise ResultsError("results.tsv can't be signed: the workspace has no key. Open it with "
                           "Workspace.open(path), which makes one.")
    names = [name for name in columns if name != "sig"]
    message = "\n".join([str(number), "\t".join(names), "\t".join(fields.get(n, "") for n in names)])
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def new_key(path: Path) -> bytes:
    """Make a workspace's signing key: 32 random bytes, saved where only its owner can read them."""
    key = secrets.token_bytes(32)
    save_key(path, key)
    return key


def save_key(path: Path, key: bytes) -> None:
    """Write the key (as hex) to a new file of mode 0600, renamed over `path`."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.hex().encode())
    os.replace(tmp, path)


def load_key(path: Path) -> bytes | None:
    """The workspace's signing key, or None if it has none (made before rows were signed)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ResultsError(f"{path} is not a key the kit made (it should be 64 hex digits): it was "
                           "edited. Put back a copy, or delete it: Workspace.open then makes a new "
                           "key and signs the rows results.tsv has now.") from None
