"""Tests for the workspace: git, results.tsv, the lock and crash recovery. All in tmp_path."""

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autoresearch_lib import baseline
from autoresearch_lib.config import get_preset
from autoresearch_lib.workspace import (RESULTS_COLUMNS, ResultsError, Workspace, WorkspaceError,
                                        WorkspaceLocked, default_tag, read_results)

ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the lock uses flock (POSIX)")


@pytest.fixture(autouse=True)
def tiny_baseline(tmp_path, monkeypatch):
    """A small stand-in for baseline/train.py and program.md: these tests are about git, not GPTs."""
    block = "".join(f"{name} = {value!r}  # a knob\n" for name, value in get_preset("quick").hparams.items())
    train = tmp_path / "baseline_train.py"
    train.write_text(f'"""a tiny train.py"""\n\n{block}\nprint("val_bpb: 1.0")\n')
    program = tmp_path / "baseline_program.md"
    program.write_text("# program\nLower val_bpb.\n")
    monkeypatch.setattr(baseline, "TRAIN_PY", train)
    monkeypatch.setattr(baseline, "PROGRAM_MD", program)


def make(tmp_path, **kwargs) -> Workspace:
    return Workspace.create(tmp_path / "ws", preset="quick", tag="test", **kwargs)


def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True, text=True).stdout


def row(commit, val_bpb, status="keep", description="an experiment", **extras):
    return dict(commit=commit, val_bpb=val_bpb, memory_gb=1.25, status=status,
                description=description, **extras)


def edited(ws, lr) -> str:
    return baseline.set_constant(ws.train_py, "MATRIX_LR", lr)


# ---------------------------------------------------------------- create and open

def test_create_makes_a_repo_on_a_branch_with_the_baseline_committed(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("to be or not to be\n")
    monkeypatch.chdir(tmp_path)
    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="nov27", budget=7, text="corpus.txt")
    assert ws.branch == "autoresearch/nov27"
    assert git(ws, "log", "--format=%s").split("\n")[0] == "baseline"
    assert git(ws, "rev-list", "--count", "HEAD").strip() == "1"
    assert sorted(git(ws, "ls-files").split()) == [".gitignore", "program.md", "settings.json", "train.py"]
    assert git(ws, "status", "--porcelain") == ""  # results.tsv and logs/ are ignored, untracked
    assert ws.results_path.read_text() == "\t".join(RESULTS_COLUMNS) + "\n"
    assert ws.results() == [] and ws.best() is None and ws.next_index() == 0
    assert ws.log_dir.is_dir() and ws.log_path(7) == ws.path / "logs" / "0007.log"
    assert "DEPTH = 2" in ws.train_py and ws.program.startswith("# program")
    assert ws.settings.preset == "quick" and ws.settings.budget == 7
    assert ws.settings.text == str(tmp_path / "corpus.txt") and ws.settings.dataset == "text"
    assert len(ws.head()) == 7


def test_create_takes_program_text_and_default_tag(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="quick", program="Only change the LR.\n")
    assert ws.program == "Only change the LR.\n"
    assert ws.branch == f"autoresearch/{default_tag()}"
    assert default_tag(dt.date(2025, 11, 27)) == "nov27" and default_tag(dt.date(2026, 3, 5)) == "mar5"


def test_create_with_the_real_baseline(tmp_path, monkeypatch):
    monkeypatch.undo()  # the files the lead writes, not the stand-in
    if not baseline.TRAIN_PY.exists() or not baseline.PROGRAM_MD.exists():
        pytest.skip("the baseline train.py / program.md are not written yet")
    ws = make(tmp_path)
    assert ws.train_py == baseline.render_train_py("quick") and ws.program == baseline.default_program()


def test_create_refuses_a_non_empty_folder_and_a_bad_tag(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="Workspace.open"):
        make(tmp_path)
    with pytest.raises(WorkspaceError, match="branch name"):
        Workspace.create(tmp_path / "other", preset="quick", tag="my run")
    assert not (tmp_path / "other").exists()  # nothing half-made


def test_open_refuses_what_is_not_a_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="not a workspace"):
        Workspace.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "settings.json").write_text("{}")
    with pytest.raises(WorkspaceError, match="no .git"):
        Workspace.open(tmp_path / "plain")


def test_open_resumes_a_clean_workspace_untouched(tmp_path):
    ws = make(tmp_path)
    base = ws.head()
    ws.append_result(row(base, 1.5))
    again = Workspace.open(ws.path)
    assert again.head() == base and again.repairs == [] and len(again.results()) == 1


# ---------------------------------------------------------------- git: commit, reset, diff

