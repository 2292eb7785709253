"""Experiments on Ray: several at once, one GPU each (or a share of the CPUs), laptop to cluster.

    loop.run(ws, agent, parallel=2)                        # a local Ray instance, for this run
    loop.run(ws, agent, parallel=8, ray_address="auto")    # a cluster made with `ray start`

loop.py decides what runs and what is kept (waves: see its docstring); this module only runs
experiments, on Ray (https://docs.ray.io), an existing, well-kept engine: no home-made scheduler.
Ray is an optional extra (`pip install -e ".[ray]"`); nothing else in the kit imports it.

An experiment crosses to a worker as text and settings (train.py + Settings, or a task + its
files) and comes back as a TrainResult and its log text. The worker needs the kit installed but
no access to the workspace, so any node of a cluster can run it; the run folder is a temporary
one on that node. Each worker process prepares the data once (data.prepare caches it on its node).

Fair comparisons: when the cluster has GPUs an experiment asks Ray for one whole GPU
(num_gpus=1), so two never share one; Ray sets CUDA_VISIBLE_DEVICES for it, and the sandbox
passes that on (with the rest of the allow-listed environment, never a secret). On CPUs each
experiment gets an equal share of the cores (Ray sets OMP_NUM_THREADS to it). Each result says
where it ran (host, device), and results.tsv keeps both.

Faults: a worker process or node that dies, or any error inside Ray, is a crash result "worker
lost: ..." (Ray retries nothing: a retried run would be timed twice); `cancel` kills running
experiments at once (their sandboxes die with them); a GPU experiment that can't start says
what is missing instead of waiting in silence.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import sandbox
from .config import Settings
from .records import write_atomic
from .redact import is_secret_name
from .runner import TrainResult, run_training
from .tasks import Task, changed_files, run_task

log = logging.getLogger(__name__)
INSTALL = 'pip install -e ".[ray]"  (or: pip install "ray>=2.9"; in a notebook, %pip install)'
GPU_PRESETS = ("h100", "small-gpu", "small-data")  # presets made for a CUDA GPU
START_PATIENCE = 20.0  # seconds an experiment may wait for a free GPU before we say so


class ParallelError(RuntimeError):
    """Parallel experiments can't run (no Ray, no cluster, no GPU): the message says what to do."""


