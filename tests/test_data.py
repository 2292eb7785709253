"""prepare: corpus sources, the tokenizer and its cache, the BOS-aligned loader."""

import numpy as np
import pytest

from autoresearch_lib import data
from autoresearch_lib.config import make_settings


def test_embedded_corpus_holds_out_whole_works(quick_settings):
    files = {p.stem for p in data.corpus_dir().glob("*.txt")}
    assert len(files) == 42 and set(data.VAL_WORKS) <= files
    train, val = data.load_corpus(quick_settings)
    hamlet_line = "To be, or not to be,--that is the question:--"
    assert any(hamlet_line in d for d in val)
    assert not any(hamlet_line in d for d in train)


def test_tokenizer_round_trip_and_bos(prepared):
    enc = prepared.tokenizer()
    for text in ["To be, or not to be: that is the question.", "Ünïcödé — 日本語 🎭\n\n  tabs\t!"]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.n_vocab == prepared.vocab_size == 512
    assert enc.encode(data.BOS, allowed_special="all") == [prepared.vocab_size - 1]


def test_token_bytes_table(prepared):
    enc, lengths = prepared.tokenizer(), prepared.token_bytes()
    assert lengths[prepared.vocab_size - 1] == 0  # BOS stands for no bytes
    assert (lengths[:256] == 1).all()
    for tok in range(256, prepared.vocab_size - 1, 37):
        assert lengths[tok] == len(enc.decode_single_token_bytes(tok))
    # every document's tokens add up to its bytes
    tokens = prepared.tokens("val")
    assert lengths[tokens].sum() == prepared.val_bytes


def test_cache_is_reused_and_invalidated(tmp_path, cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Passage {i}: the quick brown fox jumps." for i in range(200)))
    settings = make_settings("quick", text=str(corpus), cache_dir=str(tmp_path / "c"))
    first = data.prepare(settings, verbose=False)
    mtime = (first.dir / "tokenizer.pkl").stat().st_mtime_ns
    again = data.prepare(settings, verbose=False)
    assert again.dir == first.dir and (again.dir / "tokenizer.pkl").stat().st_mtime_ns == mtime
    settings.vocab_size = 300
    assert data.prepare(settings, verbose=False).dir != first.dir
    corpus.write_text(corpus.read_text() + "\n\nA new passage changes everything.")
    settings.vocab_size = 512
    assert data.prepare(settings, verbose=False).dir != first.dir


def test_own_text_file_folder_and_validation(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(10):
        (folder / f"book{i}.txt").write_text(f"Book {i}.\n\n" + "Some words here. " * 50)
    train, val = data.load_corpus(make_settings("quick", text=str(folder)))
    assert any("Book 9." in d for d in val) and not any("Book 9." in d for d in train)
    val_file = tmp_path / "val.txt"
    val_file.write_text("Held out.\n\nEntirely.")
    train, val = data.load_corpus(make_settings("quick", text=str(folder), val_text=str(val_file)))
    assert val == ["Held out.\n\nEntirely."] and len(train) == 10


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"   \n\n ", "empty"),
    (b"\x00\x01\x02binary\x00" * 10, "binary"),
    ("caf\u00e9 au lait".encode("latin-1") * 10, "not UTF-8"),
])
def test_bad_text_gives_a_clear_error(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.load_corpus(make_settings("quick", text=str(bad)))


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_corpus(make_settings("quick", text=str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no .txt"):
        data.load_corpus(make_settings("quick", text=str(tmp_path / "empty")))
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_corpus(make_settings("quick", dataset="wikipedia"))


def test_packed_rows_start_with_bos_and_lose_nothing():
    bos, rng = 65000, np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=300)
    values = iter(range(1, int(lengths.sum()) + 1))  # every content token is unique
    docs = [[bos] + [next(values) for _ in range(n)] for n in lengths]
    tokens = np.asarray([t for d in docs for t in d], dtype=np.uint16)
    rows = data.PackedRows(tokens, bos, row_len=17, shuffle=True, seed=3, buffer_docs=8)
    counts, row = np.zeros(65536, dtype=np.int64), np.empty(17, dtype=np.int64)
    while rows.epoch < 5:  # long documents may wait in the buffer a while, so give it passes
        rows.fill(row)
        assert row[0] == bos  # BOS-aligned, and exactly full: there is no padding token
        counts[row[row != bos]] += 1
    content = counts[1:lengths.sum() + 1]
    assert content.min() >= 1  # the whole first pass arrived: cropped rests are not thrown away
    assert content.max() <= 5  # and nothing is duplicated within a pass


def test_dataloader_batches(prepared):
    loader = data.make_dataloader(prepared.tokens("train"), prepared.vocab_size - 1, 4, 32, seed=1)
    x, y, epoch = next(loader)
    assert x.shape == y.shape == (4, 32) and epoch == 1
    assert (x[:, 0] == prepared.vocab_size - 1).all()
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
    assert int(x.max()) < prepared.vocab_size
    again = data.make_dataloader(prepared.tokens("train"), prepared.vocab_size - 1, 4, 32, seed=1)
    assert (next(again)[0] == x).all()  # seeded: reproducible


def test_a_loop_reads_and_hashes_the_corpus_once_not_per_experiment(tmp_path, monkeypatch):
    """The runner prepares the data before every experiment; after the first time in a process
    that is a dictionary lookup, not a corpus read (a full parquet read for big datasets)."""
    from autoresearch_lib.runner import run_training

    reads = []
    real = data.load_corpus
    monkeypatch.setattr(data, "load_corpus", lambda s: reads.append(s.dataset) or real(s))
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Passage {i}: a few words about nothing much." for i in range(300)))
    settings = make_settings("quick", text=str(text), cache_dir=str(tmp_path / "cache"))
    for i in range(3):  # three quick "experiments" (each exits at once: preparing is the point)
        result = run_training("raise SystemExit(3)\n", settings, tmp_path / f"run{i}")
        assert result.status == "crash"
    assert reads == ["text"]
    text.write_text(text.read_text() + "\n\nOne more passage, so the corpus changed.")
    data.prepare(settings, verbose=False)
    assert reads == ["text", "text"]  # a changed corpus is read again
