"""Tests for autoresearch_lib.download against a real HTTP server on 127.0.0.1.

The server (a ThreadingHTTPServer in a thread) serves bytes the tests make, honours Range
requests, and can be scripted per path to misbehave: cut a transfer off, answer 500 / 429 /
404, ignore Range, or stall past the client's timeout. No network beyond localhost.
"""

from __future__ import annotations

import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch_lib.download import (
    DATASETS,
    HF_BASE_ENV,
    DownloadError,
    download_file,
    fetch_dataset,
    read_documents,
)

FAST = dict(backoff=0.01, timeout=5)  # retries in milliseconds, not seconds


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files; each request first consumes the next action of its path's plan."""

    def do_GET(self):
        hub = self.server.hub
        hub.requests.append((self.path, self.headers.get("Range")))
        plan = hub.plans.get(self.path)
        action = plan.pop(0) if plan else "ok"
        body = hub.files.get(self.path)
        if action == "stall":
            time.sleep(0.5)  # longer than the client's timeout in the test that asks for it
        if body is None or action == "404":
            return self._empty(404)
        if action in ("500", "429"):
            return self._empty(int(action))
        self._send_body(body, action)

    def _send_body(self, body: bytes, action: str):
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and action != "norange" else None
        if start is not None and start >= len(body):
            return self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
        payload = body[start or 0:]
        self.send_response(206 if start is not None else 200)
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = int(action.split(":")[1]) if action.startswith("cut:") else len(payload)
        self.wfile.write(payload[:cut])  # then the connection closes (HTTP/1.0): cut off

    def _empty(self, code: int, headers: dict | None = None):
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep pytest output clean
        pass


