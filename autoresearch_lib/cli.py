"""Command line: `python -m autoresearch_lib {prepare,train,evaluate,loop,report} ...`."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
