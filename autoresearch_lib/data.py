"""Data: where the text comes from, the BPE tokenizer, and the BOS-aligned data loader.

    corpus (documents)  →  rustbpe trains a BPE  →  tiktoken encodes  →  token files (.npy)
                                                                    →  best-fit packed rows

Everything is cached under a key made of the corpus content and the vocabulary size, so
`prepare()` is idempotent and a changed corpus or vocabulary builds afresh.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import pickle
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .config import Settings, cache_dir

BOS = "<|bos|>"  # every document (and every packed row) starts with this special token
# GPT-4's pre-tokenizer split pattern, with numbers split into groups of 1-2 digits as in nanochat
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
DOC_CHARS = 2000  # passages are merged into documents of at most this many characters
CACHE_VERSION = 2  # bump when the on-disk format changes

# Whole works held out for validation: a tragedy, a comedy, a history and the poems.
VAL_WORKS = ("hamlet", "twelfth_night", "henry_v", "sonnets")


class DataError(ValueError):
    """A corpus that cannot be used, with what to do about it."""


# ----------------------------------------------------------------------------------------------
# corpus sources: each returns (train documents, validation documents)


def corpus_dir() -> Path:
    """The embedded Shakespeare texts: data/shakespeare in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "data" / "shakespeare"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("autoresearch_lib") / "corpus" / "shakespeare"))


def read_text(path: Path) -> str:
    """One UTF-8 text file, or a DataError that says what is wrong with it."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: give a text file with some writing in it.")
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (it contains NUL bytes): give a plain .txt file.")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}). "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`."
        ) from None


def text_files(path: str | Path) -> list[Path]:
    """A .txt file, or every .txt/.md file under a folder (sorted, so splits are stable)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if files:
            return files
        raise DataError(f"{path} holds no .txt or .md files: put your text in .txt files there.")
    raise DataError(f"{path} does not exist: give the path of a .txt file or of a folder of them.")