class FakeHub:
    """A local stand-in for huggingface.co: files, a per-path plan of faults, a request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.hub = self
        self.httpd.handle_error = lambda request, address: None  # a stalled client hung up
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes, plan=()) -> str:
        self.files[path] = data
        self.plans[path] = list(plan)
        return self.base + path


@pytest.fixture
def hub():
    hub = FakeHub()
    thread = threading.Thread(target=hub.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield hub
    hub.httpd.shutdown()
    hub.httpd.server_close()


@pytest.fixture
def blob():
    return random.Random(0).randbytes(50_000)


def _part(dest):
    return dest.with_suffix(dest.suffix + ".part")


# ---------------------------------------------------------------------------------------------
# download_file


def test_full_download(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob)
    dest = download_file(url, tmp_path / "sub" / "f.bin", **FAST)
    assert dest.read_bytes() == blob
    assert not _part(dest).exists()
    assert hub.requests == [("/f.bin", None)]


def test_resume_after_cut_off_transfer(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["cut:20000"])
    dest = download_file(url, tmp_path / "f.bin", retries=2, **FAST)
    assert dest.read_bytes() == blob
    assert hub.requests == [("/f.bin", None), ("/f.bin", "bytes=20000-")]


def test_part_file_is_kept_so_the_next_run_resumes(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["cut:10000", "cut:10000"])
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError):
        download_file(url, dest, retries=1, **FAST)
    assert not dest.exists()
    assert _part(dest).stat().st_size == 20_000
    download_file(url, dest, **FAST)
    assert dest.read_bytes() == blob
    assert hub.requests[-1] == ("/f.bin", "bytes=20000-")


def test_retries_after_500_and_429(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["500", "429", "500"])
    dest = download_file(url, tmp_path / "f.bin", retries=5, **FAST)
    assert dest.read_bytes() == blob
    assert len(hub.requests) == 4


def test_timeout_is_retried(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["stall"])
    dest = download_file(url, tmp_path / "f.bin", retries=2, backoff=0.01, timeout=0.2)
    assert dest.read_bytes() == blob


def test_gives_up_after_the_last_retry(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["500"] * 10)
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, retries=2, **FAST)
    message = str(info.value)
    assert url in message and "500" in message and "shakespeare" in message
    assert len(hub.requests) == 3
    assert not dest.exists() and not _part(dest).exists()


def test_404_is_not_retried(hub, tmp_path):
    url = hub.base + "/missing.parquet"
    dest = tmp_path / "missing.parquet"
    start = time.perf_counter()
    with pytest.raises(DownloadError, match=re.escape(url)) as info:
        download_file(url, dest, retries=5, backoff=1.0)  # retrying would take 31 s
    assert time.perf_counter() - start < 1.0
    assert "404" in str(info.value) and issubclass(DownloadError, RuntimeError)
    assert len(hub.requests) == 1
    assert not dest.exists() and not _part(dest).exists()


def test_server_that_ignores_range_restarts_from_zero(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob, plan=["norange"])
    dest = tmp_path / "f.bin"
    _part(dest).write_bytes(b"stale bytes that must not survive")
    download_file(url, dest, **FAST)
    assert dest.read_bytes() == blob
    assert hub.requests[0][1] == "bytes=33-"  # it asked to resume, got a 200, started over


def test_complete_part_file_is_finished_without_refetching(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob)
    dest = tmp_path / "f.bin"
    _part(dest).write_bytes(blob)  # e.g. killed between the last byte and the rename
    download_file(url, dest, **FAST)  # the server answers 416: nothing left to send
    assert dest.read_bytes() == blob and not _part(dest).exists()


def test_size_mismatch_raises_and_leaves_nothing(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob)
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="expected 50,001"):
        download_file(url, dest, expected_size=len(blob) + 1, **FAST)
    assert not dest.exists() and not _part(dest).exists()


def test_existing_file_is_not_downloaded_again(hub, blob, tmp_path):
    url = hub.add("/f.bin", blob)
    dest = tmp_path / "f.bin"
    dest.write_bytes(blob)
    download_file(url, dest, **FAST)
    download_file(url, dest, expected_size=len(blob), **FAST)
    assert hub.requests == []
    dest.write_bytes(b"truncated")  # the wrong size for what the caller expects: fetch again
    download_file(url, dest, expected_size=len(blob), **FAST)
    assert dest.read_bytes() == blob and len(hub.requests) == 1


def test_progress_bar_runs(hub, blob, tmp_path, capsys):
    url = hub.add("/f.bin", blob)
    download_file(url, tmp_path / "f.bin", progress=True, **FAST)
    assert "f.bin" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# datasets


def _parquet_bytes(tmp_path, texts) -> bytes:
    path = tmp_path / "made.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    return path.read_bytes()


def test_climbmix_registry_matches_upstream():
    spec = DATASETS["climbmix"]
    assert spec.file(spec.val_shards[0]) == "shard_06542.parquet"
    assert spec.train_shards(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="6542 training shards"):
        spec.train_shards(6543)


def test_fetch_climbmix_from_local_server(hub, tmp_path):
    shards = {0: ["a cat", "sat"], 1: ["on a mat"], 6542: ["held out", "for validation"]}
    prefix = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
    for i, texts in shards.items():
        hub.add(f"{prefix}shard_{i:05d}.parquet", _parquet_bytes(tmp_path, texts))
    root = tmp_path / "cache"
    train, val = fetch_dataset("climbmix", root, num_train_shards=2, base_url=hub.base,
                               progress=False)
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.parent for p in train + val] == [root / "climbmix"] * 3
    assert [read_documents(p) for p in train] == [shards[0], shards[1]]
    assert read_documents(val[0]) == shards[6542]


def test_fetch_tinystories_through_the_env_override(hub, tmp_path, monkeypatch):
    stories = [f"Once upon a time there was story {i}." for i in range(5)]
    hub.add("/datasets/karpathy/tinystories-gpt4-clean/resolve/main/"
            "tinystories_gpt4_clean.parquet", _parquet_bytes(tmp_path, stories))
    monkeypatch.setenv(HF_BASE_ENV, hub.base + "/")
    train, val = fetch_dataset("tinystories", tmp_path / "cache", progress=False)
    assert train == val  # one file: its first val_docs stories are the validation set
    assert read_documents(train[0]) == stories
    assert len(hub.requests) == 1  # the second lookup found the file already there


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="climbmix, tinystories"):
        fetch_dataset("wikitext", tmp_path)


def test_read_documents_txt_and_bad_inputs(tmp_path):
    txt = tmp_path / "story.txt"
    txt.write_text("one whole document\nwith two lines", encoding="utf-8")
    assert read_documents(txt) == ["one whole document\nwith two lines"]
    no_text = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_text)
    with pytest.raises(ValueError, match="no 'text' column"):
        read_documents(no_text)
    with pytest.raises(ValueError, match="'.csv'"):
        read_documents(tmp_path / "data.csv")
