"""Download dataset shards from Hugging Face: resumable, retried, size-checked.

Online GPU users train on real corpora: ClimbMix (what upstream karpathy/autoresearch trains
on) or Karpathy's cleaned TinyStories. Big downloads break: connections drop, servers answer
500 or 429. So every file streams into `NAME.part`, resumes where it stopped with an HTTP
`Range` request, retries passing failures with exponential backoff, and becomes `NAME` (an
atomic `os.replace`) only once its size checks out. A file under its real name is therefore
always whole. Standard library only (urllib): nothing extra to install.

Offline? Train on the embedded Shakespeare corpus (`dataset="shakespeare"`); nothing here runs.
Mirrors and tests point `AUTORESEARCH_HF_BASE_URL` (or `base_url=`) at another server.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HF_BASE_ENV = "AUTORESEARCH_HF_BASE_URL"
DEFAULT_HF_BASE = "https://huggingface.co"
CHUNK_BYTES = 1 << 20  # 1 MiB reads: few system calls, a progress bar that still moves
MAX_RETRY_AFTER = 60.0  # never let a server's Retry-After stall a learner for longer
USER_AGENT = "autoresearch-kit"
OFFLINE_HINT = (
    "Check your internet connection (and $AUTORESEARCH_HF_BASE_URL if you use a mirror), then "
    "run again: a partial download resumes where it stopped. Offline, train on the embedded "
    "corpus instead: dataset='shakespeare'."
)


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message says which one, why, and what to do next."""


class _Transient(Exception):
    """A failure worth another try: a dropped connection, a timeout, a 5xx or a 429."""

    def __init__(self, problem: str, wait: float | None = None):
        super().__init__(problem)
        self.problem = problem
        self.wait = wait  # seconds the server asked us to wait (Retry-After), if it said


# ---------------------------------------------------------------------------------------------
# one file


def download_file(url: str, dest: str | Path, *, expected_size: int | None = None,
                  retries: int = 5, backoff: float = 1.0, timeout: float = 30,
                  progress: bool = False) -> Path:
    """Download `url` to `dest` and return `dest`; a no-op when `dest` is already there.

    `retries` is how many more attempts follow the first; attempt k waits `backoff * 2**k`
    seconds before it. After a failure the `.part` file stays, so the next call resumes.
    """
    dest = Path(dest)
    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest  # only complete files ever get this name, so it is safe to trust
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress, dest.name)
            break
        except _Transient as err:
            if attempt == retries:
                raise DownloadError(f"could not download {url}: {err.problem} (gave up after "
                                    f"{retries + 1} attempts). {OFFLINE_HINT}") from err
            time.sleep(err.wait if err.wait is not None else backoff * 2**attempt)
    _check_size(url, part, expected_size)
    os.replace(part, dest)  # atomic: readers see the old state or the whole file, never half
    return dest


