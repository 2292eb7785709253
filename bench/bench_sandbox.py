"""Benchmark: what the bubblewrap sandbox costs per experiment on a CPU (goal: <= 0.3 s).

    python bench/bench_sandbox.py [--repeats 7] [--runs 7] [--budget 2] [--json out.json]

Two measurements, each repeated with the two variants interleaved (A, B, A, B, ...) so that a
machine whose load changes meanwhile (a shared CI box, a laptop) hits both alike; medians:

    a. start-up: `python -c pass` and `python -c "import torch"`, plain and inside
       sandbox.command (with the binds a training run gets), wall time of the whole process
    b. a whole quick experiment, runner.run_training with AUTORESEARCH_SANDBOX=0 and with the
       default (bwrap): start-up (process start to the first progress line, measured by the
       runner), scoring (the two model servers: sandboxed or not) and the total wall time

An experiment pays the sandbox three times: the training process and the two model servers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AUTORESEARCH_QUICK", "1")

from autoresearch_lib import data, sandbox  # noqa: E402
from autoresearch_lib.baseline import render_train_py  # noqa: E402
from autoresearch_lib.config import make_settings  # noqa: E402
from autoresearch_lib.runner import clean_env, run_training  # noqa: E402


def timed(argv: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def startup(repeats: int, folder: Path) -> dict:
    """Wall seconds of a bare and a torch-importing interpreter, plain and sandboxed."""
    env = clean_env()
    out = {}
    for name, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch")):
        plain = [sys.executable, "-c", code]
        boxed = sandbox.command(plain, cwd=folder, writable=[folder])
        timed(plain, env, folder)  # warm the page cache once
        times = {"plain": [], "sandboxed": []}
        for _ in range(repeats):
            times["plain"].append(timed(plain, env, folder))
            times["sandboxed"].append(timed(boxed, env, folder))
        out[name] = summarize(times)
    return out


def experiments(runs: int, budget: float, folder: Path) -> dict:
    """Quick run_training results, unsandboxed and sandboxed, interleaved."""
    settings = make_settings("quick", budget=budget)
    data.prepare(settings, verbose=False)
    script = render_train_py("quick")
    seen: dict[str, dict[str, list[float]]] = {}
    for i in range(runs):
        for variant, value in (("plain", "0"), ("sandboxed", "auto")):
            os.environ[sandbox.MODE_ENV] = value
            result = run_training(script, settings, folder / f"{variant}-{i}")
            assert result.ok, result.error_tail
            assert result.sandbox == ("none" if variant == "plain" else "bwrap")
            for key in ("startup_seconds", "eval_seconds", "wall_seconds"):
                seen.setdefault(key, {"plain": [], "sandboxed": []})[variant].append(getattr(result, key))
    os.environ.pop(sandbox.MODE_ENV, None)
    return {key: summarize(times) for key, times in seen.items()}


def summarize(times: dict[str, list[float]]) -> dict:
    plain, boxed = statistics.median(times["plain"]), statistics.median(times["sandboxed"])
    diffs = [b - a for a, b in zip(times["plain"], times["sandboxed"])]  # pairwise, neighbours in time
    return {"plain": plain, "sandboxed": boxed, "difference": boxed - plain,
            "median_pairwise_difference": statistics.median(diffs), "n": len(times["plain"]),
            "raw": times}


def show(title: str, table: dict) -> None:
    print(f"\n{title}")
    print(f"  {'':<28}{'plain':>9}{'sandboxed':>11}{'diff':>9}{'pairwise':>10}   (median s, n)")
    for name, row in table.items():
        print(f"  {name:<28}{row['plain']:>9.3f}{row['sandboxed']:>11.3f}{row['difference']:>+9.3f}"
              f"{row['median_pairwise_difference']:>+10.3f}   n={row['n']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interpreter start-ups per variant")
    parser.add_argument("--runs", type=int, default=7, help="quick experiments per variant")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if sandbox.mode() != "bwrap":
        sys.exit(f"no sandbox here: {sandbox.why_not()}")
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        folder = Path(tmp)
        report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "load_before": os.getloadavg(), "bwrap": subprocess.run(
                                  ["bwrap", "--version"], capture_output=True, text=True, check=False).stdout.strip()},
                  "when": time.strftime("%Y-%m-%d %H:%M")}
        report["startup"] = startup(args.repeats, folder)
        show("a. interpreter start-up", report["startup"])
        if args.runs:
            report["experiment"] = experiments(args.runs, args.budget, folder)
            show(f"b. a quick experiment (budget {args.budget:g} s)", report["experiment"])
        report["machine"]["load_after"] = os.getloadavg()
    print(f"\nload average before {report['machine']['load_before'][0]:.1f}, "
          f"after {report['machine']['load_after'][0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
