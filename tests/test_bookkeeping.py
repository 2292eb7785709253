"""Bookkeeping a training run cannot touch: each test is an attack by a train.py, run through the
real loop, and what stops it. docs/reliability.md lists them.

The train.py under attack runs as the loop's user, with cwd = runs/NNNN/ inside the workspace,
and no sandbox (AUTORESEARCH_SANDBOX=0: macOS, a restricted Colab). It could forge rows of
results.tsv, plant git hooks, delete .lock, read the loop's environment through /proc, or change
the kit's code or the cached evaluation data. Where the run itself matters it is a real one
(runner.run_training); where only the loop's reaction does, an executor plays the run's part.
"""

import ctypes
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from autoresearch_lib import loop, pins, records
from autoresearch_lib.agents import ScriptedAgent
from autoresearch_lib.runner import TrainResult, run_training
from autoresearch_lib.workspace import (KEY_FILE, PINS_FILE, RESULTS_COLUMNS, ResultsError, Workspace,
                                        WorkspaceError, read_results)

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bookkeeping-DO-NOT-LEAK-777"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock, /proc, prctl")


@pytest.fixture(autouse=True)
def no_sandbox(monkeypatch):
    """The attacks that matter when no sandbox is available: every run here is unsandboxed."""
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "0")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the loop's secret, which a run must never see


# ---------------------------------------------------------------- helpers

def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True,
                          text=True).stdout.strip()


class Runs:
    """run_training's signature. Each call takes the next item: a float is an instant finished run
    with that val_bpb; "real" runs the script for real; a callable does what a run would (it gets
    the run folder) and then 'finishes' with val_bpb 0.5 (better than any best here)."""

    def __init__(self, *items):
        self.items = list(items)

    def __call__(self, script_text, settings, run_dir, **kwargs):
        item = self.items.pop(0)
        if item == "real":
            return run_training(script_text, settings, run_dir, **kwargs)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if callable(item):
            item(Path(run_dir))
            item = 0.5
        log = Path(run_dir) / "run.log"
        log.write_text(f"---\nval_bpb: {item}\n")
        return TrainResult(status="ok", val_bpb=item, log_path=str(log), run_dir=str(run_dir))


def script(description: str, code: str):
    """A scripted proposal whose train.py is `code`."""
    return lambda state: (description, textwrap.dedent(code))


def lr(value: float):
    return (f"MATRIX_LR -> {value}", {"MATRIX_LR": value})


@pytest.fixture
def ws(tmp_path, cache):
    """A workspace whose (pretend) baseline has run: val_bpb 1.0, kept."""
    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="test", budget=1, cache_dir=str(cache))
    assert loop.step(ws, ScriptedAgent([]), executor=Runs(1.0)).status == "keep"
    return ws


def assert_consistent(ws, best: tuple) -> None:
    """Nothing lost: every row verifies, the branch is at the best verified commit, nothing to repair."""
    again = Workspace.open(ws.path)
    assert again.repairs == [] and again.best() == best and again.head() == best[0]
    assert git(ws, "status", "--porcelain") == ""


def resumes(ws) -> None:
    """The loop goes on from here."""
    exp = loop.step(Workspace.open(ws.path), ScriptedAgent([lr(0.03)]), executor=Runs(0.9))
    assert exp.status == "keep"


FORGE = """
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd="../..",
                            capture_output=True, text=True).stdout.strip()
    with open("../../results.tsv", "a") as f:  # a new best, with the commit under test
        f.write("\\t".join([commit, "0.100000", "1.0", "keep", "a miracle"] + [""] * {extra}) + "\\n")
"""


# ---------------------------------------------------------------- forged bookkeeping

