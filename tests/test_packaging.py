"""Packaging: environment.yml and pyproject.toml name the same dependencies; the CLI works."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch"}  # conda's name → PyPI's name


def names(requirements):
    return {re.split(r"[<>=!~\[ ]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"]) | names(project["optional-dependencies"]["test"])
    conda, in_deps = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        in_deps = in_deps or line.startswith("dependencies:")
        m = re.match(r"^\s+- ([A-Za-z][\w.-]*)", line)
        if in_deps and m and m[1] not in ("python", "pip"):
            conda.append(CONDA_NAMES.get(m[1], m[1]))
    assert names(conda) == wanted
    assert {"torch", "jupyterlab", "ipywidgets", "matplotlib", "tiktoken", "openai", "nbval"} <= wanted


def test_cli_trains_and_samples(tmp_path, cache):
    out = subprocess.run(
        [sys.executable, "-m", "autoresearch_lib", "train", "--preset", "quick", "--budget", "2",
         "--run-dir", str(tmp_path / "run"), "--sample", "20"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^val_bpb:\s+\d+\.\d{6}$", out.stdout, re.MULTILINE)
    assert "--- sample 1 ---" in out.stdout


def test_cli_reports_bad_input_clearly(tmp_path, cache):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00\x00binary")
    out = subprocess.run([sys.executable, "-m", "autoresearch_lib", "prepare", "--text", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "error:" in out.stderr and "binary" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_flash_attention_4_check_says_why_it_fails_and_exits_non_zero():
    """setup_venv.sh keeps flash-attn-4 only if this check passes; here (no GPU) it cannot."""
    check = subprocess.run([sys.executable, "scripts/check_flash_attention_4.py"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1, check.stderr
    assert "no CUDA GPU here" in check.stdout
    assert "scripts/check_flash_attention_4.py" in (ROOT / "scripts" / "setup_venv.sh").read_text()
