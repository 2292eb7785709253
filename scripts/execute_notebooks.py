"""Run the notebooks in place and clean their outputs, so they can be committed with results.

The committed notebooks carry their executed outputs and figures (a reader on GitHub sees the
results). This script produces them, and tests/test_notebooks_policy.py enforces the policy:

- every code cell was run (it has an execution_count); outputs and images are kept;
- no absolute paths of this machine: the repository root becomes a relative path, the home
  folder `~`, and temporary folders `…/<name>`;
- no secrets: values of secret-named environment variables (autoresearch_lib.redact) are hidden;
- no widget state: `metadata.widgets` is dropped, and a widget output keeps only a readable
  text fallback (or goes, if its fallback is a widget's repr);
- progress bars are stored as their last state (carriage returns resolved), not every update;
- no error outputs: a notebook that fails is reported and left unchanged.

Usage:
    python scripts/execute_notebooks.py                       # every notebook, quick mode
    python scripts/execute_notebooks.py notebooks/01_*.ipynb  # some of them
    python scripts/execute_notebooks.py --full                # full mode (AUTORESEARCH_QUICK=0)
    python scripts/execute_notebooks.py --clean-only          # clean stored outputs, run nothing
    python scripts/execute_notebooks.py --fix-setup           # rewrite install cells and badges
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from autoresearch_lib.config import REPO_URL  # noqa: E402
from autoresearch_lib.redact import redact  # noqa: E402

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_REPR_RE = re.compile(r"^\s*(HBox|VBox|FloatProgress|IntProgress|HTML|Output|Button|Label)\(")
TEMP_PATH_RE = re.compile(r"(/private)?/(tmp|var/folders/[^\s'\"/]+/[^\s'\"/]+/T)/")

# The markdown cell right before it, with this notebook's running times (e.g. "1 minute").
SETUP_MARKDOWN = ("**Before you start.** Running time: about {quick} in quick mode on a CPU (the default), "
                  "about {t4} in full mode on a Colab T4 GPU, about {cpu} in full mode on a laptop CPU. "
                  "On Colab, run the install cell, then Runtime → Restart runtime, and run the notebook "
                  "from the top.")
TIME_RE = r"(\d+ (?:seconds?|minutes?|hours?))"  # "40 seconds", "1 minute", "12 minutes"
SETUP_MARKDOWN_RE = re.compile(re.escape(SETUP_MARKDOWN).replace(r"\{quick\}", TIME_RE)
                               .replace(r"\{t4\}", TIME_RE).replace(r"\{cpu\}", TIME_RE) + "$")
# The first code cell of every notebook, exactly (tests/test_notebooks_policy.py checks it).
SETUP_CELL = f'''\
# Set-up: quick or full mode, the kit on Colab, and the machine these outputs come from
import os
import sys

os.environ.setdefault("AUTORESEARCH_QUICK", "1")  # "1": tiny models, seconds per run; set "0" for full runs
if "google.colab" in sys.modules:  # on Colab only: install the kit, then Runtime → Restart runtime
    !pip install -q git+{REPO_URL}

import autoresearch_lib as ar

print(ar.config.describe_machine())'''
COLAB_PREFIX = "https://colab.research.google.com/github/" + REPO_URL.removeprefix("https://github.com/")
COLAB_RE = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+")


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def machine_paths() -> list[tuple[str, str]]:
    """(absolute path, what it becomes) pairs, the most specific first."""
    pairs = [(str(ROOT / "notebooks") + "/", ""), (str(ROOT / "notebooks"), "."),
             (str(ROOT) + "/", "../"), (str(ROOT), ".."), (str(Path.home()), "~")]
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def clean_text(text: str) -> str:
    """Text without this machine's absolute paths or secrets, progress bars at their last state."""
    for path, short in machine_paths():
        text = text.replace(path, short)
    text = TEMP_PATH_RE.sub("…/", text)
    return redact(text)


