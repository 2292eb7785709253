"""Command line: `python -m autoresearch_lib {prepare,train,evaluate,loop,report,tasks} ...`."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from tqdm import tqdm

from .config import PRESETS
from .data import DataError


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="auto", choices=[*PRESETS, "auto"],
                   help="size for the hardware (default: auto, for this machine)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="your own training text: a .txt file or a folder of them")
    src.add_argument("--dataset", choices=["shakespeare", "tinystories", "climbmix"],
                     help="a built-in corpus (default: shakespeare, embedded, offline)")
    p.add_argument("--val-text", help="separate validation text (default: hold out whole documents)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the preset's)")


def tqdm_progress(budget: float):
    """A progress callback that drives a tqdm bar over the time budget."""
    bar = tqdm(total=round(budget), unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")

    def on_progress(p):
        bar.n = min(bar.total, round(budget * p.percent / 100))
        bar.set_postfix_str(f"step {p.step} loss {p.loss:.3f} {p.tok_per_sec:,.0f} tok/s", refresh=True)

    return bar, on_progress


class LiveBar:
    """The running experiment as a tqdm bar, for the loop command (driven by loop events).

    GPT training: the time budget, with step, loss and tokens/s. Another task: the seconds its
    command has run, out of its timeout (a task that prints GPT-style progress lines shows them).
    """

    def __init__(self, budget: float, task: bool):
        self.budget, self.task = budget, task
        self.bar, self.started, self.done = None, 0.0, threading.Event()

    def start(self, index: int) -> None:
        self.close()
        self.bar = tqdm(total=round(self.budget), unit="s", leave=False, desc=f"#{index:03d}",
                        bar_format="{l_bar}{bar}| {n:.0f}/{total}s{postfix}")
        self.started, self.done = time.time(), threading.Event()
        if self.task:  # the command prints nothing we can read: tick the elapsed time ourselves
            threading.Thread(target=self._tick, args=(self.bar, self.done), daemon=True).start()

    def _tick(self, bar, done: threading.Event) -> None:
        while not done.wait(0.5):
            bar.n = min(bar.total, round(time.time() - self.started))
            bar.set_postfix_str("elapsed, of the task's timeout", refresh=True)

    def progress(self, p) -> None:
        if self.bar is None:
            return
        if not self.task:
            self.bar.n = min(self.bar.total, round(self.budget * p.percent / 100))
        self.bar.set_postfix_str(f"step {p.step} loss {p.loss:.3f}"
                                 + (f" {p.tok_per_sec:,.0f} tok/s" if p.tok_per_sec else ""),
                                 refresh=True)

    def close(self) -> None:
        self.done.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LoopPrinter:
    """An `on_event` callback for loop.run / loop.step: a live bar for the running experiment,
    then one line per results.tsv row as it is decided. What the loop command shows, and what a
    notebook uses so that no training runs silently:

        loop.run(ws, agent, max_experiments=3, on_event=LoopPrinter.for_workspace(ws))
    """

    def __init__(self, metric: str, bar: LiveBar):
        self.metric, self.bar = metric, bar

    @classmethod
    def for_workspace(cls, ws) -> "LoopPrinter":
        budget = ws.task.timeout if ws.is_task else ws.settings.budget
        return cls(ws.metric, LiveBar(budget, task=ws.is_task))

    def __call__(self, e) -> None:
        if e.kind in ("experiment", "recheck"):
            self.bar.start(e.index)
        elif e.kind == "progress" and "slot" not in e.data:
            self.bar.progress(e.data["progress"])
        elif e.kind == "parallel":  # a parallel loop: where its experiments run
            print(e.data["describe"], flush=True)
        elif e.kind == "wave":
            print(f"wave {e.data['wave']}: " + " | ".join(c["description"] for c in e.data["candidates"]),
                  flush=True)
        elif e.kind == "alone":  # it had company while it trained: again, alone on its machine
            print(f"#{e.index} ({self.metric} {e.data['value']:.6g}) trained beside other experiments' "
                  f"code on {e.data['host']}: training it again alone before it can be kept", flush=True)
            self.bar.start(e.index)
        elif e.kind == "waiting" and e.index < 0:  # a parallel experiment waits for a GPU
            print(e.data["reason"], flush=True)
        elif e.kind == "decision":
            self.bar.close()
            exp = e.data["experiment"]
            print(experiment_line(exp, self.metric), flush=True)
            for recheck in exp.rechecks:  # their own rows, right after the candidate's
                print(experiment_line(recheck, self.metric), flush=True)
        elif e.kind == "waiting":
            print(f"the agent failed to propose {e.data['failures']} times in a row "
                  f"({e.data['reason'][:120]}); trying again in {e.data['seconds']:g} s", flush=True)

    def close(self) -> None:
        self.bar.close()


def cmd_prepare(args) -> None:
    from . import prepare

    prepared = prepare(dataset=args.dataset, text=args.text, val_text=args.val_text,
                       vocab_size=args.vocab_size, preset=args.preset)
    print(f"vocab {prepared.vocab_size} | train {prepared.train_tokens:,} tokens "
          f"({prepared.train_docs:,} docs) | val {prepared.val_tokens:,} tokens | "
          f"{prepared.bytes_per_token:.2f} bytes/token | {prepared.dir}")


def cmd_train(args) -> int:
    from . import evaluate, make_settings, train

    budget = args.budget or make_settings(args.preset).budget
    bar, on_progress = tqdm_progress(budget)
    with bar:
        result = train(preset=args.preset, budget=args.budget, script=args.script, text=args.text,
                       val_text=args.val_text, dataset=args.dataset, vocab_size=args.vocab_size,
                       run_dir=args.run_dir, on_progress=on_progress)
    print(open(result.log_path).read().rsplit("\n---\n", 1)[-1] if result.ok else result.error_tail)
    print(result)
    if result.ok and args.sample:
        print(evaluate(result.checkpoint, prompt=args.prompt, bpb=False, max_new_tokens=args.sample))
    return 0 if result.ok else 1


def cmd_evaluate(args) -> None:
    from . import evaluate

    print(evaluate(args.checkpoint, prompt=args.prompt, num_samples=args.num_samples,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k))


def make_cli_agent(args):
    """The agent the loop command asked for."""
    from .agents import make_agent
    from .agents.scripted import parse_edits

    if args.agent == "openai":
        return make_agent("openai", model=args.model, base_url=args.base_url)
    if args.agent == "scripted":
        if not args.edits:
            raise ValueError("--agent scripted needs --edits FILE: a JSON list of replies "
                             '(strings) or [description, {"NAME": value}] pairs.')
        with open(args.edits, encoding="utf-8") as f:
            return make_agent("scripted", edits=parse_edits(f.read()))
    return make_agent("offline", seed=args.seed)


def experiment_line(exp, metric: str = "val_bpb") -> str:
    """One line per results.tsv row, as the loop command prints it (a re-check of the best too)."""
    bpb = f"{exp.val_bpb:.6f}" if exp.val_bpb is not None else "   -    "
    recheck = exp.description.startswith("recheck ")
    best = ("(first run)" if exp.best_before is None else
            f"({'was' if recheck else 'best'} {exp.best_before:.6f})")
    why = f"  [{exp.reason}]" if exp.status == "crash" or recheck else ""
    return f"#{exp.index:03d} {exp.commit} {exp.status:<7} {metric} {bpb} {best}  {exp.description}{why}"


def cost_line(done) -> str:
    """What fair comparisons cost in this loop, for its last line."""
    from .loop import recheck_cost

    c = recheck_cost(done)
    return (f"fair comparisons: {c['extra_runs']} extra run(s) ({c['rechecks']} re-check(s) of the "
            f"best) for {c['experiments']} experiment(s) and {c['kept']} kept change(s): "
            f"{c['per_kept']:.1f} extra run(s) per kept change (--no-recheck turns this off)")


def open_or_create(args):
    """The loop command's workspace: resumed if it exists, else made (GPT, or --task)."""
    from pathlib import Path

    from .workspace import TASK_JSON, Workspace

    path = Path(args.workspace)
    if (path / "settings.json").exists() or (path / TASK_JSON).exists():
        ws = Workspace.open(path)
        print(f"resuming {path} ({ws.next_index()} experiments so far, best {ws.best()})")
        if args.task and args.task != ws.task_info["name"] and Path(args.task).name != ws.task_info["name"]:
            raise ValueError(f"{path} is a workspace for the task {ws.task_info['name']}, not "
                             f"{args.task}: use a new --workspace for another task.")
        if ws.is_task:
            return ws
        fixed = ws.settings
        if (args.budget and args.budget != fixed.budget) or args.preset not in ("auto", fixed.preset):
            print(f"note: this workspace's settings were fixed when it was made (preset "
                  f"{fixed.preset}, budget {fixed.budget:g}s), so every experiment is measured "
                  "alike; --preset/--budget are ignored. Use a new --workspace to change them.")
        return ws
    if args.task and args.task != "gpt":
        ws = Workspace.create(path, task=args.task)
        task = ws.task
        print(f"created {path} on branch {ws.branch} (task {task.name}: {task.direction} "
              f"{task.metric}, editing {', '.join(task.editable)})")
        return ws
    ws = Workspace.create(path, preset=args.preset, budget=args.budget, text=args.text,
                          val_text=args.val_text, dataset=args.dataset,
                          vocab_size=args.vocab_size)
    print(f"created {path} on branch {ws.branch} (preset {ws.settings.preset}, "
          f"budget {ws.settings.budget:g}s)")
    return ws


