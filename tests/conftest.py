"""Shared fixtures: a private cache, quick settings and one trained quick run."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("AUTORESEARCH_QUICK", "1")  # every test sizes itself for a CPU in seconds


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache folder for tokenizers and token files, shared by the whole test session."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["AUTORESEARCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def quick_settings(cache):
    from autoresearch_lib.config import make_settings

    return make_settings("quick", cache_dir=str(cache))


@pytest.fixture(scope="session")
def prepared(quick_settings):
    from autoresearch_lib import data

    return data.prepare(quick_settings, verbose=False)


@pytest.fixture(scope="session")
def trained(cache, tmp_path_factory):
    """One real quick training run (a few seconds), reused by the tests that read its result."""
    import autoresearch_lib as ar

    run_dir = tmp_path_factory.mktemp("run")
    return ar.train(preset="quick", budget=4, run_dir=run_dir, cache_dir=str(cache))


class FakeLLM:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, for the agent tests.

    Every POST is recorded in `requests` (path, Authorization header, JSON body) and answered
    by `respond(n)`, n = 0, 1, ... the request's number: by default the next answer queued with
    `reply(...)` or `error(...)`. An answer is (status, dict) for JSON or (status, bytes) for a
    web page. Setting `hold` (an Event) delays every answer until it is set or 10 s pass: a
    server slower than the client's timeout.
    """

    def __init__(self):
        self.script, self.requests, self.hold = [], [], None
        self.respond = self._next_in_script
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                fake._answer(self)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    @staticmethod
    def completion(text: str, prompt_tokens: int = 100, completion_tokens: int = 20):
        """A chat-completion answer whose message is `text`."""
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
                     "choices": [choice], "usage": usage}

    def reply(self, text: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> None:
        self.script.append(self.completion(text, prompt_tokens, completion_tokens))

    def error(self, status: int, message: str) -> None:
        self.script.append((status, {"error": {"message": message, "type": "error", "code": status}}))

    def _next_in_script(self, n: int):
        return self.script.pop(0) if self.script else (400, {"error": {"message": "the test's script is empty"}})

    def _answer(self, handler) -> None:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        self.requests.append({"path": handler.path, "auth": handler.headers.get("Authorization"),
                              "body": json.loads(body)})
        if self.hold is not None:
            self.hold.wait(10)
        status, payload = self.respond(len(self.requests) - 1)
        html = isinstance(payload, bytes)
        data = payload if html else json.dumps(payload).encode()
        handler.send_response(status)
        for name, value in (("Content-Type", "text/html" if html else "application/json"),
                            ("Content-Length", str(len(data))),
                            ("retry-after-ms", "10")):  # keeps the client's retries fast
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def llm():
    """A FakeLLM for one test, shut down after it."""
    server = FakeLLM()
    yield server
    server.close()