def test_commit_reset_and_diff(tmp_path):
    ws = make(tmp_path)
    base = ws.head()
    (ws.path / "program.md").write_text("edited by the human, not committed\n")
    sha = ws.commit("lower the matrix LR", edited(ws, 0.01))
    assert sha == ws.head() != base
    assert git(ws, "show", "--name-only", "--format=", sha).split() == ["train.py"]  # only train.py
    assert git(ws, "status", "--porcelain", "program.md").strip()  # still an uncommitted edit
    diff = ws.diff(base, sha)
    assert "-MATRIX_LR = 0.02" in diff and "+MATRIX_LR = 0.01" in diff
    ws.reset_to(base)
    assert ws.head() == base and "MATRIX_LR = 0.02" in ws.train_py
    (ws.path / "train.py").write_text(edited(ws, 0.05))
    assert "+MATRIX_LR = 0.05" in ws.diff(base)  # against the file on disk
    assert ws.commit("same again", ws.train_py) != ws.commit("same again", ws.train_py)


# ---------------------------------------------------------------- results.tsv

def test_results_round_trip_with_tabs_newlines_and_crashes(tmp_path):
    ws = make(tmp_path)
    ws.append_result(row("aaaaaaa", 1.2345678, seconds=300.04, steps=120, tokens_M=0.0625,
                         agent="offline", prompt_tokens=0, completion_tokens=0))
    ws.append_result(row("bbbbbbb", 1.3, "discard", "a\ttab and a\nnewline"))
    ws.append_result(dict(commit="ccccccc", val_bpb=None, memory_gb=None, status="crash",
                          description="double the width", reason="oom"))
    lines = ws.results_path.read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == len(RESULTS_COLUMNS) for line in lines)
    assert lines[3].startswith("ccccccc\t0.000000\t0.0\tcrash\tdouble the width\t")
    first, second, crash = ws.results()
    assert first["val_bpb"] == 1.234568 and first["memory_gb"] == 1.2 and first["steps"] == 120
    assert first["seconds"] == 300.0 and first["tokens_M"] == 0.062 and first["agent"] == "offline"
    assert first["timestamp"]  # filled in when not given
    assert second["description"] == "a tab and a newline" and second["steps"] is None
    assert crash["val_bpb"] == 0.0 and crash["status"] == "crash" and crash["reason"] == "oom"
    assert ws.next_index() == 3


def test_append_result_refuses_typos(tmp_path):
    ws = make(tmp_path)
    with pytest.raises(ValueError, match="status"):
        ws.append_result(row("aaaaaaa", 1.0, status="kept"))
    with pytest.raises(ValueError, match="val_bpp"):
        ws.append_result({**row("aaaaaaa", 1.0), "val_bpp": 1.0})
    assert ws.results() == []


def test_upstream_files_are_read_but_a_workspace_trusts_only_its_own_rows(tmp_path):
    upstream = tmp_path / "upstream_results.tsv"
    upstream.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                        "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    (first,) = read_results(upstream)  # upstream's own results, for analysis
    assert first["val_bpb"] == 0.9979 and first["memory_gb"] == 44.0 and first["agent"] is None
    ws = make(tmp_path)
    shutil.copy(upstream, ws.results_path)  # rows this workspace's loop never wrote
    with pytest.raises(ResultsError, match="line 2: this row is not signed by the loop"):
        ws.results()
    with pytest.warns(UserWarning, match="moved 1 row"):
        again = Workspace.open(ws.path)
    assert again.results() == [] and ws.results_path.read_text() == "\t".join(RESULTS_COLUMNS) + "\n"
    assert "a1b2c3d\t0.997900\t44.0\tkeep" in (ws.path / "results.rejected.tsv").read_text()
    again.append_result(row("b2c3d4e", 0.99, agent="offline", steps=3))
    assert again.best() == ("b2c3d4e", 0.99)


def test_best_is_the_lowest_kept_row(tmp_path):
    ws = make(tmp_path)
    ws.append_result(row("aaaaaaa", 1.5))
    ws.append_result(row("bbbbbbb", 1.1, "discard"))  # lower, but not kept
    ws.append_result(row("ccccccc", 1.4))
    ws.append_result(row("ddddddd", 0.0, "crash"))
    assert ws.best() == ("ccccccc", 1.4)


def test_corrupt_lines_name_the_file_and_line(tmp_path):
    ws = make(tmp_path)
    ws.append_result(row("aaaaaaa", 1.5))
    with open(ws.results_path, "a") as f:
        f.write("bbbbbbb\t1.4\tkeep\n")
    with pytest.raises(ResultsError, match=rf"results.tsv, line 3: expected {len(RESULTS_COLUMNS)} .* found 3"):
        ws.results()
    ws.results_path.write_text(ws.results_path.read_text().replace("1.500000", "fast"))
    with pytest.raises(ResultsError, match=r"line 2: val_bpb should be a number"):
        ws.results()


# ---------------------------------------------------------------- crash recovery on open

