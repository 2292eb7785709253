"""How fast is the BOS-aligned best-fit data loader, alone? It must never starve the GPU.

    python bench/bench_loader.py [--batch 128 --seq 2048 --vocab 8192 --batches 20]

Prints the median tokens/s over several timed batches (on the CPU, no GPU needed), to compare
with the training throughput of the preset (e.g. ~1.6M tokens/s for the h100 preset).
"""

import argparse
import statistics
import time

from autoresearch_lib import data
from autoresearch_lib.config import make_settings


def main(batch=128, seq=2048, vocab=8192, batches=20):
    prepared = data.prepare(make_settings("cpu", vocab_size=vocab), verbose=False)
    loader = data.make_dataloader(prepared.tokens("train"), prepared.vocab_size - 1, batch, seq)
    next(loader)  # fill the buffer first
    rates = []
    for _ in range(batches):
        t0 = time.perf_counter()
        next(loader)
        rates.append(batch * seq / (time.perf_counter() - t0))
    median = statistics.median(rates)
    print(f"loader: batch {batch} x seq {seq}, vocab {vocab}: median {median:,.0f} tokens/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}, {batches} batches)")
    return median


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batches", type=int, default=20)
    a = p.parse_args()
    main(a.batch, a.seq, a.vocab, a.batches)
