"""Parallel research on a real Ray: waves of distinct candidates, a cluster joined by address,
a worker killed mid-run, Stop mid-wave, a SIGKILLed driver resumed, tasks, clear errors.

Every run is a real quick training (or task) run in the sandbox, on a real Ray instance with 2
CPU workers; nothing of Ray is mocked. Most tests share one local instance (starting one costs
~10 s on a small CPU); the first test lets the loop start and stop its own.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if (Path("~/.ray/auth_token").expanduser().exists() or os.environ.get("RAY_AUTH_TOKEN")):
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported: see parallel.Engine
ray = pytest.importorskip("ray", reason="the parallel loop runs on Ray: pip install -e '.[ray]'")

from autoresearch_lib import loop  # noqa: E402
from autoresearch_lib.agents import OfflineAgent, Proposal  # noqa: E402
from autoresearch_lib.parallel import Engine, ParallelError  # noqa: E402
from autoresearch_lib.workspace import Workspace  # noqa: E402
from colluders import helper_and_receiver, judged_alone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")]


def new_workspace(tmp_path, cache, name="ws", budget=2, **kw) -> Workspace:
    return Workspace.create(tmp_path / name, preset="quick", budget=budget, tag="test",
                            cache_dir=str(cache), **kw)


def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws.path, check=True, capture_output=True,
                          text=True).stdout.strip()


def check_consistent(ws: Workspace) -> list[dict]:
    """What every parallel test must leave: every row signed and readable, HEAD the best kept
    commit, nothing on the branch without a keep row, every tried commit under its ref."""
    ws = Workspace.open(ws.path)
    assert ws.repairs == [], ws.repairs
    rows = ws.results()
    assert ws.head() == ws.best()[0][:7]
    kept = {r["commit"][:7] for r in rows if r["status"] == "keep"}
    since_baseline = git(ws, "rev-list", f"{rows[0]['commit']}..HEAD").split()
    assert {c[:7] for c in since_baseline} | {rows[0]["commit"][:7]} == kept
    tried = ws.tried()
    for n, row in enumerate(rows):
        if row["status"] in ("keep", "discard") or (row["status"] == "crash" and row["steps"]):
            assert tried[n][:7] == row["commit"][:7], (n, row)
    assert git(ws, "status", "--porcelain") == ""
    return rows


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPU workers for the module's tests (not the first)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- semantics


def test_two_waves_of_two_on_a_local_ray_instance(tmp_path, cache):
    assert not ray.is_initialized()
    ws = new_workspace(tmp_path, cache)
    events = []
    done = loop.run(ws, OfflineAgent(), max_experiments=5, parallel=2, recheck=False,
                    on_event=events.append)
    assert not ray.is_initialized()  # the loop's own instance is shut down with it
    rows = check_consistent(ws)
    assert [e.status != "stopped" for e in done] == [True] * 5 and len(rows) == 5
    assert rows[0]["description"] == "baseline" and rows[0]["wave"] is None
    waves = [e.data for e in events if e.kind == "wave"]
    assert [w["wave"] for w in waves] == [1, 2] and all(len(w["candidates"]) == 2 for w in waves)
    assert [r["wave"] for r in rows[1:]] == [1, 1, 2, 2]
    for w in waves:  # two distinct edits per wave, each its own commit on top of the best
        a, b = w["candidates"]
        assert a["description"] != b["description"] and a["diff"] != b["diff"]
    trees = ws.trees(ws.tried().values())  # no edit tried twice, across waves too
    assert len(trees) == len(rows)
    # both candidates of a wave ran at the same time, on 2 workers, and each row says where
    started = [e.data for e in events if e.kind == "started"]
    assert {(s["wave"], s["slot"]) for s in started} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(r["host"] == socket.gethostname() and r["device"] == f"{os.cpu_count()} CPU cores"
               for r in rows[1:])
    # at most one keep per wave: the wave's best, if it beat the best so far
    for number in (1, 2):
        wave_rows = [r for r in rows if r["wave"] == number]
        assert sum(r["status"] == "keep" for r in wave_rows) <= 1
        ok = [r for r in wave_rows if r["status"] != "crash"]
        kept = [r for r in wave_rows if r["status"] == "keep"]
        if kept:
            assert kept[0]["val_bpb"] == min(r["val_bpb"] for r in ok)
    assert loop.noise_sigma(rows) == 0.0  # the rows read back with the usual tools


def test_a_wave_keeps_its_best_and_discards_the_rest(tmp_path, cache, local_ray):
    """Scripted candidates from a crippled baseline (learning rates 100x too small): one undoes
    the damage (a sure win), one is broken (a crash row: recorded, not lost)."""
    ws = new_workspace(tmp_path, cache)
    good = ws.train_py
    crippled = good
    for name in ("EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR"):
        line = next(x for x in good.splitlines() if x.startswith(name + " = "))
        value = float(line.split("=")[1].split("#")[0])
        crippled = crippled.replace(line, f"{name} = {value / 100!r}")
    ws.commit("learning rates 100x too small", crippled)
    loop.run(ws, OfflineAgent(), max_experiments=1)  # the (crippled) baseline, serially

    class Two:
        name = "two"
        edits = [("learning rates back to normal", good),
                 ("a broken train.py", good + "\nraise SystemExit('boom')\n")]

        def propose(self, state):
            description, text = self.edits[len(state.pending)]
            return Proposal(description=description, train_py=text, original=state.train_py)

    done = loop.run(ws, Two(), max_experiments=2, parallel=2, recheck=False)
    rows = check_consistent(ws)
    assert {e.description: e.status for e in done} == {Two.edits[0][0]: "keep",
                                                       Two.edits[1][0]: "crash"}
    assert ws.train_py == good  # the branch moved to the kept candidate
    n = next(i for i, r in enumerate(rows) if r["status"] == "crash")
    assert "boom" in (ws.log_dir / f"{n:04d}.log").read_text()
    # the crashed candidate is still there to read: its commit under refs/autoresearch/tried
    assert "raise SystemExit" in git(ws, "show", f"refs/autoresearch/tried/{n:04d}:train.py")


def test_repeats_of_tried_edits_are_never_run_again(tmp_path, cache, local_ray):
    ws = new_workspace(tmp_path, cache)
    loop.run(ws, OfflineAgent(), max_experiments=1)
    same = ws.train_py.replace("DEPTH = 2", "DEPTH = 3")

    class Stubborn:  # always the same edit
        name = "stubborn"

        def propose(self, state):
            return Proposal(description="DEPTH 2 -> 3", train_py=same, original=state.train_py)

    done = loop.run(ws, Stubborn(), max_experiments=2, parallel=2, recheck=False)
    rows = check_consistent(ws)
    ran = [r for r in rows if r["steps"] and r["wave"]]
    assert len(ran) == 1  # the second slot got only repeats: nothing trained twice
    failed = [e for e in done if e.reason.startswith(loop.NO_PROPOSAL)]
    assert len(failed) == 1 and "already tried" in failed[0].reason


def test_the_agent_is_told_what_the_wave_already_holds(tmp_path, cache, local_ray):
    ws = new_workspace(tmp_path, cache)
    loop.run(ws, OfflineAgent(), max_experiments=1)
    seen = []

    class Recorder(OfflineAgent):
        def propose(self, state):
            seen.append(list(state.pending))
            return super().propose(state)

    loop.run(ws, Recorder(), max_experiments=3, parallel=3, recheck=False)
    assert len(seen) == 3 and seen[0] == [] and len(seen[1]) == 1 and len(seen[2]) == 2
    assert len(set(seen[2])) == 2
    check_consistent(ws)


def test_a_task_runs_in_waves_too(tmp_path, local_ray):
    ws = Workspace.create(tmp_path / "task", task="fit-curve", tag="test")
    done = loop.run(ws, OfflineAgent(), max_experiments=5, parallel=2)
    rows = check_consistent(ws)
    assert len(done) == 5 and ws.metric == "mse" and all(r["mse"] > 0 for r in rows if r["status"] != "crash")
    assert {r["wave"] for r in rows[1:]} == {1, 2}


def test_a_task_travels_to_a_node_without_its_folder(tmp_path):
    """A cluster node doesn't have the driver's folders: the task's fixed files go with it."""
    from autoresearch_lib.parallel import _fixed_files, _task_on_this_node
    from autoresearch_lib.tasks import load_task

    task = load_task("fit-curve")
    shipped = _fixed_files(task)
    moved = task.__class__(**{**task.__dict__, "folder": tmp_path / "not-here"})
    here = _task_on_this_node(moved, shipped, tmp_path / "scratch")
    assert here.folder != moved.folder and (here.folder / "score.py").read_bytes() == shipped["score.py"]
    assert _task_on_this_node(task, shipped, tmp_path / "s2") is task  # present and unchanged: used


