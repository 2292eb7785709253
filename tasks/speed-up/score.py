"""Score solve.py: time it on fresh questions, check every answer, print `median_seconds: <n>`.

This file is the judge, so the candidate never runs in its process (imported code could print
its own time, or patch this one). solve.py runs as a separate program, in a private folder
holding only itself, and is timed from here, start to exit: what it says about itself does not
count. The questions are new each run (random offsets), so answers can't be remembered from an
earlier run; the right answers come from this file's own sieve. A wrong answer stops the run
with an error: a faster program that is wrong is a crash, not a win.
"""

import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = (3000, 6000, 9000, 12000)  # each run asks for the n-th prime near these n
REPEATS = 3  # timed calls; the median counts (one slow call, say a busy moment, does not)
LIMIT = 15  # seconds one call may take


def fail(message: str) -> None:
    """Stop with a message and no score: the run is a crash, not a result."""
    print(f"score.py: {message}", file=sys.stderr)
    sys.exit(1)


def reference(queries: list[int]) -> list[int]:
    """The right answers, by a sieve on a bytearray (fast, and independent of solve.py)."""
    n = max(queries)
    limit = int(n * (math.log(n) + math.log(math.log(n)))) + 1  # above the n-th prime, n >= 6
    sieve = bytearray([1]) * limit
    sieve[0] = sieve[1] = 0
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, limit, i)))
    primes = [i for i, is_prime in enumerate(sieve) if is_prime]
    return [primes[q - 1] for q in queries]


def timed_call(queries: list[int], folder: str) -> tuple[float, list]:
    """Run solve.py once on `queries`: (seconds from start to exit, its answers)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "solve.py"], input=json.dumps(queries),
                              cwd=folder, capture_output=True, text=True, timeout=LIMIT)
    except subprocess.TimeoutExpired:
        fail(f"one call of solve.py took more than {LIMIT} s")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)  # its error, for the log (never its stdout)
        fail(f"solve.py failed with exit code {done.returncode}: see its error above")
    try:
        return seconds, json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        fail("solve.py's last line of output must be a JSON list of answers, one per n")


def check(queries: list[int], answers, expected: list[int]) -> None:
    if not isinstance(answers, list) or len(answers) != len(queries):
        fail(f"solve.py must print a JSON list of {len(queries)} answers, one per n")
    for n, got, want in zip(queries, answers, expected):
        if got != want:
            fail(f"wrong answer: the {n}th prime is {want}, and solve.py said {got!r}. "
                 "Faster only counts if every answer is right.")


def main() -> None:
    rng = random.SystemRandom()  # unpredictable questions
    times = []
    with tempfile.TemporaryDirectory() as private:
        shutil.copy("solve.py", private)
        for _ in range(REPEATS):
            queries = [size + rng.randrange(1000) for size in SIZES]
            seconds, answers = timed_call(queries, private)
            check(queries, answers, reference(queries))
            times.append(seconds)
    print(f"median_seconds: {statistics.median(times):.4f}")


if __name__ == "__main__":
    main()