def cmd_loop(args) -> int:
    from pathlib import Path

    from . import loop
    from .plots import save_progress_chart
    from .workspace import Workspace

    path = Path(args.workspace)
    agent = make_cli_agent(args)  # first: a missing key or edits file must not leave a workspace behind
    ws = open_or_create(args)
    if ws.is_task:
        bar = LiveBar(ws.task.timeout, task=True)
    else:
        from .data import prepare as prepare_data

        prepare_data(ws.settings)  # a bad corpus fails here, clearly, before any experiment
        bar = LiveBar(ws.settings.budget, task=False)
    on_event = LoopPrinter(ws.metric, bar)

    done = []
    try:
        done = loop.run(ws, agent, max_experiments=args.max_experiments, on_event=on_event,
                        noise_runs=args.noise_runs, z=args.z, recheck=args.recheck,
                        parallel=args.parallel, ray_address=args.ray_address)
    except KeyboardInterrupt:
        bar.close()
        Workspace.open(path)  # undo the unfinished experiment
        print("\nstopped: run the same command again to resume")
        return 130
    finally:
        bar.close()
    if args.recheck:
        print(cost_line(done))
    chart = save_progress_chart(ws.results(), path / "progress.png", ws.metric, ws.direction)
    print(f"results: {ws.results_path}\nchart:   {chart}")
    return 0


