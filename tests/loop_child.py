"""A research loop in a child process, for the kill test in test_loop.py.

    python tests/loop_child.py WORKSPACE [--parallel N]

Runs the offline agent on an existing workspace with a long training budget (the workspace
keeps its own; only this child's runs get longer), so the test can SIGKILL it mid-experiment.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout under test, not another copy

from autoresearch_lib import loop  # noqa: E402
from autoresearch_lib.agents import OfflineAgent  # noqa: E402
from autoresearch_lib.runner import run_training  # noqa: E402
from autoresearch_lib.workspace import Workspace  # noqa: E402

LONG_BUDGET = 120  # seconds: far longer than the test waits before it kills us


def long_runs(script_text, settings, run_dir, **kwargs):
    """run_training with a longer budget, so the kill lands during training."""
    return run_training(script_text, dataclasses.replace(settings, budget=LONG_BUDGET), run_dir, **kwargs)


if __name__ == "__main__":
    events = lambda e: print(e.kind, e.index, flush=True) if e.kind != "line" else None
    if "--parallel" in sys.argv:  # waves on a local Ray instance, with the workspace's budget
        n = int(sys.argv[sys.argv.index("--parallel") + 1])
        loop.run(Workspace.open(sys.argv[1]), OfflineAgent(), on_event=events, parallel=n)
    else:
        loop.run(Workspace.open(sys.argv[1]), OfflineAgent(), on_event=events, executor=long_runs)