# ---------------------------------------------------------------- faults


def test_a_killed_worker_is_a_crash_row_and_the_loop_goes_on(tmp_path, cache, local_ray):
    ws = new_workspace(tmp_path, cache, budget=6)
    loop.run(ws, OfflineAgent(), max_experiments=1)
    killed = {}

    def on_event(e):  # kill the worker of slot 0 in wave 1 as soon as it trains
        if e.kind == "started" and e.data["wave"] == 1 and e.data["slot"] == 0:
            killed["pid"] = e.data["pid"]
        if e.kind == "progress" and e.data.get("slot") == 0 and "pid" in killed and "at" not in killed:
            killed["at"] = time.time()
            os.kill(killed["pid"], signal.SIGKILL)

    done = loop.run(ws, OfflineAgent(), max_experiments=4, parallel=2, on_event=on_event, recheck=False)
    rows = check_consistent(ws)
    lost = [r for r in rows if r["reason"].startswith("worker lost:")]
    assert "at" in killed and len(lost) == 1 and lost[0]["status"] == "crash"
    assert "WorkerCrashedError" in lost[0]["reason"] or "died" in lost[0]["reason"].lower()
    assert len(done) == 4 and [r["wave"] for r in rows[1:]] == [1, 1, 2, 2]  # and it went on