def test_a_run_that_appends_a_keep_row_is_a_tampered_crash_and_the_branch_stays(ws):
    """The attack as reported: a good run that also appends `keep 0.100000` to results.tsv."""
    root = ws.head()
    forge = FORGE.format(extra=len(RESULTS_COLUMNS) - 5)
    agent = ScriptedAgent([lambda s: ("train, and forge a row", textwrap.dedent(forge) + s.train_py)])
    (exp,) = loop.run(ws, agent, max_experiments=1, executor=Runs("real"))
    assert exp.result.ok, exp.result.error_tail  # the training itself went fine ...
    assert exp.status == "crash" and exp.val_bpb is None  # ... but the run touched the record
    assert exp.reason.startswith("tampered: results.tsv changed during the run: 1 line(s) the loop "
                                 "did not write, moved to results.rejected.tsv")
    rows = ws.results()
    assert [(r["status"], r["reason"][:9]) for r in rows] == [("keep", ""), ("crash", "tampered:")]
    assert "a miracle" not in ws.results_path.read_text()
    rejected = (ws.path / "results.rejected.tsv").read_text()
    assert f"{exp.commit}\t0.100000\t1.0\tkeep\ta miracle" in rejected  # kept, not deleted
    assert ws.head() == root != exp.commit  # the branch never moved to the forged "best"
    assert_consistent(ws, (root, 1.0))
    resumes(ws)


def signed_with_stolen_key(run_dir: Path) -> None:
    """A run that reads the workspace key and signs its forged row properly."""
    ws_dir = run_dir.parents[1]
    key = records.load_key(ws_dir / KEY_FILE)
    number = len(read_results(ws_dir / "results.tsv"))
    row = {"commit": "abcdef0", "val_bpb": 0.1, "status": "keep", "description": "signed forgery"}
    with open(ws_dir / "results.tsv", "a") as f:
        f.write(records.format_row(row, RESULTS_COLUMNS, key, number))


def replace_key(run_dir: Path) -> None:
    records.save_key(run_dir.parents[1] / KEY_FILE, b"\0" * 32)  # so that it can sign rows later


def truncate(run_dir: Path) -> None:
    path = run_dir.parents[1] / "results.tsv"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # the baseline's row is gone


def link_out(run_dir: Path) -> None:
    path = run_dir.parents[1] / "results.tsv"
    elsewhere = run_dir / "mine.tsv"
    elsewhere.write_text(path.read_text() + "abcdef0\t0.1\t1.0\tkeep\tmine\n")
    path.unlink()
    path.symlink_to(elsewhere)


def commit_on_the_branch(run_dir: Path) -> None:
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "sneaky"], cwd=run_dir.parents[1],
                   check=True)


@pytest.mark.parametrize("attack, said", [
    (signed_with_stolen_key, "results.tsv changed during the run: 1 line(s) the loop did not write"),
    (truncate, "results.tsv changed during the run: 1 of its lines removed or edited"),
    (lambda d: (d.parents[1] / "results.tsv").unlink(), "results.tsv changed during the run: it was deleted"),
    (link_out, "results.tsv changed during the run: it was deleted or replaced by something that is not"),
    (replace_key, "the workspace key (.git/autoresearch/key) was replaced during the run"),
    (commit_on_the_branch, "HEAD moved during the run"),
])
def test_whatever_a_run_does_to_the_record_it_is_put_back_and_the_run_is_a_crash(ws, attack, said):
    """Even a run that read the key can't get a row in: the loop compares the file with what it
    wrote itself, kept in memory while it holds the workspace."""
    root, before = ws.head(), ws.results_path.read_bytes()
    (exp,) = loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=Runs(attack))
    assert exp.status == "crash" and exp.reason.startswith(f"tampered: {said}"), exp.reason
    assert ws.results_path.read_bytes().startswith(before) and not ws.results_path.is_symlink()
    assert [r["status"] for r in ws.results()] == ["keep", "crash"]
    assert records.load_key(ws.path / KEY_FILE) != b"\0" * 32
    assert_consistent(ws, (root, 1.0))
    resumes(ws)


