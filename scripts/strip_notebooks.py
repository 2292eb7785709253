"""Apply the notebooks' output policy in place: outputs only where the tests check them.

Policy (enforced by tests/test_notebooks_policy.py):
- a code cell whose first line is `# NBVAL_CHECK_OUTPUT` keeps its outputs and its
  execution_count (nbval compares them; a cell with outputs but no count fails as
  "Unrun reference cell has outputs");
- every other code cell has no outputs and execution_count null;
- no per-cell execution metadata, no widget state, a minimal language_info.

Usage:
    python scripts/strip_notebooks.py                 # strip notebooks/*.ipynb
    python scripts/strip_notebooks.py --execute       # run them in quick mode first, then strip
    python scripts/strip_notebooks.py --check         # exit 1 if any notebook breaks the policy
    python scripts/strip_notebooks.py notebooks/01_explore_tokenizer.ipynb ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
ROOT = Path(__file__).resolve().parent.parent


def is_checked(cell: dict) -> bool:
    source = "".join(cell.get("source", ""))
    return cell.get("cell_type") == "code" and source.lstrip().startswith(CHECK_MARK)


def strip(nb: dict) -> dict:
    """The notebook with the policy applied (a new dict; `nb` is not changed)."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)  # nbconvert's timestamps
        if cell["cell_type"] != "code":
            continue
        if is_checked(cell):
            errors = [o for o in cell["outputs"] if o.get("output_type") == "error"]
            if errors or not cell["outputs"] or cell.get("execution_count") is None:
                raise ValueError("a # NBVAL_CHECK_OUTPUT cell has an error or was not run: "
                                 "execute the notebook (--execute) before stripping")
        else:
            cell["outputs"], cell["execution_count"] = [], None
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)  # tqdm / ipywidgets state: large and machine-specific
    meta["language_info"] = {"name": "python"}
    return nb


def execute(path: Path) -> None:
    """Run a notebook top to bottom in quick mode, writing its outputs into it."""
    env = dict(os.environ, AUTORESEARCH_QUICK="1")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                    "--inplace", "--ExecutePreprocessor.timeout=600", str(path.resolve())],
                   check=True, env=env, cwd=path.resolve().parent)


def dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--execute", action="store_true", help="run each notebook in quick mode first")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a violation")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    bad = []
    for path in paths:
        if args.execute and not args.check:
            execute(path)
        text = path.read_text()
        try:
            new = dump(strip(json.loads(text)))
        except ValueError as e:
            if not args.check:
                raise SystemExit(f"{path}: {e}") from None
            bad.append((path, str(e)))
            continue
        if args.check:
            if json.loads(new) != json.loads(text):
                bad.append((path, f"outputs outside {CHECK_MARK} cells (run scripts/strip_notebooks.py)"))
        elif new != text:
            path.write_text(new)
            print(f"stripped {path}")
    for path, problem in bad:
        print(f"{path}: {problem}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
