"""The sandbox itself (sandbox.command + sandbox.environment), with tiny Python programs: what a
process inside can read, write, see and reach. Each test also checks the allowed case, so that
a program that simply failed to start cannot pass for a sandbox that works.
"""

import ast
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from autoresearch_lib import sandbox


def _bwrap() -> bool:
    try:
        return sandbox.mode() == "bwrap"
    except sandbox.SandboxError:
        return False


pytestmark = pytest.mark.skipif(not _bwrap(), reason="needs the bubblewrap sandbox (apt install bubblewrap)")


def inside(program: str, folder: Path, writable=(), readable=(), env=None, timeout=60) -> str:
    """Run `program` (Python source) in the sandbox with cwd `folder` (made writable); its output."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = sandbox.command([sys.executable, "-c", program], cwd=folder, writable=[folder, *writable],
                           readable=list(readable))
    done = subprocess.run(argv, env=sandbox.environment() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def alive(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def gone(marker: str, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while alive(marker) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(marker)


def test_a_sandboxed_process_cannot_read_files_outside_what_it_is_given(tmp_path):
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the validation tokens")
    given = tmp_path / "given"
    given.mkdir()
    (given / "ok.txt").write_text("training tokens")
    out = inside(f"""
import os
for path in [{str(secret)!r}, {str(given / "ok.txt")!r}, "/etc/shadow", os.path.expanduser("~root/.bashrc")]:
    try:
        print("READ", path, open(path).read().strip())
    except OSError as e:
        print("NO", path, type(e).__name__)
print("LIST", sorted(os.listdir({str(tmp_path)!r})))
""", tmp_path / "run", readable=[given])
    assert f"NO {secret} FileNotFoundError" in out
    assert f"READ {given / 'ok.txt'} training tokens" in out  # what it is given, it can read
    assert "NO /etc/shadow" in out and "READ /root" not in out
    assert "LIST ['given', 'run']" in out  # only the bind points exist: "elsewhere" does not


def test_a_sandboxed_process_cannot_write_outside_its_writable_folder(tmp_path):
    given = tmp_path / "given"
    given.mkdir()
    probe = f"probe-{uuid.uuid4().hex}"
    targets = {"outside": tmp_path / "outside.txt", "read-only": given / "x.txt",
               "kit": sandbox.package_dir() / probe, "python": Path(sys.prefix) / probe,
               "writable": tmp_path / "run" / "ok.txt"}
    try:
        out = inside(f"""
for name, path in {({k: str(v) for k, v in targets.items()})!r}.items():
    try:
        open(path, "w").write("x")
        print("WROTE", name)
    except OSError as e:
        print("NO", name, type(e).__name__)
""", tmp_path / "run", readable=[given])
    finally:
        leaked = [p for name, p in targets.items() if name != "writable" and p.exists()]
        for path in leaked:
            path.unlink()
    assert not leaked, f"the sandbox wrote {leaked}"
    assert (tmp_path / "run" / "ok.txt").read_text() == "x" and "WROTE writable" in out
    for name in ("read-only", "kit", "python"):
        assert f"NO {name} OSError" in out  # EROFS: read-only file system
    # (a path under /tmp "succeeds" in the sandbox's private /tmp: nothing outside changes)


def test_a_sandboxed_process_finds_no_folder_in_memory_to_fill(tmp_path):
    """bubblewrap's /tmp and /dev are in memory (half the machine's, here), which a run could
    fill beyond what the kernel's out-of-memory killer blames on it, and beyond the disk watch.
    With the runner's /tmp folder: /tmp and /dev/shm are that folder, on disk; the rest of /dev
    is read-only; the device files and shared memory still work (torch, multiprocessing)."""
    tmp, run = tmp_path / "tmp", tmp_path / "run"
    for folder in (tmp, run):
        folder.mkdir()
    program = """
import multiprocessing, os
for path in ["/tmp/a", "/dev/shm/b", "/dev/c"]:
    try:
        open(path, "wb").write(b"x" * 4096)
        print("WROTE", path)
    except OSError as e:
        print("NO", path, e.strerror)