def test_a_run_the_user_stopped_is_not_recorded_and_its_forged_row_does_not_stay(ws):
    before = ws.results_path.read_bytes()

    def forge_then_stop(script_text, settings, run_dir, stop=None, **kwargs):
        with open(ws.results_path, "a") as f:
            f.write("\t".join(["abcdef0", "0.100000", "1.0", "keep", "while stopping"] + [""] * (len(RESULTS_COLUMNS) - 5)) + "\n")
        stop.set()  # the user pressed stop while this run trained
        return TrainResult(status="stopped", reason="stopped by the user")

    stop = threading.Event()
    assert loop.run(ws, ScriptedAgent([lr(0.03)]), stop=stop, executor=forge_then_stop) == []
    assert ws.results_path.read_bytes() == before  # nothing recorded, nothing foreign kept
    assert "while stopping" in (ws.path / "results.rejected.tsv").read_text()
    resumes(ws)


@pytest.mark.parametrize("forgery", ["made up", "a copy of a genuine row", "a genuine row, edited"])
def test_a_row_forged_between_loops_is_refused_and_open_moves_it_out(ws, forgery):
    root, genuine = ws.head(), ws.results_path.read_text().splitlines()[1]
    line = {"made up": "\t".join(["abcdef0", "0.100000", "1.0", "keep", "by hand"] + [""] * (len(RESULTS_COLUMNS) - 5)),
            "a copy of a genuine row": genuine,  # signed, but for row 0, not row 1
            "a genuine row, edited": genuine.replace("1.000000", "0.100000")}[forgery]
    with open(ws.results_path, "a") as f:
        f.write(line + "\n")
    agent = ScriptedAgent([lr(0.03)])
    with pytest.raises(ResultsError, match=r"line 3: this row is not signed by the loop .*"
                                           r"Workspace.open\(.*results.rejected.tsv"):
        loop.run(ws, agent, max_experiments=1, executor=Runs(0.5))
    assert agent.used == 0  # the loop never trusted it, not even to pick the best
    with pytest.warns(UserWarning, match=r"moved 1 row\(s\) the loop did not write \(line\(s\) 3"):
        again = Workspace.open(ws.path)
    assert line in (ws.path / "results.rejected.tsv").read_text()
    assert ws.results_path.read_text().splitlines()[1:] == [genuine]
    assert again.best() == (root, 1.0)
    resumes(ws)


def test_a_workspace_made_before_signatures_is_adopted_once(ws):
    """An older workspace: no key, no `sig` column. open signs its rows, once, and says so."""
    loop.run(ws, ScriptedAgent([lr(0.03)]), max_experiments=1, executor=Runs(1.2))  # a discard
    old_columns = RESULTS_COLUMNS[:13]  # the columns before run conditions and signatures
    lines = [row.split("\t")[:13] for row in ws.results_path.read_text().splitlines()[1:]]
    ws.results_path.write_text("\n".join("\t".join(r) for r in [old_columns] + lines) + "\n")
    shutil.rmtree(ws.path / ".git" / "autoresearch")  # no key and no pins yet
    with pytest.raises(WorkspaceError, match="no key to sign and check results.tsv"):
        ws.results()
    with pytest.warns(UserWarning, match="signed the 2 rows of results.tsv with a new workspace key"):
        again = Workspace.open(ws.path)
    assert ws.results_path.read_text().splitlines()[0].split("\t") == RESULTS_COLUMNS
    assert [r["status"] for r in again.results()] == ["keep", "discard"]
    assert Workspace.open(ws.path).repairs == []  # once
    resumes(ws)  # and the pins are taken before that experiment
    assert set(json.loads((ws.path / PINS_FILE).read_text())) == {"kit", "data", "sig"}


def test_the_key_is_private_and_never_committed(ws):
    key_file = ws.path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) == 64 and key not in git(ws, "log", "-p", "--all")
    assert KEY_FILE not in git(ws, "ls-files")


