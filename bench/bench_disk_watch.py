"""What watching a run's share of the disk costs (sandbox.disk_watch): one look (a walk of the
run's folders, one statvfs per disk) over folders of N small files, median of 21, and the share
of one core the watch thread takes at its half-second interval (it looks less often when a look
takes longer than a tenth of a second, so at most a fifth of a core).

    python bench/bench_disk_watch.py [--files 10 1000 5000 20000]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from autoresearch_lib import sandbox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[10, 1000, 5000, 20000])
    a = ap.parse_args()
    for n in a.files:
        with tempfile.TemporaryDirectory() as folder:
            for i in range(n):  # 100 files per folder, 2 kB each, like a compile cache
                sub = Path(folder) / str(i // 100)
                sub.mkdir(exist_ok=True)
                (sub / str(i)).write_bytes(b"x" * 2000)
            times = []
            for _ in range(21):
                t0 = time.perf_counter()
                sandbox._bytes_in([Path(folder)])
                os.statvfs(folder)
                times.append(time.perf_counter() - t0)
            look = statistics.median(times)
            every = max(0.5, 4 * look)
            print(f"{n:>6} files: a look takes {look * 1000:7.2f} ms (median of 21); the watch looks "
                  f"every {every:.2f} s and takes {100 * look / (every + look):4.1f} % of a core", flush=True)


if __name__ == "__main__":
    main()