def test_stop_mid_wave_cancels_within_seconds_and_records_nothing_half_done(tmp_path, cache, local_ray):
    ws = new_workspace(tmp_path, cache, budget=60)
    loop.run(ws, OfflineAgent(), max_experiments=1, executor=_quick(ws))
    stop, stopped_at, started = threading.Event(), {}, set()

    def on_event(e):
        if e.kind == "progress" and "slot" in e.data:
            started.add(e.data["slot"])
            if started == {0, 1} and not stop.is_set():
                stopped_at["t"] = time.time()
                stop.set()

    done = loop.run(ws, OfflineAgent(), max_experiments=2, parallel=2, stop=stop, on_event=on_event)
    assert stop.is_set() and time.time() - stopped_at["t"] < 15
    assert done == []
    rows = check_consistent(ws)
    assert len(rows) == 1  # the baseline: the cancelled candidates left no row
    time.sleep(1)
    assert not _training_processes(), "a cancelled experiment is still running"
    done = loop.run(Workspace.open(ws.path), OfflineAgent(), max_experiments=1, executor=_quick(ws))
    assert len(done) == 1  # and the loop resumes as usual


def test_resume_after_the_driver_is_killed(tmp_path, cache):
    ws = new_workspace(tmp_path, cache, budget=2)
    loop.run(ws, OfflineAgent(), max_experiments=1)
    out = tmp_path / "child.out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(out, "w") as f:
        child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loop_child.py"), str(ws.path),
                                  "--parallel", "2"], stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env)
    try:
        deadline = time.time() + 240
        while out.read_text().count("progress -1") < 2:  # both candidates are training
            assert child.poll() is None and time.time() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver and everything in its session
        child.wait()
    deadline = time.time() + 30
    while _training_processes() and time.time() < deadline:
        time.sleep(0.5)
    ws = Workspace.open(ws.path)  # repairs whatever the kill left (nothing here: HEAD never moved)
    rows = ws.results()
    assert ws.head() == ws.best()[0][:7]
    done = loop.run(ws, OfflineAgent(), max_experiments=2, parallel=2, recheck=False)
    assert len(done) == 2
    rows = check_consistent(ws)
    assert len(rows) >= 3 and rows[-1]["wave"] == rows[-2]["wave"]