def last_state(text: str) -> str:
    """A stream as a terminal shows it: each line keeps what follows its last carriage return."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1] if parts else "")
    return "\n".join(lines)


def clean_outputs(outputs: list[dict]) -> list[dict]:
    merged = []  # consecutive pieces of one stream joined first, so carriage returns resolve across them
    for out in outputs:
        if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1]["name"] == out["name"]):
            merged[-1] = dict(merged[-1], text=source({"source": merged[-1]["text"]}) + source({"source": out["text"]}))
        else:
            merged.append(out)
    cleaned = []
    for out in merged:
        kind = out.get("output_type")
        if kind == "stream":
            out = dict(out, text=last_state(clean_text(source({"source": out.get("text", "")}))))
            if not out["text"].strip():
                continue
        elif kind in ("display_data", "execute_result"):
            data = dict(out.get("data", {}))
            if WIDGET_MIME in data:
                data.pop(WIDGET_MIME)
                plain = source({"source": data.get("text/plain", "")})
                if not plain.strip() or WIDGET_REPR_RE.match(plain):
                    continue  # a widget with no readable fallback: nothing worth keeping
            for mime, value in data.items():
                if mime.startswith("text/") or mime.endswith("json"):
                    data[mime] = clean_text(source({"source": value})) if isinstance(value, (str, list)) else value
            out = dict(out, data=data)
        cleaned.append(out)
    return cleaned


def clean(nb: dict) -> dict:
    """The notebook with the output policy applied (a new dict)."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)  # nbclient's timestamps
        if cell["cell_type"] == "code":
            cell["outputs"] = clean_outputs(cell.get("outputs", []))
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    meta["language_info"] = {"name": "python"}
    return nb


def fix_setup(nb: dict) -> dict:
    """The notebook with SETUP_CELL as its first code cell, a "Before you start" cell before it (with
    UNMEASURED in place of the running times, which the policy test refuses until you write the
    times you measured), and Colab badges at REPO_URL."""
    nb = json.loads(json.dumps(nb))
    i = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    if source(nb["cells"][i]) != SETUP_CELL:  # what the old cell also did must move to the next cells
        nb["cells"][i].update(source=SETUP_CELL, outputs=[], execution_count=None)
    before = nb["cells"][i - 1] if i else {"cell_type": "code"}
    if before["cell_type"] != "markdown" or not SETUP_MARKDOWN.split("{")[0] in source(before):
        unmeasured = SETUP_MARKDOWN.format(quick="UNMEASURED", t4="UNMEASURED", cpu="UNMEASURED")
        nb["cells"].insert(i, {"cell_type": "markdown", "metadata": {}, "source": unmeasured})
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = COLAB_RE.sub(COLAB_PREFIX, source(cell))
    return nb


def execute(nb: dict, path: Path, full: bool, timeout: int) -> dict:
    """Run `nb` top to bottom in the notebook's folder, in quick or full mode."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["AUTORESEARCH_QUICK"] = "0" if full else "1"  # the kernel inherits it
    node = nbformat.reads(json.dumps(nb), as_version=4)  # sources as strings, as nbclient expects
    NotebookClient(node, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return json.loads(nbformat.writes(node))


def dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--full", action="store_true", help="full mode (AUTORESEARCH_QUICK=0): minutes, not seconds")
    parser.add_argument("--clean-only", action="store_true", help="do not run: only clean the stored outputs")
    parser.add_argument("--fix-setup", action="store_true",
                        help="make each first code cell the set-up template and badges point at REPO_URL")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may take (default 900)")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    failed = []
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if args.fix_setup:
            nb = fix_setup(nb)
        t0 = time.time()
        if not args.clean_only:
            try:
                nb = execute(nb, path.resolve(), args.full, args.timeout)
            except Exception as e:  # nbclient's CellExecutionError carries the cell's traceback
                print(f"FAILED {path}: {e}\n(the notebook is left unchanged: fix the cell and run again)",
                      file=sys.stderr)
                failed.append(path)
                continue
        path.write_text(dump(clean(nb)), encoding="utf-8")
        print(f"{path.name}: {'cleaned' if args.clean_only else f'ran in {time.time() - t0:.0f} s'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