def split_documents(docs: list[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Hold out the last whole documents (at least one) for validation."""
    if len(docs) < 2:
        raise DataError(
            "the text has too few passages to hold some out for validation: give more text, "
            "or a separate validation file (val_text=...)."
        )
    n_val = max(1, round(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


def passages(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut a long text into documents: blank-line passages merged up to `max_chars`."""
    docs, current = [], ""
    for part in re.split(r"\n\s*\n", text):
        part = part.strip("\n")
        if not part.strip():
            continue
        if current and len(current) + len(part) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{part}" if current else part
    if current:
        docs.append(current)
    return docs


def auto_dataset() -> str:
    """TinyStories when Hugging Face answers, else the embedded corpus with a warning."""
    import urllib.request

    from .download import hf_base_url

    try:
        urllib.request.urlopen(urllib.request.Request(hf_base_url(), method="HEAD"), timeout=3)
        return "tinystories"
    except Exception:
        print("warning: offline, so the GPU preset trains on the embedded Shakespeare (5 MB). "
              "A GPU run of minutes sees it dozens of times over, so val_bpb measures memorisation "
              "more than research progress; the summary's `epochs:` line says how many times. For "
              "a meaningful offline baseline use preset='small-data' (sized for ~3 epochs).")
        return "shakespeare"


def load_corpus(settings: Settings) -> tuple[list[str], list[str]]:
    """Train and validation documents for the dataset the settings name."""
    if settings.dataset == "shakespeare":
        works = {p.stem: read_text(p) for p in sorted(corpus_dir().glob("*.txt"))}
        if not works:
            raise DataError(f"the embedded corpus is missing from {corpus_dir()}: reinstall the kit.")
        train = [d for name, t in works.items() if name not in VAL_WORKS for d in passages(t)]
        val = [d for name, t in works.items() if name in VAL_WORKS for d in passages(t)]
        return train, val
    if settings.dataset == "text":
        if not settings.text:
            raise DataError("dataset 'text' needs a path: prepare(text='my_corpus.txt').")
        train_files = text_files(settings.text)
        if settings.val_text:
            val_files = text_files(settings.val_text)
        elif len(train_files) > 1:  # hold out whole files
            train_files, val_files = split_documents(train_files)
        else:  # one file: hold out its last passages
            return split_documents(passages(read_text(train_files[0])))
        return ([d for f in train_files for d in passages(read_text(f))],
                [d for f in val_files for d in passages(read_text(f))])
    if settings.dataset in ("tinystories", "climbmix"):
        from . import download

        root = cache_dir(settings) / "downloads"
        train_files, val_files = download.fetch_dataset(settings.dataset, root)
        val_docs = download.get_dataset(settings.dataset).val_docs
        if val_docs:  # one file holds both splits: its first val_docs documents validate
            docs = download.read_documents(train_files[0])
            return docs[val_docs:], docs[:val_docs]
        return ([d for f in train_files for d in download.read_documents(f)],
                [d for f in val_files for d in download.read_documents(f)])
    raise DataError(
        f"unknown dataset {settings.dataset!r}: use 'shakespeare', 'text', 'tinystories' or 'climbmix'."
    )


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    """Train a byte-level BPE with rustbpe and wrap it as a tiktoken Encoding with a BOS token."""
    import rustbpe
    import tiktoken

    if vocab_size < 257:
        raise DataError(f"vocab_size={vocab_size} is too small: it needs 256 bytes + BOS at least.")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(docs), vocab_size - 1, pattern=SPLIT_PATTERN)  # -1: room for BOS
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    return make_encoding(ranks, trainer.get_pattern())


def make_encoding(ranks: dict[bytes, int], pattern: str):
    import tiktoken

    return tiktoken.Encoding(
        name="autoresearch", pat_str=pattern, mergeable_ranks=ranks,
        special_tokens={BOS: len(ranks)},
    )


def token_byte_lengths(enc) -> np.ndarray:
    """How many UTF-8 bytes each token stands for (0 for special tokens): the bpb denominator."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int32)
    for token_bytes, rank in enc._mergeable_ranks.items():
        lengths[rank] = len(token_bytes)
    return lengths


@dataclass
class Prepared:
    """What prepare() made: a tokenizer and token files, with a few statistics."""

    dir: Path  # the cache folder holding everything below
    vocab_size: int
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    train_docs: int
    val_docs: int
    expected_fingerprint: dict = field(default_factory=dict, repr=False)  # as recorded by prepare

    @property
    def bytes_per_token(self) -> float:
        return self.train_bytes / max(1, self.train_tokens)

    def tokenizer(self):
        """The tiktoken Encoding (BOS id = vocab_size - 1)."""
        ranks, pattern = pickle.loads((self.dir / "tokenizer.pkl").read_bytes())
        return make_encoding(ranks, pattern)

    def tokens(self, split: str) -> np.ndarray:
        """All tokens of a split, each document starting with BOS (memory-mapped)."""
        return np.load(self.dir / f"{split}.npy", mmap_mode="r")

    def token_bytes(self) -> np.ndarray:
        return np.load(self.dir / "token_bytes.npy")

    def fingerprint(self) -> dict:
        """sha256 of the files the metric depends on: validation tokens, tokenizer, byte table."""
        return {name: hashlib.sha256((self.dir / name).read_bytes()).hexdigest()
                for name in FINGERPRINTED}

    def verify(self, expected: dict) -> None:
        """Raise DataError if the metric's files differ from `expected` (a fingerprint)."""
        changed = [name for name, digest in self.fingerprint().items() if expected.get(name) != digest]
        if changed:
            raise DataError(f"the fixed evaluation data changed ({', '.join(changed)} in {self.dir}): "
                            "val_bpb would not be comparable. Delete that folder and prepare again.")


FINGERPRINTED = ("val.npy", "tokenizer.pkl", "token_bytes.npy")


def corpus_key(train: list[str], val: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{vocab_size}|{SPLIT_PATTERN}|{DOC_CHARS}".encode())
    for split in (train, val):
        h.update(b"\x01split")
        for doc in split:
            h.update(doc.encode())
            h.update(b"\x00")
    return h.hexdigest()[:16]


def encode_docs(enc, docs: list[str]) -> np.ndarray:
    """Encode documents, each prefixed with BOS, into one flat uint16/uint32 array."""
    bos = enc.n_vocab - 1
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    ids = enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    flat = [bos]
    for doc in ids:
        flat.extend(doc)
        flat.append(bos)
    return np.asarray(flat[:-1], dtype=dtype)


def save_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def prepare(settings: Settings, verbose: bool = True) -> Prepared:
    """Load the corpus, train (or reuse) the tokenizer and write the token files. Idempotent."""
    train, val = load_corpus(settings)
    if not train or not val:
        raise DataError("the corpus has no training or no validation text after splitting.")
    key = corpus_key(train, val, settings.vocab_size)
    out = cache_dir(settings) / f"{settings.dataset}-{settings.vocab_size}-{key}"
    manifest = out / "manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        return Prepared(dir=out, expected_fingerprint=info.pop("fingerprint", {}), **info)
    out.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"prepare: training a {settings.vocab_size}-token BPE on {len(train):,} documents ...")
    enc = train_tokenizer(train, settings.vocab_size)
    ranks = enc._mergeable_ranks
    save_atomic(out / "tokenizer.pkl", lambda p: p.write_bytes(pickle.dumps((ranks, enc._pat_str))))
    save_atomic(out / "token_bytes.npy", lambda p: np.save(open(p, "wb"), token_byte_lengths(enc)))
    stats = {}
    for split, docs in (("train", train), ("val", val)):
        arr = encode_docs(enc, docs)
        save_atomic(out / f"{split}.npy", lambda p: np.save(open(p, "wb"), arr))
        stats[f"{split}_tokens"] = int(len(arr))
        stats[f"{split}_bytes"] = sum(len(d.encode()) for d in docs)
        stats[f"{split}_docs"] = len(docs)
    info = dict(vocab_size=enc.n_vocab, **stats)
    prepared = Prepared(dir=out, **info)
    prepared.expected_fingerprint = info["fingerprint"] = prepared.fingerprint()
    save_atomic(manifest, lambda p: p.write_text(json.dumps(info, indent=2)))  # written last
    if verbose:
        print(f"prepare: {info['train_tokens']:,} train / {info['val_tokens']:,} val tokens in {out}")
    return prepared


# ----------------------------------------------------------------------------------------------
# data loader: BOS-aligned best-fit packing


def document_spans(tokens: np.ndarray, bos: int) -> list[tuple[int, int]]:
    """(start, end) of every document in a flat token array (each starts with BOS)."""
    starts = np.flatnonzero(tokens == bos).tolist()
    ends = starts[1:] + [len(tokens)]
    return list(zip(starts, ends))


class PackedRows:
    """Rows of exactly `row_len` tokens, each starting with BOS, no padding, as upstream.

    Best-fit packing: each row is filled by repeatedly taking the longest buffered document that
    still fits. When none fits, the shortest one is cropped to fill the row exactly; unlike
    upstream (which has data to spare) the cropped rest goes back to the buffer as a new document
    behind a fresh BOS, so a small corpus loses nothing.
    """

    def __init__(self, tokens: np.ndarray, bos: int, row_len: int, shuffle: bool = True,
                 seed: int = 0, buffer_docs: int = 1000):
        self.tokens, self.bos, self.row_len = tokens, bos, row_len
        self.spans = document_spans(tokens, bos)
        self.shuffle, self.rng, self.buffer_docs = shuffle, random.Random(seed), buffer_docs
        self.epoch, self.order, self.cursor = 0, [], 0
        self.lengths, self.items = [], []  # the buffer, sorted by length: parallel lists

    def _next_doc(self) -> np.ndarray:
        if self.cursor >= len(self.order):  # start a new pass over the data
            self.epoch += 1
            self.order = list(range(len(self.spans)))
            if self.shuffle:
                self.rng.shuffle(self.order)
            self.cursor = 0
        start, end = self.spans[self.order[self.cursor]]
        self.cursor += 1
        return self.tokens[start:end]

    def _push(self, doc: np.ndarray) -> None:
        i = bisect.bisect(self.lengths, len(doc))
        self.lengths.insert(i, len(doc))
        self.items.insert(i, doc)

    def _pop(self, i: int) -> np.ndarray:
        self.lengths.pop(i)
        return self.items.pop(i)

    def fill(self, row: np.ndarray) -> None:
        """Pack one row in place."""
        pos = 0
        while pos < self.row_len:
            while len(self.items) < self.buffer_docs:
                self._push(self._next_doc())
            space = self.row_len - pos
            i = bisect.bisect(self.lengths, space) - 1  # the longest document that fits
            if i >= 0:
                doc = self._pop(i)
            else:  # nothing fits: crop the shortest and keep its rest for later
                doc = self._pop(0)
                rest = np.concatenate(([self.bos], doc[space:])).astype(doc.dtype)
                doc = doc[:space]
                if len(rest) > 1:
                    self._push(rest)
            row[pos:pos + len(doc)] = doc
            pos += len(doc)


def make_dataloader(tokens: np.ndarray, bos: int, batch_size: int, seq_len: int, device="cpu",
                    shuffle: bool = True, seed: int = 0):
    """Yield (inputs, targets, epoch) batches of shape (batch_size, seq_len) forever."""
    import torch

    rows = PackedRows(tokens, bos, seq_len + 1, shuffle=shuffle, seed=seed)
    pin = torch.device(device).type == "cuda"
    while True:
        batch = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for b in range(batch_size):
            rows.fill(batch[b])
        t = torch.from_numpy(batch)
        if pin:
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
        yield t[:, :-1], t[:, 1:], rows.epoch