def cmd_report(args) -> None:
    from pathlib import Path

    from .plots import save_progress_chart, summary
    from .workspace import Workspace

    ws = Workspace.open(args.workspace)
    rows = ws.results()
    if not rows:
        raise ValueError(f"{ws.results_path} has no experiments yet: run the loop first.")
    s = summary(rows, ws.metric, ws.direction)
    out = save_progress_chart(rows, args.out or Path(args.workspace) / "progress.png",
                              ws.metric, ws.direction)
    better = "higher" if ws.direction == "maximize" else "lower"
    print(f"{s['experiments']} experiments, {s['kept']} kept, {s['crashed']} crashed | "
          f"{ws.metric} ({better} is better): baseline {s['baseline']:.6f} -> best "
          f"{s['best']:.6f} ({s['improvement']:+.6f} better) | chart: {out}")


def cmd_tasks(args) -> None:
    """List the tasks the loop can run: GPT training and the shipped examples."""
    from . import tasks

    print(f"{'gpt':<12} GPT training: edit train.py, minimize val_bpb (the default)")
    for name in tasks.examples():
        task = tasks.load_task(name)
        print(f"{name:<12} edit {', '.join(task.editable)}, {task.direction} {task.metric} "
              f"(runs `{task.command}`, at most {task.timeout:g}s)")
    print(f"\nrun one: python -m autoresearch_lib loop --workspace runs/mine --task NAME "
          f"(or --task path/to/your/folder, with a task.toml; see {tasks.examples_dir()}/README.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoresearch_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="train the tokenizer and write the token files")
    add_data_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a train.py for a fixed time budget")
    add_data_args(p)
    p.add_argument("--budget", type=float, help="training seconds (default: the preset's)")
    p.add_argument("--script", help="the train.py to run (default: the baseline)")
    p.add_argument("--run-dir", help="where the log and checkpoint go (default: runs/<time>)")
    p.add_argument("--sample", type=int, default=200, help="tokens of text to sample after (0: none)")
    p.add_argument("--prompt", default="", help="text the sample starts from")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="val_bpb and text samples of a checkpoint")
    p.add_argument("checkpoint", help="a model.pt written by train")
    p.add_argument("--prompt", default="")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("loop", help="run the research loop in a workspace (created or resumed)")
    p.add_argument("--workspace", required=True, help="the workspace folder (made if missing)")
    add_data_args(p)
    p.add_argument("--budget", type=float, help="training seconds per experiment")
    p.add_argument("--task", help="what to research: gpt (default), a shipped task "
                   "(see the `tasks` command) or a task folder with a task.toml")
    p.add_argument("--agent", default="offline", choices=["offline", "openai", "scripted"])
    p.add_argument("--max-experiments", type=int, help="stop after this many (default: never)")
    p.add_argument("--model", help="openai agent: model name (or $OPENAI_MODEL)")
    p.add_argument("--base-url", help="openai agent: server URL, e.g. http://localhost:11434/v1")
    p.add_argument("--edits", help="scripted agent: JSON file of prepared edits")
    p.add_argument("--noise-runs", type=int, default=0, help="run the baseline K times to measure noise")
    p.add_argument("--z", type=float, default=2.0, help="noise-aware: keep only wins > z·σ")
    p.add_argument("--no-recheck", dest="recheck", action="store_false",
                   help="compare with the best's recorded val_bpb, however busy the machine was "
                        "then (upstream's rule); by default the best is trained again beside a "
                        "candidate when the machine's speed changed or the win is small")
    p.add_argument("--seed", type=int, default=0, help="offline agent's seed")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="experiments at once, in waves of N, on Ray (pip install -e '.[ray]'): "
                        "one GPU each, or a share of the CPUs (default: 1, one at a time)")
    p.add_argument("--ray-address", help="parallel: an existing Ray cluster (`ray start --head` "
                                         "prints it; default $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_loop)

    p = sub.add_parser("report", help="write the progress chart of a workspace to a PNG")
    p.add_argument("--workspace", required=True)
    p.add_argument("--out", help="PNG path (default: WORKSPACE/progress.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tasks", help="list the tasks the loop can run (--task NAME)")
    p.set_defaults(func=cmd_tasks)
    return parser


class KnownError(Exception):
    pass


def known_errors() -> tuple:
    """Our own errors, whose messages already say what to do: printed without a traceback."""
    from .agents import ProposalError
    from .loop import LoopError
    from .workspace import WorkspaceError

    return (ProposalError, LoopError, WorkspaceError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            return args.func(args) or 0
        except known_errors() as e:
            raise KnownError(str(e)) from None
    except (DataError, FileNotFoundError, ValueError, KnownError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