open("/dev/null", "w").write("x")
multiprocessing.Lock()  # a POSIX semaphore: a file in /dev/shm
import torch
torch.zeros(10).share_memory_()
print("shared memory works")
"""
    argv = sandbox.command([sys.executable, "-c", program], cwd=run, writable=[run], tmp=tmp)
    done = subprocess.run(argv, env=sandbox.environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "WROTE /tmp/a" in done.stdout and "WROTE /dev/shm/b" in done.stdout
    assert "NO /dev/c Read-only file system" in done.stdout
    assert "shared memory works" in done.stdout
    assert (tmp / "a").is_file() and (tmp / "b").is_file()  # on disk, where the watch sees them


def test_a_sandboxed_process_sees_only_its_own_processes(tmp_path):
    # the test's own PID and its parent's (unless the parent is the host's init, PID 1: pytest
    # started in the background by a shell that has exited; inside, 1 is bwrap's own init)
    outside = [pid for pid in (os.getpid(), os.getppid()) if pid > 2]
    out = inside(f"""
import os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(pids)
for pid in pids + {outside}:
    try:
        print(pid, open(f"/proc/{{pid}}/cmdline", "rb").read())
    except OSError as e:
        print(pid, type(e).__name__)
""", tmp_path / "run")
    assert ast.literal_eval(out.splitlines()[0]) == [1, 2]  # bwrap's init and the program itself
    lines = out.splitlines()
    assert lines[1].startswith("1 b'bwrap\\x00") and lines[2].startswith(f"2 b'{sys.executable}\\x00-c")
    assert lines[3:] == [f"{pid} FileNotFoundError" for pid in outside]


def test_a_sandboxed_process_has_no_network(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def serve():
        try:
            while True:
                server.accept()[0].close()
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it is there, from outside
        out = inside(f"""
import socket
print("INTERFACES", [name for _, name in socket.if_nameindex()])
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
    print("CONNECTED")
except OSError as e:
    print("NO CONNECTION", type(e).__name__)
try:
    socket.create_connection(("1.1.1.1", 53), timeout=5)
    print("CONNECTED OUT")
except OSError as e:
    print("NO ROUTE", type(e).__name__)
""", tmp_path / "run")
    finally:
        server.close()
    assert "INTERFACES ['lo']" in out
    assert "NO CONNECTION ConnectionRefusedError" in out and "NO ROUTE" in out and "CONNECTED" not in out


SECRETS = {"OPENAI_API_KEY": "sk-openai-secret", "HF_TOKEN": "hf_secret_token",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-value", "GITHUB_TOKEN": "ghp_secret_value"}


def test_a_sandboxed_process_gets_only_the_allow_listed_environment(tmp_path, monkeypatch):
    for name, value in {**SECRETS, "MY_PLAIN_SETTING": "not on the list"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AUTORESEARCH_QUICK", "1")
    out = inside("import os\nprint(sorted(os.environ.items()))", tmp_path / "run")
    env = dict(ast.literal_eval(out))
    assert "PATH" in env and env.get("AUTORESEARCH_QUICK") == "1"  # what a run needs gets through
    assert "MY_PLAIN_SETTING" not in env
    for name, value in SECRETS.items():
        assert name not in env and value not in out


@pytest.mark.parametrize("name", ["NVIDIA_API_KEY", "AUTORESEARCH_OPENAI_KEY", "TORCH_HUB_TOKEN"])
def test_a_secret_named_variable_with_an_allowed_prefix_stays_out(tmp_path, monkeypatch, name):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv(name, secret)
    out = inside("import os\nprint(sorted(os.environ.items()))", tmp_path / "run")
    assert secret not in out


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)", sys.argv[1]])
    os._exit(0)
os.wait()
time.sleep(0.5)
print("daemon started", flush=True)
"""