def _fetch_once(url: str, part: Path, timeout: float, progress: bool, name: str) -> None:
    """One attempt: leave the whole body in `part`, or raise _Transient / DownloadError."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")  # ask only for what is still missing
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:  # before OSError: HTTPError is one too
        return _handle_http_error(url, part, have, err)
    except (OSError, http.client.HTTPException) as err:
        raise _Transient(f"the connection failed ({_reason(err)})") from err
    with response:
        start, total = _resume_point(response, part, have)
        _stream(response, part, start, total, progress, name)


def _handle_http_error(url: str, part: Path, have: int, err: urllib.error.HTTPError) -> None:
    """Sort an HTTP error: a whole .part (416), worth retrying (5xx, 429, 408), or final."""
    err.close()
    if err.code == 416 and have:
        if _parse_content_range(err.headers.get("Content-Range", ""))[1] == have:
            return  # nothing left to fetch: the .part already holds the whole file
        part.unlink()  # the .part is longer than the file on the server: stale, start over
        raise _Transient("the partial file did not match the server's file")
    if err.code in (408, 429) or err.code >= 500:
        raise _Transient(f"the server answered HTTP {err.code} {err.reason}",
                         _retry_after(err.headers))
    part.unlink(missing_ok=True)  # no retry will fix this, so don't leave a .part behind
    raise DownloadError(_final_http_message(url, err.code, err.reason)) from err


def _final_http_message(url: str, code: int, reason: str) -> str:
    """Explain an HTTP error that retrying will not fix."""
    if code == 404:
        why = ("the file does not exist there: the dataset or file name is wrong, or the "
               "server (a mirror set by $AUTORESEARCH_HF_BASE_URL?) does not host it")
    elif code in (401, 403):
        why = "access was refused: the dataset may be gated or private"
    else:
        why = "the server refused the request"
    return (f"could not download {url}: HTTP {code} {reason}; {why}. Not retried. Check the "
            f"address, or train offline on the embedded corpus: dataset='shakespeare'.")


def _resume_point(response, part: Path, have: int) -> tuple[int, int | None]:
    """Where this response's body starts in the file, and the file's size (None: unknown)."""
    if response.status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range", ""))
        if start != have:  # a server that resumes elsewhere can't be trusted: start over
            part.unlink(missing_ok=True)
            raise _Transient(f"the server resumed at byte {start} instead of {have}")
        return start, total
    # a 200 sends the whole file even when we asked for a range: restart from zero
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _stream(response, part: Path, start: int, total: int | None, progress: bool,
            name: str) -> None:
    """Copy the body into `part` (appending when resuming), then check nothing is missing."""
    mode = "ab" if start else "wb"  # "wb" also wipes a .part that a 200 answer made stale
    with open(part, mode) as out, _progress_bar(total, start, name, progress) as bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"the transfer broke off ({_reason(err)})") from err
    got = part.stat().st_size
    if total is not None and got < total:  # urllib returns b"" on an early close, no error
        raise _Transient(f"the connection closed after {got:,} of {total:,} bytes")


def _check_size(url: str, part: Path, expected_size: int | None) -> None:
    """Refuse a complete transfer whose size is not the one the caller expected."""
    got = part.stat().st_size
    if expected_size is not None and got != expected_size:
        part.unlink()  # a wrong file must not be resumed or renamed into place
        raise DownloadError(
            f"could not download {url}: got {got:,} bytes but expected {expected_size:,}. The "
            f"file on the server changed or expected_size is wrong; the partial file was "
            f"deleted. Check the expected size (or pass expected_size=None) and run again.")


# ---------------------------------------------------------------------------------------------
# small helpers


def _parse_content_range(value: str) -> tuple[int | None, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); '*' -> None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (only the plain-seconds form), capped."""
    value = (headers.get("Retry-After") or "").strip() if headers else ""
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() else None


def _reason(err: BaseException) -> str:
    """A short human description of a low-level error."""
    reason = getattr(err, "reason", None) or err
    return str(reason) or type(reason).__name__


class _NoBar:
    """Stands in for tqdm when no progress bar is wanted."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool):
    """A tqdm bar in bytes that starts at `initial` (what a resume already has)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # imported here: only needed when a bar is shown

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                unit_divisor=1024, desc=name)


# ---------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files live on the Hugging Face Hub, and which ones validate."""

    repo: str  # Hugging Face dataset id
    filename: str  # file name in the repo; "{i:05d}" takes the shard index
    num_shards: int  # files 0 .. num_shards-1
    val_shards: tuple[int, ...]  # shards held out for validation, never trained on
    val_docs: int = 0  # > 0: one file holds both splits; its first val_docs documents validate
    note: str = ""  # what the data is, for people choosing one

    def file(self, i: int) -> str:
        return self.filename.format(i=i)

    def train_shards(self, n: int) -> list[int]:
        """The first `n` shard indices to train on (validation shards skipped)."""
        if n < 1:
            raise ValueError(f"num_train_shards must be at least 1, got {n}")
        if self.val_docs:
            return list(self.val_shards)  # one shared file: readers skip its first val_docs
        held_out = set(self.val_shards)
        shards = [i for i in range(self.num_shards) if i not in held_out]
        if n > len(shards):
            raise ValueError(f"{self.repo} has {len(shards)} training shards; "
                             f"num_train_shards={n} asks for more. Pass a smaller number.")
        return shards[:n]


