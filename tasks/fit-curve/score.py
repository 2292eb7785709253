"""Score solve.py: fit it to train.csv, predict test.csv, print `mse: <number>`.

This file is the judge, so the candidate never runs in its process (imported code could print
its own score line, or patch this one). solve.py runs as a separate program, in a private
folder holding only itself, with the training points and the held-out x values on stdin; its
output is read, checked, and scored here. The held-out y values never leave this process.
"""

import csv
import json
import math
import shutil
import subprocess
import sys
import tempfile

LIMIT = 50  # seconds solve.py may take (the task's timeout is 60)


def fail(message: str) -> None:
    """Stop with a message and no score: the run is a crash, not a result."""
    print(f"score.py: {message}", file=sys.stderr)
    sys.exit(1)


def read(name: str) -> tuple[list[float], list[float]]:
    with open(name, newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["x"]) for r in rows], [float(r["y"]) for r in rows]


def predict(train_x: list[float], train_y: list[float], query: list[float]) -> list[float]:
    """Run solve.py on its own; its predictions for `query`, checked."""
    request = json.dumps({"x": train_x, "y": train_y, "query": query})
    with tempfile.TemporaryDirectory() as private:
        shutil.copy("solve.py", private)
        try:
            done = subprocess.run([sys.executable, "solve.py"], input=request, cwd=private,
                                  capture_output=True, text=True, timeout=LIMIT)
        except subprocess.TimeoutExpired:
            fail(f"solve.py took more than {LIMIT} s: make it faster (fewer steps?)")
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)  # its error, for the log (never its stdout)
        fail(f"solve.py failed with exit code {done.returncode}: see its error above")
    lines = done.stdout.strip().splitlines()
    try:
        predictions = json.loads(lines[-1])
    except (IndexError, ValueError):
        fail("solve.py's last line of output must be a JSON list of numbers, one per query")
    if not (isinstance(predictions, list) and len(predictions) == len(query)
            and all(isinstance(p, (int, float)) for p in predictions)):
        fail(f"solve.py must print a JSON list of {len(query)} numbers, one per query point")
    return predictions


def mean_squared_error(predictions: list[float], truth: list[float]) -> float:
    mse = sum((p - y) * (p - y) for p, y in zip(predictions, truth)) / len(truth)
    if not math.isfinite(mse):  # a nan or inf prediction, or one too big to square
        fail("solve.py's predictions give a non-finite error: the fit blew up "
             "(a learning rate too high?)")
    return mse


def main() -> None:
    train_x, train_y = read("train.csv")
    test_x, test_y = read("test.csv")
    predictions = predict(train_x, train_y, test_x)
    print(f"mse: {mean_squared_error(predictions, test_y):.6f}")


if __name__ == "__main__":
    main()
