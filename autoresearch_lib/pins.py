"""Pins: the kit's code and the evaluation data that a workspace's scores are measured with.

val_bpb numbers are comparable only while the harness, the metric and the validation tokens stay
the same. A training script runs with your rights, so it could edit `harness.py` in the installed
kit, or `val.npy` in the data cache, and every *later* honest run would score differently. So a
workspace pins both: the sha256 of each of the kit's .py files when it is made, and the
fingerprint of the prepared evaluation data before its first experiment. The loop checks them
before every experiment and stops on a mismatch. Checking is cheap: the kit's .py files and
three small data files are hashed (a few milliseconds), the corpus is read as every run reads it.

The pins live in `.git/autoresearch/pins.json`, signed with the workspace's key like the rows of
results.tsv. After a deliberate change (you upgraded the kit), pin again:
`Workspace.open(path).repin()`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from .records import write_atomic

KIT = Path(__file__).resolve().parent  # the package actually imported, wherever it is installed
UNPINNED = {"baseline/train.py"}  # the template the agent's train.py starts from: not measurement


class PinsError(RuntimeError):
    """pins.json can't be trusted: it was edited by something other than the kit."""


def kit_digests(root: Path = KIT) -> dict[str, str]:
    """sha256 of every .py file of the kit, by its path inside the package."""
    files = {path.relative_to(root).as_posix(): path for path in root.rglob("*.py")}
    return {name: hashlib.sha256(files[name].read_bytes()).hexdigest()
            for name in sorted(files) if name not in UNPINNED}


def data_pin(settings) -> dict:
    """The prepared evaluation data: its cache folder and the sha256 of the files the metric reads."""
    from . import data  # numpy and tiktoken: imported only when a loop needs them

    prepared = data.prepare(settings, verbose=False)
    return {"dir": str(prepared.dir), "files": prepared.fingerprint()}


def changes(pinned: dict, now: dict) -> list[str]:
    """What differs between two {file: digest} maps, in words: 'harness.py changed', ..."""
    return ([f"{name} changed" for name in sorted(pinned.keys() & now.keys()) if pinned[name] != now[name]]
            + [f"{name} was removed" for name in sorted(pinned.keys() - now.keys())]
            + [f"{name} was added" for name in sorted(now.keys() - pinned.keys())])


def kit_problem(pinned: dict, workspace: Path) -> str | None:
    """None if the kit's code is as pinned; else what changed, why it matters and what to do."""
    changed = changes(pinned, kit_digests())
    if not changed:
        return None
    return (f"the kit's code changed since this workspace pinned it: {_listed(changed)} (in {KIT}). "
            "Scores measured from now on would not be comparable with the earlier ones, since the "
            "harness, the metric or the loop may not be the ones that measured them. Something "
            "modified the kit; a train.py can, as it runs with your rights. Reinstall the kit "
            "(`pip install --force-reinstall autoresearch-kit`, or `git checkout -- autoresearch_lib` "
            f"in a clone), then resume. {_repin(workspace, 'upgraded the kit')}")


def data_problem(pinned: dict, settings, workspace: Path) -> str | None:
    """None if the evaluation data is as pinned; else what changed, why it matters and what to do."""
    now = data_pin(settings)
    changed = changes(pinned["files"], now["files"])
    if not changed:
        return None
    where = (f"in {now['dir']}" if now["dir"] == pinned["dir"] else
             f"now prepared in {now['dir']}, pinned in {pinned['dir']}: the corpus changed")
    return (f"the prepared evaluation data changed since this workspace pinned it: {_listed(changed)} "
            f"({where}). Scores measured from now on would not be comparable with the earlier ones. "
            "Something modified the data cache or the corpus; a train.py can, as it runs with your "
            f"rights. Delete {now['dir']} (the next run prepares it again, the same way, from the "
            "corpus), restore the corpus if it was changed, then resume. "
            f"{_repin(workspace, 'changed the data')}")


def _listed(changed: list[str]) -> str:
    return ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def _repin(workspace: Path, what: str) -> str:
    return (f"If you {what} on purpose, pin it again (later scores are then measured differently): "
            f"Workspace.open({str(workspace)!r}).repin()")


# ---------------------------------------------------------------- pins.json, signed

def save(path: Path, key: bytes, pins: dict) -> None:
    """Write the pins with their HMAC (key: the workspace's signing key)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = json.dumps({**pins, "sig": _sig(key, pins)}, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode())


def load(path: Path, key: bytes) -> dict:
    """The pins ({} if none were taken yet); PinsError if the file was not written by the kit."""
    try:
        saved = json.loads(path.read_text())
        pins = {k: v for k, v in saved.items() if k != "sig"}
        good = hmac.compare_digest(str(saved.get("sig", "")), _sig(key, pins))
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError):
        good = False
    if not good:
        raise PinsError(f"{path} was changed by something other than the kit (its signature does not "
                        "match), so the kit's code and data can't be checked against it. Something, "
                        "possibly a train.py, edited it. If the kit and its data cache are as you "
                        f"installed them, pin them again: Workspace.open({str(path.parents[2])!r})"
                        ".repin()")
    return pins


def _sig(key: bytes, pins: dict) -> str:
    return hmac.new(key, json.dumps(pins, sort_keys=True).encode(), hashlib.sha256).hexdigest()