def import_ray():
    """The ray module, or a ParallelError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ParallelError("parallel experiments run on Ray, which is not installed in this "
                            f"environment. Install it with: {INSTALL}; or run one experiment at "
                            "a time (parallel=1, the default), which doesn't need it.") from None
    return ray


def where() -> dict:
    """Where this process runs experiments: its host and device (the GPU Ray gave it, or its CPU
    cores; named as the training summary names them)."""
    device = f"{os.cpu_count()} CPU cores"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        try:
            import torch
            if torch.cuda.is_available():
                device = torch.cuda.get_device_name(0)
        except Exception:  # a broken CUDA set-up: the run itself will say more
            pass
    return {"host": socket.gethostname(), "device": device, "pid": os.getpid()}


class Mailbox:
    """A Ray actor the workers post their live events to (start, progress, log lines)."""

    def __init__(self):
        self.items: list = []

    def post(self, item) -> None:
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def run_remote(tag: int, first, second, fixed: dict | None, env: dict, mailbox,
               alone: bool = False) -> tuple:
    """On a worker: run one experiment in a temporary folder; (TrainResult, log text, where).

    first, second: train.py's text and the Settings (GPT), or the Task and its editable files.
    fixed: a task's fixed files {relative path: bytes}, written out here when this node doesn't
    have the task's folder. env: the driver's AUTORESEARCH_* settings (quick mode, sandbox).
    alone: no other experiment's code on this node meanwhile (runner.run_training's `alone`).
    """
    os.environ.update(env)
    here = where()
    mailbox.post.remote((tag, "started", here))
    with sandbox.private_folder("ray") as scratch:
        if isinstance(first, Task):
            first = _task_on_this_node(first, fixed or {}, scratch)
        run = run_task if isinstance(first, Task) else run_training
        result = run(first, second, scratch / "run",
                     on_progress=lambda p: mailbox.post.remote((tag, "progress", p)),
                     on_line=lambda line: mailbox.post.remote((tag, "line", line)),
                     log_path=scratch / "run.log", alone=alone)
        text = (scratch / "run.log").read_text(errors="replace") if (scratch / "run.log").exists() else ""
    result.run_dir = result.log_path = ""  # they were on the worker, and are gone
    return result, text, here


def _task_on_this_node(task, fixed: dict, scratch: Path):
    """The task, with its folder on this node: its own if it has the same fixed files, else a
    copy written from `fixed` (a node of a cluster without the driver's folders)."""
    if task.folder.is_dir() and not changed_files(task.folder, task.fixed):
        return task
    folder = scratch / "task"
    for name, data in fixed.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return replace(task, folder=folder)


@dataclass
class Job:
    """One experiment submitted to Ray, and who hears of it."""

    tag: int
    ref: object
    on_progress: Callable | None = None
    on_line: Callable | None = None
    on_start: Callable | None = None
    submitted: float = field(default_factory=time.time)
    where: dict | None = None  # set when a worker picked it up


class Engine:
    """Runs experiments as Ray tasks, up to `parallel` at once.

    With `address` (or $RAY_ADDRESS) it joins that cluster; without, it starts a local Ray
    instance sized to this machine, shut down again by `close`. `cpus`: the local instance's
    CPUs (default: all of them).
    """

    def __init__(self, parallel: int, address: str | None = None, cpus: int | None = None):
        self.parallel = parallel
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        token = os.environ.get("RAY_AUTH_TOKEN") or Path("~/.ray/auth_token").expanduser().exists()
        if token and "ray" not in sys.modules:
            # `ray start` (recent Ray) turns token authentication on and writes this token; a
            # driver given an address sends it only when told so before ray is imported (after,
            # the setting would no longer match the driver's, and a local instance fails)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray = self.ray = import_ray()
        self.owns = not ray.is_initialized()
        if self.owns:
            self._check_reachable()
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
                else:
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.ERROR)
            except ConnectionError as e:
                raise ParallelError(f"could not reach the Ray cluster at {self.address}: {e}. Is "
                                    "`ray start --head` running there, and is the address the one "
                                    "it printed (host:6379)? A cluster with token authentication "
                                    "(recent Ray's default) needs its token here (~/.ray/auth_token, "
                                    "copied from the head) and RAY_AUTH_MODE=token set before "
                                    "Python starts. Without an address a local Ray instance is "
                                    "started for the run.") from None
        total = ray.cluster_resources()
        self.gpus, self.cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        self.gpu_type = None
        if self.gpus:  # one whole GPU each: two experiments never share a card, and the CPUs
            # of its node shared out per GPU (data loading, Python; Ray sets OMP_NUM_THREADS)
            self.options = {"num_gpus": 1, "num_cpus": _cpus_per_gpu(ray.nodes())}
            self.gpu_type = one_gpu_type(total)
            if self.gpu_type:  # a mixed cluster: every experiment on one type, so they compare
                self.options["accelerator_type"] = self.gpu_type
        else:
            self.options = {"num_cpus": max(1, self.cpus // parallel)}
        # a wave's candidates on as many machines as there are: one that shared its machine
        # with another must train again alone before a keep (loop.py), one alone there need not
        self.options["scheduling_strategy"] = "SPREAD"
        self.remote = ray.remote(max_retries=0)(run_remote)
        self.mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
        self.jobs: dict[object, Job] = {}
        self.tags = iter(range(10**9))
        self._warned: set[int] = set()
        self._shipped: dict = {}  # a task's fixed files, as sent to the workers

    def _check_reachable(self) -> None:
        """A host:port nobody listens on: say so now (ray.init may wait on it for ever)."""
        host, _, port = (self.address or "").rpartition(":")
        if not host or not port.isdigit() or "://" in self.address:
            return  # no address, "auto", or a ray:// client address: Ray's own checks
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise ParallelError(f"could not reach the Ray cluster at {self.address} ({e}): is "
                                "`ray start --head` running there, and is this the address it "
                                "printed (host:6379)? Without an address a local Ray instance "
                                "is started for the run.") from None

    def describe(self) -> str:
        """One line: what runs where, for the loop's log and the dashboard."""
        place = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        each = (f"1 GPU and {self.options['num_cpus']} CPU(s)" if self.gpus
                else f"{self.options['num_cpus']} CPU(s)")
        text = (f"{self.parallel} experiments at once on {place} ({self.gpus} GPU(s), "
                f"{self.cpus} CPU(s); {each} each)")
        if self.gpu_type:
            text += (f"; the cluster mixes GPU types, so every experiment runs on its "
                     f"{self.gpu_type} GPUs only (their numbers compare)")
        if self.gpus and self.parallel > self.gpus:
            text += (f"; with {self.gpus} GPU(s) only {self.gpus} run at a time, the others "
                     "queue: never two on one GPU")
        return text

    def check(self, settings: Settings | None) -> None:
        """Refuse, before anything runs, a GPU preset on a cluster without a GPU."""
        wants_gpu = settings is not None and (settings.device == "cuda" or settings.preset in GPU_PRESETS)
        if wants_gpu and not self.gpus:
            raise ParallelError(f"the {settings.preset!r} preset trains on a CUDA GPU, and "
                                f"{self.describe().split(' on ', 1)[1].split(' (')[0]} has none "
                                f"(its resources: {self.cpus} CPUs, 0 GPUs). Start the Ray workers "
                                "on GPU machines (`ray start --address=HEAD:6379` there), or "
                                "use a CPU preset (cpu, quick).")

    # ------------------------------------------------------------ running

    def submit(self, first, second, on_progress=None, on_line=None, on_start=None,
               alone: bool = False) -> Job:
        """Start one experiment (see run_remote for first, second and alone); returns its Job at once."""
        fixed = None
        if isinstance(first, Task):  # read once per task, not once per experiment
            key = (str(first.folder), first.digest)
            if key not in self._shipped:
                self._shipped[key] = _fixed_files(first)
            fixed = self._shipped[key]
        env = {k: v for k, v in os.environ.items()
               if k.startswith("AUTORESEARCH_") and not is_secret_name(k)}
        tag = next(self.tags)
        ref = self.remote.options(**self.options).remote(tag, first, second, fixed, env, self.mailbox, alone)
        job = Job(tag, ref, on_progress, on_line, on_start)
        self.jobs[ref] = job
        return job

    def wait(self, jobs: list[Job], timeout: float = 0.25,
             on_waiting: Callable[[str], None] | None = None) -> list[Job]:
        """Deliver the workers' events, then return the jobs among `jobs` that have finished."""
        ready, _ = self.ray.wait([j.ref for j in jobs], num_returns=len(jobs), timeout=timeout)
        self.deliver()
        # a job queued behind our own running ones (parallel > GPUs) is not stuck
        ours_running = any(j.where is not None and j.ref not in ready for j in self.jobs.values())
        if on_waiting and not ours_running:
            for job in jobs:
                if job.where is None and job.ref not in ready:
                    self._say_if_stuck(job, on_waiting)
        done = set(ready)
        return [j for j in jobs if j.ref in done]

    def deliver(self) -> None:
        """Hand the workers' posted events to each job's callbacks."""
        by_tag = {j.tag: j for j in self.jobs.values()}
        for tag, kind, data in self.ray.get(self.mailbox.take.remote()):
            job = by_tag.get(tag)
            if job is None:
                continue
            if kind == "started":
                job.where = data
                callback = job.on_start
            else:
                callback = job.on_progress if kind == "progress" else job.on_line
            if callback:
                try:
                    callback(data)
                except Exception:  # a display's error must not lose the experiment
                    log.exception("an event callback failed")

    def result(self, job: Job) -> tuple[TrainResult, str]:
        """A finished job's (TrainResult, log text); a lost worker is a crash result."""
        self.jobs.pop(job.ref, None)
        try:
            result, text, here = self.ray.get(job.ref)
        except Exception as e:  # WorkerCrashedError, NodeDiedError, TaskCancelledError, ...
            what = type(e).__name__
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            place = f" on {job.where['host']} (pid {job.where['pid']})" if job.where else ""
            result = TrainResult(status="crash", reason=f"worker lost: {what}{place}: {detail}")
            text = (f"worker lost: the Ray task running this experiment{place} failed with {what}."
                    f"\n{str(e)[-3000:]}\n")
            result.error_tail = text
            here = job.where or {}
        # where it ran, as the worker saw it (Ray's GPU for it), not as train.py reports it
        result.host, result.device = here.get("host", ""), here.get("device", result.device)
        return result, text

    def cancel(self, jobs: list[Job], patience: float = 10.0) -> None:
        """Kill these experiments now (their workers, and so their sandboxes), and forget them."""
        for job in jobs:
            self.ray.cancel(job.ref, force=True)
        if jobs:
            self.ray.wait([j.ref for j in jobs], num_returns=len(jobs), timeout=patience)
        for job in jobs:
            self.jobs.pop(job.ref, None)

    def executor(self, first, second, run_dir, on_progress=None, on_line=None, stop=None,
                 log_path=None, alone: bool = False) -> TrainResult:
        """One experiment on Ray, waited for: the same call as runner.run_training/tasks.run_task
        (the loop's re-runs and the baseline use it). The log is written to `log_path`."""
        job = self.submit(first, second, on_progress, on_line, alone=alone)
        while not self.wait([job], on_waiting=on_line):
            if stop is not None and stop.is_set():
                self.cancel([job])
                return TrainResult(status="stopped", reason="stopped by the user")
        result, text = self.result(job)
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(log_path), text.encode("utf-8", "replace"))
            result.log_path = str(log_path)
        return result

    def _say_if_stuck(self, job: Job, say: Callable[[str], None]) -> None:
        """An experiment that waits for resources says so (once), instead of hanging silently."""
        waited = time.time() - job.submitted
        if waited < START_PATIENCE or job.tag in self._warned:
            return
        self._warned.add(job.tag)
        free = self.ray.available_resources()
        need = "a free GPU" if self.gpus else f"{self.options['num_cpus']} free CPU(s)"
        say(f"waiting: experiment not started after {waited:.0f}s: it needs {need}, and the "
            f"cluster has {free.get('GPU', 0):g} GPU(s) and {free.get('CPU', 0):g} CPU(s) free "
            f"of {self.gpus} and {self.cpus}. Other jobs may hold them (`ray status` shows who); "
            "it starts as soon as one is free.")

    def close(self) -> None:
        """Cancel what still runs; shut the local Ray instance down (a cluster stays up)."""
        self.cancel(list(self.jobs.values()), patience=5.0)
        if self.owns and self.ray.is_initialized():
            self.ray.shutdown()


def one_gpu_type(resources: dict) -> str | None:
    """On a cluster of mixed GPU types, the type to run every experiment on (the one the most
    nodes have; Ray marks each node with `accelerator_type:<type>`); None if there is one type."""
    types = {k.split(":", 1)[1]: v for k, v in resources.items() if k.startswith("accelerator_type:")}
    if len(types) < 2:
        return None
    return max(sorted(types), key=lambda t: types[t])


def _cpus_per_gpu(nodes: list[dict]) -> int:
    """The CPUs each GPU experiment can have on every GPU node: the least, over those nodes, of
    its CPUs per GPU (a CPU-only head node doesn't count)."""
    shares = [int(n["Resources"].get("CPU", 1) // n["Resources"]["GPU"]) for n in nodes
              if n.get("Alive", True) and n.get("Resources", {}).get("GPU")]
    return max(1, min(shares, default=1))


def _fixed_files(task) -> dict:
    """A task's fixed files as {relative path: bytes}, for a node without its folder."""
    return {name: (task.folder / name).read_bytes() for name in task.fixed}