def test_open_drops_a_truncated_last_line(tmp_path):
    ws = make(tmp_path)
    ws.append_result(row(ws.head(), 1.5))
    with open(ws.results_path, "a") as f:
        f.write("bbbbbbb\t1.4")  # killed in the middle of a write
    with pytest.warns(UserWarning, match="half-written"):
        again = Workspace.open(ws.path)
    assert [r["val_bpb"] for r in again.results()] == [1.5]
    assert again.results_path.read_text().endswith("\n") and len(again.repairs) == 1


def test_open_undoes_an_experiment_that_was_never_recorded(tmp_path):
    ws = make(tmp_path)
    base = ws.head()
    ws.append_result(row(base, 1.5))
    kept = ws.commit("lower LR", edited(ws, 0.01))
    ws.append_result(row(kept, 1.4))
    ws.commit("higher LR", edited(ws, 0.04))  # then the loop was killed: no row
    with pytest.warns(UserWarning, match="no keep row"):
        again = Workspace.open(ws.path)
    assert again.head() == kept and "MATRIX_LR = 0.01" in again.train_py


def test_open_undoes_a_discard_that_was_recorded_but_not_reset(tmp_path):
    ws = make(tmp_path)
    ws.append_result(row(ws.head(), 1.5))
    base = ws.head()
    ws.append_result(row(ws.commit("worse", edited(ws, 0.5)), 1.9, "discard"))
    with pytest.warns(UserWarning):
        assert Workspace.open(ws.path).head() == base


def test_open_resets_a_dirty_train_py(tmp_path):
    ws = make(tmp_path)
    base = ws.head()
    (ws.path / "train.py").write_text(edited(ws, 0.3))  # an edit the loop never committed
    with pytest.warns(UserWarning, match="uncommitted"):
        again = Workspace.open(ws.path)  # nothing ran yet: back to the baseline commit
    assert again.head() == base and "MATRIX_LR = 0.02" in again.train_py
    assert git(again, "status", "--porcelain") == ""


@posix_only
def test_open_repairs_nothing_while_a_loop_holds_the_lock(tmp_path):
    ws = make(tmp_path)
    sha = ws.commit("in flight", edited(ws, 0.01))  # a live loop is training this right now
    with ws.lock():
        again = Workspace.open(ws.path)
    assert again.head() == sha and again.repairs == []


# ---------------------------------------------------------------- one loop at a time

HOLD_LOCK = """
import sys, time
from autoresearch_lib.workspace import Workspace
with Workspace.open(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(60)
"""


@posix_only
def test_lock_blocks_a_second_loop_until_the_holder_dies(tmp_path):
    ws = make(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(WorkspaceLocked, match=f"process {holder.pid}") as error:
            with ws.lock():
                pass
        assert error.value.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the OS drops the lock
        holder.wait()
    assert (ws.path / ".lock").exists()  # a stale file is left behind ...
    with ws.lock():  # ... and does not block
        assert (ws.path / ".lock").read_text().strip() == str(os.getpid())


@posix_only
def test_lock_in_the_same_process_says_so(tmp_path):
    ws = make(tmp_path)
    with ws.lock():
        with pytest.raises(WorkspaceLocked, match="this very process"):
            with Workspace(ws.path).lock():
                pass


# ---------------------------------------------------------------- upstream's analysis notebook

def test_upstream_analysis_reads_our_results(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    ws = make(tmp_path)
    ws.append_result(row(ws.head(), 1.5, description="baseline", agent="offline", steps=10))
    ws.append_result(row("bbbbbbb", 1.6, "discard", 'set "HEAD_DIM" to 64, then\ttest'))
    ws.append_result(dict(commit="ccccccc", status="crash", description="OOM", reason="oom"))
    ws.append_result(row("ddddddd", 1.4, description='"quoted", with a comma'))
    monkeypatch.chdir(ws.path)
    # the lines below are what karpathy/autoresearch's analysis.ipynb does
    df = pd.read_csv("results.tsv", sep="\t")
    df["val_bpb"] = df["val_bpb"].astype(float)
    df["memory_gb"] = pd.to_numeric(df["memory_gb"], errors="coerce")
    df["status"] = df["status"].str.strip().str.upper()
    assert len(df) == 4 and list(df.columns[:5]) == RESULTS_COLUMNS[:5]
    assert df["status"].value_counts().to_dict() == {"KEEP": 2, "DISCARD": 1, "CRASH": 1}
    kept = df[df["status"] == "KEEP"]
    assert list(kept["val_bpb"]) == [1.5, 1.4] and list(kept["val_bpb"].cummin()) == [1.5, 1.4]
    valid = df[df["status"] != "CRASH"].reset_index(drop=True)
    assert valid.loc[0, "val_bpb"] == 1.5 and kept["val_bpb"].min() == 1.4
    assert list(df["memory_gb"]) == [1.2, 1.2, 0.0, 1.2]
    assert df.loc[3, "description"] == "'quoted', with a comma"
