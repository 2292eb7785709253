"""A scripted OpenAI-compatible chat server on 127.0.0.1, for demos and tests.

It lets the LLM agent run end to end with no key and no network: the official `openai` client
talks HTTP to it exactly as it would to OpenAI, Ollama or vLLM, and it answers with replies you
wrote in advance.

    with FakeChatServer() as server:
        server.reply("double MATRIX_LR\\ntrain.py\\n<<<<<<< SEARCH\\n...")
        agent = OpenAIAgent(model="scripted", base_url=server.url, api_key="not-a-real-key")
        proposal = agent.propose(state)
        server.requests[0]["body"]["messages"]  # what the agent sent

Every POST is recorded in `requests` (path, Authorization header, JSON body) and answered by
`respond(n)`, n = 0, 1, ... the request's number: by default the next answer queued with
`reply(...)` or `error(...)`; an empty queue is answered with a 400 error that says so. An
answer is (status, dict) for JSON or (status, bytes) for a web page. Setting `hold` (a
threading.Event) delays every answer until it is set or 10 s pass: a server slower than the
client's timeout.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    """An OpenAI-compatible `/v1/chat/completions` endpoint that replays queued answers."""

    def __init__(self):
        self.script: list[tuple[int, object]] = []  # queued answers, first out first
        self.requests: list[dict] = []  # every request received: path, auth, body
        self.hold: threading.Event | None = None
        self.respond = self._next_in_script  # replace to answer by request number instead
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                fake._answer(self)

            def log_message(self, *args):  # no access log on stderr
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: any free port
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"  # the client's base_url
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self) -> "FakeChatServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FakeChatServer(url={self.url!r}, queued={len(self.script)}, requests={len(self.requests)})"

    @staticmethod
    def completion(text: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> tuple[int, dict]:
        """A chat-completion answer whose message is `text`, with made-up token counts."""
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
                     "choices": [choice], "usage": usage}

    def reply(self, text: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> None:
        """Queue a reply: the model's next answer will be `text`."""
        self.script.append(self.completion(text, prompt_tokens, completion_tokens))

    def error(self, status: int, message: str) -> None:
        """Queue an API error (429, 500, 401, ...) as OpenAI sends it."""
        self.script.append((status, {"error": {"message": message, "type": "error", "code": status}}))

    def messages(self, n: int = -1) -> list[dict]:
        """The chat messages of request n (default: the last one)."""
        return self.requests[n]["body"]["messages"]

    def _next_in_script(self, n: int) -> tuple[int, object]:
        if self.script:
            return self.script.pop(0)
        return 400, {"error": {"message": "FakeChatServer has no reply queued: call "
                                          "server.reply(text) before the agent asks."}}

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
        """Stop serving and free the port."""
        if self.hold is not None:
            self.hold.set()
        self.http.shutdown()
        self.http.server_close()
