"""Start a train.py for the runner: `python -m autoresearch_lib.launch train.py`.

The harness is imported *before* train.py runs, so it can take the run's secret id out of the
environment before the script could read it. The harness signs its summary block with that id,
and the runner accepts only a signed summary: a train.py that prints `val_bpb: 0.1` itself
is recorded as a crash, not as a miracle.
"""

import runpy
import sys

from . import harness  # noqa: F401  (takes the run id out of the environment)

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees itself as argv[0], as with `python train.py`
    runpy.run_path(script, run_name="__main__")