DATASETS: dict[str, DatasetSpec] = {
    "climbmix": DatasetSpec(
        repo="karpathy/climbmix-400b-shuffle",
        filename="shard_{i:05d}.parquet",
        num_shards=6543,  # shard_00000 .. shard_06542
        val_shards=(6542,),  # the last shard, pinned for validation as upstream prepare.py does
        note="NVIDIA ClimbMix, shuffled: upstream autoresearch's web-text pretraining data. "
             "Parquet shards with a 'text' column.",
    ),
    "tinystories": DatasetSpec(
        repo="karpathy/tinystories-gpt4-clean",
        filename="tinystories_gpt4_clean.parquet",
        num_shards=1,  # a single ~640 MB file with a 'text' column and no split of its own
        val_shards=(0,),
        val_docs=10_000,  # so the first 10,000 stories validate and the rest train
        note="GPT-4 short stories for children, cleaned by Karpathy: narrow and low-entropy, "
             "so small models learn it well. One parquet file with a 'text' column.",
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The registry entry called `name`, or a ValueError that lists the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: known datasets are "
                         f"{', '.join(sorted(DATASETS))} (offline: the embedded "
                         f"'shakespeare' corpus needs no download)")
    return DATASETS[name]


def hf_base_url(base_url: str | None = None) -> str:
    """The server to download from: the argument, else $AUTORESEARCH_HF_BASE_URL, else HF."""
    return (base_url or os.environ.get(HF_BASE_ENV) or DEFAULT_HF_BASE).rstrip("/")


def hf_url(repo: str, filename: str, base_url: str | None = None) -> str:
    """The download address of one file of a Hugging Face dataset repo (main branch)."""
    return f"{hf_base_url(base_url)}/datasets/{repo}/resolve/main/{filename}"


def fetch_dataset(name: str, root: str | Path, *, num_train_shards: int = 2,
                  base_url: str | None = None,
                  progress: bool = True) -> tuple[list[Path], list[Path]]:
    """Download `num_train_shards` training shards and the validation shard(s) of `name`
    into `root/name/`; return (train_files, val_files). Files already there are kept.

    For TinyStories both lists hold the same single file: its first `val_docs` documents
    are the validation set (see DATASETS["tinystories"].val_docs).
    """
    spec = get_dataset(name)
    folder = Path(root) / name

    def fetch(i: int) -> Path:
        url = hf_url(spec.repo, spec.file(i), base_url)
        return download_file(url, folder / spec.file(i), progress=progress)

    train_files = [fetch(i) for i in spec.train_shards(num_train_shards)]
    val_files = [fetch(i) for i in spec.val_shards]
    return train_files, val_files


# ---------------------------------------------------------------------------------------------
# reading


def read_documents(path: str | Path) -> list[str]:
    """The documents in a file: the 'text' column of a .parquet, or a whole .txt as one."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet_texts(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    raise ValueError(f"{path}: can't read documents from a '{path.suffix}' file. Expected "
                     f".parquet (with a 'text' column) or .txt (one document per file).")


def _read_parquet_texts(path: Path) -> list[str]:
    """The non-null strings of a parquet file's 'text' column."""
    import pyarrow.parquet as pq  # imported here: downloading needs only the standard library

    columns = pq.read_schema(path).names
    if "text" not in columns:
        raise ValueError(f"{path} has no 'text' column (it has {columns}). This kit reads "
                         f"documents from a column called 'text'; rename yours to that.")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in texts if t is not None]


def auto_dataset() -> str:
    """TinyStories when Hugging Face answers, else the embedded corpus with a warning."""
    try:
        urllib.request.urlopen(urllib.request.Request(hf_base_url(), method="HEAD"), timeout=3)
        return "tinystories"
    except Exception:
        print("warning: offline, so the GPU preset trains on the embedded Shakespeare (5 MB). "
              "A GPU run of minutes sees it dozens of times over, so val_bpb measures memorisation "
              "more than research progress; the summary's `epochs:` line says how many times. For "
              "a meaningful offline baseline use preset='small-data' (sized for ~3 epochs).")
        return "shakespeare"