# ---------------------------------------------------------------- escapes and secrets

HOOKS = ["pre-commit", "post-commit", "reference-transaction", "post-index-change", "post-checkout",
         "post-rewrite"]
PLANT = """
    import os, subprocess
    from pathlib import Path
    for name in {hooks!r}:  # each hook writes its environment where the attacker can read it
        hook = Path("../../.git/hooks") / name
        hook.write_text("#!/bin/sh\\nenv > {out}/hook-" + name + "\\n")
        hook.chmod(0o755)
    Path("../../.git/fsmonitor").write_text("#!/bin/sh\\nenv > {out}/fsmonitor\\n")
    Path("../../.git/fsmonitor").chmod(0o755)
    subprocess.run(["git", "config", "core.fsmonitor", str(Path("../../.git/fsmonitor").resolve())],
                   cwd="../..", check=True)
"""


@linux_only
def test_git_hooks_and_an_fsmonitor_planted_by_a_run_never_run_in_the_loops_git(ws, tmp_path):
    out = tmp_path / "stolen"
    out.mkdir()
    plant = script("plant hooks", PLANT.format(hooks=HOOKS, out=out))
    done = loop.run(ws, ScriptedAgent([plant, lr(0.03), lr(0.04)]), max_experiments=3,
                    executor=Runs("real", 0.9, 0.95))
    assert [e.status for e in done] == ["crash", "keep", "discard"]  # commits, resets, diffs ran
    assert (ws.path / ".git" / "hooks" / "post-commit").exists()  # planted, and ready
    assert git(ws, "config", "core.fsmonitor").endswith("fsmonitor")
    assert list(out.iterdir()) == [], "a planted hook ran inside the loop's git"
    # the same hooks do run for a plain git: so the test would see one that ran
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "by hand"], cwd=ws.path, check=True)
    assert (out / "hook-post-commit").exists() and KEY in (out / "hook-post-commit").read_text()


@linux_only
def test_the_loops_git_runs_with_hooks_off_and_an_environment_without_secrets(ws, tmp_path, monkeypatch):
    record = tmp_path / "git-calls"
    shim = tmp_path / "bin" / "git"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\n{{ echo "ARGS $*"; env; }} >> {record}\nexec {shutil.which("git")} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_TOKEN", "hf_bookkeeping_secret_1")
    loop.run(ws, ScriptedAgent([lr(0.03), lr(0.04)]), max_experiments=2, executor=Runs(0.9, 0.95))
    calls = record.read_text()
    assert calls.count("ARGS ") >= 6  # commit, reset, rev-parse, ...: all through the shim
    assert calls.count("ARGS ") == calls.count("core.hooksPath=/dev/null -c core.fsmonitor=false")
    for leaked in (KEY, "OPENAI_API_KEY", "hf_bookkeeping_secret_1", "HF_TOKEN"):
        assert leaked not in calls


@linux_only
def test_deleting_dot_lock_does_not_let_a_second_loop_in(ws):
    second = ("import sys\nfrom autoresearch_lib import loop\nfrom autoresearch_lib.agents import "
              "ScriptedAgent\nfrom autoresearch_lib.workspace import Workspace, WorkspaceLocked\n"
              "try:\n    loop.step(Workspace.open(sys.argv[1]), ScriptedAgent([]))\n"
              "except WorkspaceLocked as e:\n    print(e)\n    sys.exit(3)\n")
    tries = []

    def then_a_second_loop(script_text, settings, run_dir, **kwargs):
        result = run_training(script_text, settings, run_dir, **kwargs)  # deletes .lock
        tries.append(((ws.path / ".lock").exists(),
                      subprocess.run([sys.executable, "-c", second, str(ws.path)], cwd=ROOT,
                                     capture_output=True, text=True, timeout=120)))
        return result

    delete = script("delete the lock", "import os\nos.remove('../../.lock')\n")
    (exp,) = loop.run(ws, ScriptedAgent([delete]), max_experiments=1, executor=then_a_second_loop)
    (lock_file_there, child), = tries
    assert not lock_file_there  # the run did delete it ...
    assert child.returncode == 3, child.stdout + child.stderr  # ... and a second loop was refused
    assert "is in use by another loop, held by another process" in child.stdout
    assert exp.status == "crash" and len(ws.results()) == 2
    resumes(ws)  # the first loop let go: the next one gets in