def test_every_process_in_the_sandbox_dies_when_the_first_one_exits(tmp_path):
    marker = f"daemon-{uuid.uuid4().hex}"
    folder = tmp_path / "run"
    folder.mkdir()
    argv = sandbox.command([sys.executable, "-c", DAEMON, marker], cwd=folder, writable=[folder])
    done = subprocess.run(argv, env=sandbox.environment(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert "daemon started" in done.stdout, done.stderr
    assert gone(marker), alive(marker)


def test_the_sandbox_dies_with_the_process_that_started_it(tmp_path):
    marker = f"orphan-{uuid.uuid4().hex}"
    folder = tmp_path / "run"
    folder.mkdir()
    argv = sandbox.command([sys.executable, "-c", "import time\nwhile True: time.sleep(1)", marker],
                           cwd=folder, writable=[folder])
    starter = subprocess.Popen([sys.executable, "-c", "import subprocess, sys\nsubprocess.run(sys.argv[1:])", *argv],
                               env=sandbox.environment(), start_new_session=True)
    try:
        deadline = time.time() + 30
        while not alive(marker) and time.time() < deadline:
            time.sleep(0.05)
        assert alive(marker), "the sandboxed program never started"
        os.kill(starter.pid, signal.SIGKILL)  # e.g. the loop killed by the OOM killer
        starter.wait(10)
        assert gone(marker), alive(marker)
    finally:
        for pid in alive(marker):  # only if the test failed: the process it started
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------ the compile cache (runner.py)

def test_only_the_kits_own_train_py_keeps_a_compile_cache_the_others_get_a_throwaway_copy(tmp_path, monkeypatch):
    """A run loads compiled code from the cache it is given, so no cache a run writes may outlive
    it, except the kit's: its unedited train.py writes the trusted cache, an edited one gets a
    private copy of it (still warm if its graph is the baseline's), gone with the run."""
    from autoresearch_lib import runner
    from autoresearch_lib.baseline import render_train_py

    monkeypatch.setattr(sandbox, "gpu_devices", lambda: ["/dev/null"])  # "a GPU machine"
    monkeypatch.setenv("AUTORESEARCH_COMPILE_CACHE", str(tmp_path / "compile"))
    baseline, env = render_train_py("h100"), {}
    trusted, = runner._compile_cache(env, baseline, tmp_path / "run1")
    assert trusted == tmp_path / "compile" / "trusted"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(trusted / "inductor")
    (trusted / "inductor").mkdir()
    (trusted / "inductor" / "kernel").write_text("the baseline's compiled kernel")

    edited, env = baseline.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05"), {}
    (tmp_path / "run2").mkdir()
    own, = runner._compile_cache(env, edited, tmp_path / "run2")
    assert own == tmp_path / "run2" / "compile" and env["TRITON_CACHE_DIR"] == str(own / "triton")
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(own / "flash_attn")  # train.py's "fa4" kernels
    assert (own / "inductor" / "kernel").read_text() == "the baseline's compiled kernel"  # warm
    (own / "inductor" / "planted").write_text("compiled code, or weights, for a later run")
    assert not (trusted / "inductor" / "planted").exists()  # the trusted cache is untouched
    (tmp_path / "run3").mkdir()
    again, = runner._compile_cache({}, edited, tmp_path / "run3")  # the same script, run again
    assert not (again / "inductor" / "planted").exists()
    monkeypatch.setattr(sandbox, "gpu_devices", lambda: [])
    assert runner._compile_cache({}, edited, tmp_path / "run4") == []  # no GPU: nothing compiled


@pytest.mark.parametrize("who", ["a run", "a model server"])
def test_a_file_that_vanishes_while_the_trusted_cache_is_copied_costs_nothing_but_itself(tmp_path, monkeypatch, who):
    """On a machine with several GPUs the baseline's re-run may be writing the trusted cache while
    another experiment copies it (Inductor and Triton write temporary files, then rename them):
    a file gone mid-copy is skipped, the rest is copied, and the run or server starts anyway."""
    import shutil

    from autoresearch_lib import runner, scoring
    from autoresearch_lib.baseline import render_train_py

    monkeypatch.setattr(sandbox, "gpu_devices", lambda: ["/dev/null"])  # "a GPU machine"
    monkeypatch.setenv("AUTORESEARCH_COMPILE_CACHE", str(tmp_path / "compile"))
    trusted = tmp_path / "compile" / "trusted"
    (trusted / "triton").mkdir(parents=True)
    (trusted / "triton" / "kernel").write_text("the baseline's compiled kernel")
    (trusted / "triton" / "tmp.write-in-progress").write_text("renamed away mid-copy")
    copy2 = shutil.copy2

    def vanishing(src, dst, **kw):
        if str(getattr(src, "path", src)).endswith("tmp.write-in-progress"):
            raise FileNotFoundError(2, "No such file or directory", src)
        return copy2(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", vanishing)
    if who == "a run":
        (tmp_path / "run").mkdir()
        copy, = runner._compile_cache({}, render_train_py("h100").replace("0.04", "0.05"), tmp_path / "run")
    else:
        folders = contextlib.ExitStack()
        copy = scoring.private_compile_cache(folders)
    assert (copy / "triton" / "kernel").read_text() == "the baseline's compiled kernel"
    assert not (copy / "triton" / "tmp.write-in-progress").exists()
    if who == "a model server":
        folders.close()
        assert not copy.exists()  # it goes with the server


def test_a_new_workspaces_train_py_is_recognised_as_the_kits_own_code(tmp_path):
    """The loop's baseline run is what fills the trusted compile cache on a GPU machine, so the
    train.py a workspace starts with must be byte for byte the preset's (else every run of the
    loop would start cold); one edit and it is not."""
    from autoresearch_lib import runner
    from autoresearch_lib.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws", preset="quick", tag="trusted")
    assert ws.train_py in runner._baseline_scripts()
    assert ws.train_py.replace("MATRIX_LR = ", "MATRIX_LR = 1.01 * ") not in runner._baseline_scripts()


HOLDER = ("import sys, time\nfrom autoresearch_lib import sandbox\n"
          "with sandbox.untrusted_code():\n    print('in', flush=True)\n    time.sleep(float(sys.argv[1]))\n")


def holding(seconds: float) -> subprocess.Popen:
    """Another experiment's code: a process that holds the machine's lock, shared, for `seconds`."""
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(seconds)], stdout=subprocess.PIPE, text=True)


def test_code_that_runs_alone_waits_for_the_others_and_they_wait_for_it():
    """The machine's lock (sandbox.untrusted_code): what runs alone (a spot-check server, a result
    confirmed) starts only once the other experiments' code here has ended, nothing else
    untrusted starts while it runs, and what it runs itself (its training, its model servers)
    does not wait for it."""
    training = holding(1.5)
    assert training.stdout.readline() == "in\n"  # another experiment's run holds the machine, shared
    said, t0 = [], time.time()
    with sandbox.untrusted_code(alone=True, say=said.append, why="this run confirms a result alone"):
        waited = time.time() - t0
        with sandbox.untrusted_code(), sandbox.untrusted_code(alone=True):  # its own code: no wait
            pass
        late = holding(0)
        time.sleep(1.0)
        assert late.poll() is None  # a new run waits for it
    assert late.stdout.readline() == "in\n" and late.wait(30) == 0
    assert training.wait(30) == 0
    assert waited >= 1.0, waited
    assert said == ["waiting for the other experiments on this machine: this run confirms a result alone"]


def test_a_hold_counts_the_other_experiments_code_that_ran_beside_it():
    """What `beside` says after a hold (a run's company, which the loop confirms alone): the
    holds that were there when it started and those that started while it lasted, not its own."""
    with sandbox.untrusted_code(alone=True) as quiet:
        with sandbox.untrusted_code():  # its own code, nested: not company
            pass
    assert quiet.beside == 0
    company = holding(2)
    assert company.stdout.readline() == "in\n"
    with sandbox.untrusted_code() as there_before:
        pass
    assert company.wait(30) == 0
    with sandbox.untrusted_code() as came_later:
        assert holding(0).wait(60) == 0
    assert (there_before.beside, came_later.beside) == (1, 1)


PRIVATE_HOLDER = ("import sys, time\nfrom autoresearch_lib import sandbox\n"
           "with sandbox.private_folder('run') as folder:\n"
           "    (folder / 'tmp').mkdir(); (folder / 'tmp' / 'weights').write_bytes(b'x' * 4096)\n"
           "    print(folder, flush=True)\n    time.sleep(60)\n")


def test_the_private_folders_a_killed_loop_left_behind_go_with_the_next_run_and_live_ones_stay():
    """A notebook kernel restarted mid-run never deletes its run's private folder (its /tmp, a
    copy of the model): the next run does, but not the folder of a run that is still going."""
    killed, running = (subprocess.Popen([sys.executable, "-c", PRIVATE_HOLDER], stdout=subprocess.PIPE, text=True)
                       for _ in range(2))
    try:
        left, live = (Path(p.stdout.readline().strip()) for p in (killed, running))
        killed.kill()
        killed.wait()
        assert (left / "tmp" / "weights").exists()  # nothing deleted it: its process was killed
        minutes_ago = time.time() - 120
        for folder in (left, live):
            os.utime(folder, (minutes_ago, minutes_ago))
        with sandbox.private_folder("run") as mine:
            assert mine.is_dir()
            assert not left.exists()
            assert (live / "tmp" / "weights").exists()
        assert not mine.exists()
    finally:
        running.kill()
        running.wait()


def test_what_runs_alone_is_not_kept_waiting_by_a_stream_of_new_runs():
    """flock() does not queue: without a turnstile, runs that keep starting beside each other
    (another busy loop) would keep a run alone, or a spot-check server, waiting until they stop.
    Once it waits, new runs wait behind it."""
    first = holding(1.5)
    assert first.stdout.readline() == "in\n"
    order, t0 = [], time.time()

    def alone():
        with sandbox.untrusted_code(alone=True):
            order.append(("alone", time.time() - t0))

    waiter = threading.Thread(target=alone)
    waiter.start()
    time.sleep(0.5)  # it waits for `first`; now a new run comes, which would overlap `first`
    late = holding(0)
    assert late.stdout.readline() == "in\n"
    order.append(("late", time.time() - t0))
    waiter.join(30)
    assert first.wait(30) == 0 and late.wait(30) == 0
    assert [who for who, _ in order] == ["alone", "late"], order  # it went first
    assert order[0][1] >= 1.0, order  # once `first` had ended


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtualenv to link to")
def test_a_virtualenv_reached_through_a_symlink_runs_in_the_sandbox(tmp_path):
    """A virtualenv linked from elsewhere (~/venvs -> /data/venvs): runs start sys.executable by
    its linked path, which the sandbox must show too, or nothing runs (`execvp: No such file`)."""
    link = tmp_path / "venv"
    link.symlink_to(Path(sys.prefix).resolve())
    run = tmp_path / "run"
    run.mkdir()
    program = ("import subprocess, sys\nfrom pathlib import Path\nfrom autoresearch_lib import sandbox\n"
               "argv = sandbox.command([sys.executable, '-c', 'import sys; print(\"inside\", sys.prefix)'], "
               f"cwd=Path({str(run)!r}), writable=[Path({str(run)!r})])\n"
               "done = subprocess.run(argv, capture_output=True, text=True)\nprint(done.stdout, done.stderr)\n")
    env = {**sandbox.environment(), "PYTHONPATH": str(sandbox.package_dir().parent)}
    done = subprocess.run([str(link / "bin" / "python"), "-c", program], env=env, capture_output=True,
                          text=True, timeout=60)
    assert f"inside {link}" in done.stdout, done.stdout + done.stderr