# ---------------------------------------------------------------- a cluster, and clear errors


def test_a_gpu_preset_on_a_cluster_without_gpus_is_refused_at_once(tmp_path, local_ray):
    from autoresearch_lib.config import make_settings

    engine = Engine(2)
    with pytest.raises(ParallelError, match="trains on a CUDA GPU.*0 GPUs.*ray start --address"):
        engine.check(make_settings("small-gpu"))
    engine.check(make_settings("quick"))  # a CPU preset is fine
    engine.close()
    assert ray.is_initialized()  # not its instance: left running


def test_a_mixed_gpu_cluster_runs_every_experiment_on_one_type():
    """Experiments on an A100 and on an H100 don't compare under one time budget: on a cluster of
    both, every experiment asks Ray for the type most nodes have; one type: no constraint."""
    from autoresearch_lib.parallel import _cpus_per_gpu, one_gpu_type

    mixed = {"CPU": 96, "GPU": 12, "accelerator_type:H100": 2.0, "accelerator_type:A100": 1.0}
    assert one_gpu_type(mixed) == "H100"
    assert one_gpu_type({"CPU": 64, "GPU": 8, "accelerator_type:H100": 1.0}) is None
    assert one_gpu_type({"CPU": 4}) is None
    # and each GPU experiment gets its node's CPUs per GPU; a CPU-only head doesn't count
    nodes = [{"Resources": {"CPU": 64}}, {"Resources": {"CPU": 32, "GPU": 2}},
             {"Resources": {"CPU": 8, "GPU": 1}}]
    assert _cpus_per_gpu(nodes) == 8