PEEK = """
    import os
    def parent(pid):
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    loop_pid = parent(os.getppid())  # the launcher's parent: the loop's process
    try:  # the loop's environment holds OPENAI_API_KEY
        seen = open(f"/proc/{loop_pid}/environ", "rb").read()
        print("PEEK read it; key there:", b"OPENAI_API_KEY=" in seen)
    except OSError as e:
        print("PEEK refused:", type(e).__name__)
"""
PEEK_LOOP = """
import sys
from pathlib import Path
from autoresearch_lib import loop
from autoresearch_lib.agents import ScriptedAgent
from autoresearch_lib.runner import run_training
from autoresearch_lib.workspace import Workspace

ws, peek = Workspace(sys.argv[1]), Path(sys.argv[2]).read_text()
control = run_training(peek, ws.settings, ws.path.parent / "control")  # before any loop held it
print("CONTROL", [l for l in open(control.log_path) if l.startswith("PEEK")])
loop.run(Workspace.open(ws.path), ScriptedAgent([lambda s: ("peek", peek)]), max_experiments=1)
print("LOOP", [l for l in open(ws.log_path(1)) if l.startswith("PEEK")])
"""


def drop_privileges():
    """In the child, before exec: drop every capability (root keeps uid 0 but loses CAP_SYS_PTRACE
    and the like, so /proc protects the loop from it as from any same-user process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly past the last one


@linux_only
def test_a_run_cannot_read_the_loops_environment_through_proc(ws, tmp_path):
    """The loop runs in a child without privileges, as an ordinary user's loop does: root could
    read any /proc file. Dropping every capability stands in for setuid(65534), which can't run
    this environment's Python (it lives under /root, mode 0700); same uid, same protection."""
    (tmp_path / "peek.py").write_text(textwrap.dedent(PEEK))
    # unsandboxed: the sandbox's own PID namespace would hide the loop anyway (the control run
    # would then find no key to read); this defence is for machines without one
    child = subprocess.run([sys.executable, "-c", PEEK_LOOP, str(ws.path), str(tmp_path / "peek.py")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           preexec_fn=drop_privileges, env={**os.environ, "AUTORESEARCH_SANDBOX": "0"})
    assert child.returncode == 0, child.stderr
    control = re.search(r"^CONTROL (.*)$", child.stdout, re.M)[1]
    if "read it; key there: True" not in control:  # e.g. hidepid, or a hardened kernel
        pytest.skip(f"this system already hides /proc/<pid>/environ from the same user: {control}")
    assert "PEEK refused: PermissionError" in re.search(r"^LOOP (.*)$", child.stdout, re.M)[1]
    assert KEY not in child.stdout + ws.log_path(1).read_text()


@pytest.mark.parametrize("key_set", ["before the run", "only after it"])
def test_a_crash_log_with_the_key_reaches_the_agent_redacted(ws, tmp_path, monkeypatch, key_set):
    """A run prints a key it found in a file. The crash tail an LLM agent sends to its server
    never has it, even when the key was set only later (a notebook switching to an LLM agent)."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.openai.com password {KEY}\n")  # a file the run can read
    leak = script("leak", f"""
        key = open({str(netrc)!r}).read().split()[-1]
        print("found", key)
        raise RuntimeError("the key is " + key)
    """)
    seen, events = [], []

    def look(state):
        seen.append(state.last_crash_log)
        return "MATRIX_LR -> 0.03", state.train_py.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.03")

    if key_set == "only after it":
        monkeypatch.delenv("OPENAI_API_KEY")  # not a secret of this process yet
    crash = loop.step(ws, ScriptedAgent([leak]), executor=Runs("real"), on_event=events.append)
    assert crash.status == "crash" and crash.reason.startswith("exception: RuntimeError: the key is")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert loop.step(ws, ScriptedAgent([look]), executor=Runs(0.9)).status == "keep"
    assert "found <redacted>" in seen[0] and KEY not in seen[0]  # what an LLM agent would send
    if key_set == "before the run":  # then nothing the loop keeps or shows has it either
        assert crash.reason == "exception: RuntimeError: the key is <redacted>"
        kept = {"results.tsv": ws.results_path.read_text(), "events": repr(events),
                "experiment": repr(crash)}
        kept.update({str(p): p.read_text() for p in ws.path.glob("runs/*/*.log")})
        kept.update({str(p): p.read_text() for p in ws.log_dir.iterdir()})
        for where, text in kept.items():
            assert KEY not in text, f"the key leaked into {where}"


# ---------------------------------------------------------------- other data: the pins

ATTACKS = {
    "kit": """
        import autoresearch_lib, pathlib
        harness = pathlib.Path(autoresearch_lib.__file__).parent / "harness.py"
        harness.write_text(harness.read_text() + "\\n# changed by a train.py\\n")
    """,
    "data": """
        from autoresearch_lib import data
        from autoresearch_lib.config import Settings
        import os
        settings = Settings.from_json(os.environ["AUTORESEARCH_SETTINGS"])
        val = data.prepare(settings, verbose=False).dir / "val.npy"
        tokens = bytearray(val.read_bytes())
        tokens[-1] ^= 1  # one token of the validation set, still a valid file
        val.write_bytes(bytes(tokens))
    """,
}
PINNED_LOOP = """
import sys, textwrap
from pathlib import Path
from autoresearch_lib import loop
from autoresearch_lib.agents import ScriptedAgent
from autoresearch_lib.runner import TrainResult, run_training
from autoresearch_lib.workspace import Workspace

path, mode = sys.argv[1], sys.argv[2]

def executor(script, settings, run_dir, **kwargs):  # the attack runs for real; the rest pretend
    if mode == "attack" and Path(run_dir).name == "0001":
        return run_training(script, settings, run_dir, **kwargs)
    Path(run_dir).mkdir(parents=True)
    value = 1.0 if Path(run_dir).name == "0000" else 0.9
    (Path(run_dir) / "run.log").write_text(f"---\\nval_bpb: {value}\\n")
    return TrainResult(status="ok", val_bpb=value, log_path=str(Path(run_dir) / "run.log"))

lower = ("MATRIX_LR -> 0.03", {"MATRIX_LR": 0.03})
try:
    if mode == "attack":
        attack = textwrap.dedent(Path(sys.argv[3]).read_text())
        agent = ScriptedAgent([lambda s: ("tamper", attack), lower])
        loop.run(Workspace.create(path, preset="quick", budget=1), agent, max_experiments=3,
                 executor=executor)
    else:
        ws = Workspace.open(path).repin() if mode == "repin" else Workspace.open(path)
        print([e.status for e in loop.run(ws, ScriptedAgent([lower]), max_experiments=1,
                                          executor=executor)])
except loop.LoopError as e:
    print("LoopError:", e)
    sys.exit(3)
"""


def rewrite_pins(run_dir: Path) -> None:
    """A run that stole the key re-signs pins.json for a kit it is about to change."""
    ws_dir = run_dir.parents[1]
    key = records.load_key(ws_dir / KEY_FILE)
    pinned = pins.load(ws_dir / PINS_FILE, key)
    pinned["kit"]["harness.py"] = "0" * 64
    pins.save(ws_dir / PINS_FILE, key, pinned)


@pytest.mark.parametrize("how, said", [
    ("by hand", "changed by something other than the kit (its signature does not match)"),
    ("by a run, with the key", "changed while the loop ran: something, possibly a train.py"),
])
def test_edited_pins_stop_the_loop(ws, how, said):
    agent = ScriptedAgent([lr(0.03), lr(0.04)])
    if how == "by hand":
        path = ws.path / PINS_FILE
        path.write_text(path.read_text().replace('"harness.py": "', '"harness.py": "0'))
        runs = Runs()
    else:
        runs = Runs(rewrite_pins)
    with pytest.raises(loop.LoopError, match=re.escape(said) + r".*\.repin\(\)"):
        loop.run(ws, agent, max_experiments=2, executor=runs)
    assert agent.used == (0 if how == "by hand" else 1) and ws.head() == ws.best()[0]
    if how != "by hand":  # the run that did it is a crash, not a keep
        assert ws.results()[-1]["reason"].startswith(f"tampered: {ws.path / PINS_FILE} {said}")
    Workspace.open(ws.path).repin()  # the kit is as installed (the real one was never touched)
    resumes(ws)


@linux_only
@pytest.mark.parametrize("target", ["kit", "data"])
def test_a_run_that_changes_the_kit_or_the_data_stops_the_next_experiment(tmp_path, prepared, target):
    """A private copy of the kit and of the data cache: the real checkout is never touched."""
    kit, cache = tmp_path / "kit", tmp_path / "cache"
    for name in ("autoresearch_lib", "data"):
        shutil.copytree(ROOT / name, kit / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(prepared.dir, cache / prepared.dir.name)
    real = {p: hashlib.sha256(p.read_bytes()).digest() for p in [ROOT / "autoresearch_lib" / "harness.py",
                                                                  prepared.dir / "val.npy"]}
    (tmp_path / "attack.py").write_text(ATTACKS[target])
    # without a sandbox (which would hide the kit and the cache): what the pins are for
    env = {**os.environ, "PYTHONPATH": str(kit), "AUTORESEARCH_CACHE": str(cache),
           "AUTORESEARCH_SANDBOX": "0"}
    ws_path = tmp_path / "ws"

    def child(*args):
        return subprocess.run([sys.executable, "-c", PINNED_LOOP, str(ws_path), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    attacked = child("attack", str(tmp_path / "attack.py"))
    assert attacked.returncode == 3, attacked.stdout + attacked.stderr
    said = attacked.stdout
    assert {"kit": "the kit's code changed since this workspace pinned it: harness.py changed (in "
                   f"{kit / 'autoresearch_lib'})",
            "data": "the prepared evaluation data changed since this workspace pinned it: val.npy "
                    f"changed (in {cache / prepared.dir.name})"}[target] in said
    assert "would not be comparable" in said and "a train.py can" in said
    assert f"Workspace.open({str(ws_path)!r}).repin()" in said
    ws = Workspace(ws_path)
    rows = ws.results()  # the attack's run, then the loop stopped before the next experiment
    assert [r["status"] for r in rows] == ["keep", "crash"] and ws.head() == rows[0]["commit"]
    assert rows[1]["reason"].startswith({"kit": "tampered: the kit's code changed",
                                         "data": "tampered: the prepared evaluation data changed"}[target])
    assert all(hashlib.sha256(p.read_bytes()).digest() == h for p, h in real.items())

    assert child("resume").returncode == 3  # still changed: still stopped
    if target == "kit":  # reinstall: the kit as it was
        shutil.copy(ROOT / "autoresearch_lib" / "harness.py", kit / "autoresearch_lib" / "harness.py")
        resumed = child("resume")
    else:  # changed on purpose, say: pin again
        resumed = child("repin")
    assert resumed.returncode == 0 and resumed.stdout.strip().endswith("['keep']"), resumed.stdout