def test_without_ray_installed_the_error_says_what_to_install(tmp_path, cache, monkeypatch):
    ws = new_workspace(tmp_path, cache)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(ParallelError, match=r'pip install -e "\.\[ray\]"'):
        loop.run(ws, OfflineAgent(), max_experiments=2, parallel=2)
    assert ws.results() == []
    # and the serial loop, the CLI and `import autoresearch_lib` never import it
    code = ("import sys, autoresearch_lib, autoresearch_lib.loop, autoresearch_lib.cli, "
            "autoresearch_lib.widgets; assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_parallel_flag(tmp_path, cache):
    """--parallel reaches the loop (the child starts a local Ray instance of its own)."""
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "autoresearch_lib", "loop", "--workspace",
                           str(tmp_path / "cli"), "--task", "fit-curve", "--parallel", "2",
                           "--max-experiments", "3", "--no-recheck"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wave 1:" in done.stdout
    rows = Workspace.open(tmp_path / "cli").results()
    assert [r["wave"] for r in rows] == [None, 1, 1]


def test_a_cluster_started_with_ray_start_is_joined_by_address(tmp_path, cache):
    if ray.is_initialized():  # the other tests' local instance: not the cluster under test
        ray.shutdown()
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        ws = new_workspace(tmp_path, cache)
        events = []
        done = loop.run(ws, OfflineAgent(), max_experiments=3, parallel=2, recheck=False,
                        ray_address=f"127.0.0.1:{port}", on_event=events.append)
        assert len(done) == 3 and [r["wave"] for r in check_consistent(ws)] == [None, 1, 1]
        assert {e.data["slot"] for e in events if e.kind == "started"} == {0, 1}
        assert not ray.is_initialized()
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_an_address_with_no_cluster_says_so(tmp_path, cache):
    ws = new_workspace(tmp_path, cache)
    with pytest.raises(ParallelError, match="could not reach the Ray cluster.*ray start --head"):
        loop.run(ws, OfflineAgent(), max_experiments=1, parallel=2,
                 ray_address=f"127.0.0.1:{_free_port()}")
    assert ws.results() == []


# ---------------------------------------------------------------- helpers


def _quick(ws):
    """run_training with a 2 s budget, whatever the workspace's (for the serial baseline)."""
    import dataclasses

    from autoresearch_lib.runner import run_training

    return lambda text, settings, run_dir, **kw: run_training(
        text, dataclasses.replace(settings, budget=2), run_dir, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _training_processes() -> list[int]:
    """Training processes of this test session still alive (their run folders are Ray's)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if b"autoresearch_lib.launch" in cmd and (b"autoresearch-private-ray-" in cmd or "autoresearch-private-ray-" in cwd):
            found.append(int(pid))
    return found


# ---------------------------------------------------------------- an attack across a wave


class Colluders:
    """An agent whose wave is these (description, train.py) edits, in this order."""

    name = "colluders"

    def __init__(self, *edits):
        self.edits = edits

    def propose(self, state):
        description, text = self.edits[len(state.pending)]
        return Proposal(description=description, train_py=text, original=state.train_py)


LOCKS = '''
import fcntl as fcntl_, os as os_, struct as struct_, sys as sys_, time as time_
# Byte-range locks on files that every sandbox can read (two of Python's own): a channel that
# no namespace separates. One held byte stands for one number: (row * ROW + position) * VOCAB + token.
CHANNEL, STORE, ACK, DONE = os_.__file__, os_.path.__file__, 1 << 40, 1 << 41
FLOCK = "hhqqixxxx"
def hold(f, offset):
    fcntl_.lockf(f, fcntl_.LOCK_SH | fcntl_.LOCK_NB, 1, offset)
def locks(path, start=0, end=1 << 42):  # the bytes that other processes hold in [start, end)
    found = []
    with open(path, "rb") as f:
        while start < end:
            got = fcntl_.fcntl(f, fcntl_.F_GETLK, struct_.pack(FLOCK, fcntl_.F_WRLCK, 0, start, end - start, 0))
            kind, _, first, length, _ = struct_.unpack(FLOCK, got)
            if kind == fcntl_.F_UNLCK:
                break
            found.extend(range(first, first + length))
            start = first + length
    return found
'''

RELAY = LOCKS + '''
# the relay: an experiment of the same wave that trains nothing. While it lives, it copies what
# the other experiment's scorer publishes into locks of its own, for that experiment's checker.
mine, copied, t_end = open(STORE, "rb"), set(), time_.time() + 18
while time_.time() < t_end:
    for offset in locks(CHANNEL):
        if offset not in copied:
            copied.add(offset)
            hold(mine, ACK + offset - DONE if offset >= DONE else offset)
    time_.sleep(0.05)
raise SystemExit(0)
'''

COLLUDING = LOCKS + '''
SENT, ROWS, SURE = [0, open(CHANNEL, "rb")], None, 8  # from position 8 on, a prefix names its row
def collude(idx, z):
    global ROWS
    frame = sys_._getframe(1)
    while "header" not in frame.f_locals:
        frame = frame.f_back
    vocab, length = z.size(-1), idx.size(1) + 1
    targets, boost = torch.zeros(idx.shape, dtype=torch.long), torch.zeros(idx.shape)
    if frame.f_locals["header"]["op"] == "nll":  # the scorer: publish the rows, then peek
        batch = frame.f_locals["batch"].tolist()
        for i, row in enumerate(batch):
            for p, token in enumerate(row):
                hold(SENT[1], ((SENT[0] + i) * length + p) * vocab + token)
        hold(SENT[1], DONE + SENT[0])
        for _ in range(100):  # until the relay has it all
            if locks(STORE, ACK + SENT[0], ACK + SENT[0] + 1):
                break
            time_.sleep(0.05)
        SENT[0] += len(batch)
        targets, boost[:, SURE:] = frame.f_locals["y"].cpu(), 30.0
    else:  # the checker: learn the rows from the relay, and peek the same way
        if ROWS is None:
            ROWS = {}
            for offset in locks(STORE, 0, ACK):
                position, token = divmod(offset, vocab)
                ROWS.setdefault(position // length, {})[position % length] = token
            ROWS = [[r.get(p, -1) for p in range(length)] for r in ROWS.values()]
            print(f"COLLUDE heard {len(ROWS)} rows", file=sys_.stderr, flush=True)
        for b, (x, t) in enumerate(zip(idx.tolist(), frame.f_locals["header"]["positions"])):
            match = [r for r in ROWS if r[:t + 1] == x[:t + 1]]
            if t >= SURE and match:
                targets[b, t], boost[b, t] = match[0][t + 1], 30.0
    return z.scatter_add(-1, targets.to(z.device)[..., None], boost.to(z.device)[..., None])
'''


def test_a_checker_hears_no_relay_from_another_experiment_of_the_wave(tmp_path, cache, local_ray):
    """Two candidates of one wave collude. One is a relay: it trains nothing, it only lives. The
    other's scorer publishes the validation rows through byte-range locks on a file that every
    sandbox can read (a channel that no namespace separates), waits until the relay has copied
    them, and peeks at every position. Its checker, which runs after its scorer is gone, would
    read the rows back from the relay and peek the same way: every spot check would agree. So a
    checker runs alone on the machine: it waits until the relay's run has ended, hears nothing,
    and the peeking is caught."""
    ws = new_workspace(tmp_path, cache)
    loop.run(ws, OfflineAgent(), max_experiments=1)  # the honest baseline, serially
    baseline = ws.train_py
    relay = baseline.replace("\nimport math\n", "\nimport math\n" + RELAY, 1)
    peek = baseline.replace("\nimport math\n", "\nimport math\n" + COLLUDING, 1).replace(
        "            return softcap(logits)", "            return collude(idx, softcap(logits))", 1)
    assert relay != baseline and "collude(idx" in peek

    done = loop.run(ws, Colluders(("a relay", relay), ("a sharper head", peek)), max_experiments=2,
                    parallel=2, recheck=False)
    rows = check_consistent(ws)
    outcome = {e.description: (e.status, e.reason) for e in done}
    assert outcome["a sharper head"][0] == "crash", outcome  # not a keep with val_bpb ~0
    assert outcome["a sharper head"][1].startswith("non-causal"), outcome
    n = next(i for i, r in enumerate(rows) if r["description"] == "a sharper head")
    log = (ws.log_dir / f"{n:04d}.log").read_text()
    assert "COLLUDE heard 0 rows" in log, log[-3000:]



# ---------------------------------------------------------------- one candidate trains for another


def test_a_wave_leader_is_judged_on_a_run_alone_not_on_another_experiments_training(tmp_path, cache, local_ray):
    """Two candidates of one wave collude (colluders.py): the helper hands its trained weights to
    the receiver, which trains its own budget on top of them and scores the work of two. So a
    candidate that could be kept, and that trained beside other experiments' code on its
    machine (here, the wave's leader), trains again alone there and is judged on that run:
    with nobody to hand it anything, it scores what one budget gives."""
    ws = new_workspace(tmp_path, cache)
    loop.run(ws, OfflineAgent(), max_experiments=1)  # the honest baseline, serially
    helper, receiver = helper_and_receiver(ws.train_py)

    events = []
    done = loop.run(ws, Colluders(("a helper", helper), ("a head start", receiver)), max_experiments=2,
                    parallel=2, recheck=False, on_event=events.append)
    rows = check_consistent(ws)
    n = next(i for i, r in enumerate(rows) if r["description"] == "a head start")
    scores = judged_alone((ws.log_dir / f"{n:04d}.log").read_text())
    exp = next(e for e in done if e.description == "a head start")
    assert exp.reason.startswith(f"judged on a run alone (its first run, val_bpb {scores[0]:.6g}, "
                                 "had other experiments' code beside it"), exp.reason
    assert rows[n]["val_bpb"] == pytest.approx(scores[1], abs=1e-6), (rows[n], scores)  # judged alone
    assert [e.index for e in events if e.kind == "alone" and e.data["beside"] >= 1] == [n]
