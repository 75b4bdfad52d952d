"""A scripted stand-in for a vLLM server, for the sampler's failure paths.

The real engine covers what vLLM does; this covers what it might do on a
bad day (malformed streams, truncations, statuses, broken plugin replies),
deterministically and in milliseconds. Every request is recorded.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    #: Body parts, sent one HTTP chunk each (or raw, with ``chunked=False``).
    parts: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0
    #: False: no terminating chunk, the connection is closed (a cut stream).
    complete: bool = True
    #: Hold the connection open this long after the parts (a stalled server).
    hang: float = 0.0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    """SSE events (dicts become JSON) followed by ``data: [DONE]``."""
    out = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


def completion_events(
    token_ids: list[int],
    *,
    logprobs: list[float] | None = None,
    finish_reason: str | None = "length",
    prompt_token_ids: list[int] | None = None,
    metrics: dict[str, float] | None = None,
    usage: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A /v1/completions stream of one choice, one token per event."""
    events: list[dict[str, Any]] = []
    for i, t in enumerate(token_ids):
        choice: dict[str, Any] = {"index": 0, "text": f"<{t}>", "token_ids": [t], "finish_reason": None}
        if i == 0 and prompt_token_ids is not None:
            choice["prompt_token_ids"] = prompt_token_ids
        if logprobs is not None:
            choice["logprobs"] = {
                "text_offset": [i],
                "token_logprobs": [logprobs[i]],
                "tokens": [f"token_id:{t}"],
                "top_logprobs": [{f"token_id:{t}": logprobs[i]}],
            }
        if i == len(token_ids) - 1:
            choice["finish_reason"] = finish_reason
        events.append({"id": "cmpl-fake", "choices": [choice]})
    tail: dict[str, Any] = {"id": "cmpl-fake", "choices": []}
    if usage is not None:
        tail["usage"] = usage
    if metrics is not None:
        tail["metrics"] = metrics
    events.append(tail)
    return events


Handler = Callable[[Request], Reply]


class FakeVLLM:
    """``with FakeVLLM(handler) as server:`` serves ``handler(request)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with outer._lock:
                    outer.requests.append(req)
                reply = outer.handler(req)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("transfer-encoding", "chunked")
                if not reply.complete:
                    self.send_header("connection", "close")
                self.end_headers()
                try:
                    for p in reply.parts:
                        self.wfile.write(f"{len(p):x}\r\n".encode() + p + b"\r\n")
                        self.wfile.flush()
                        if reply.pause:
                            time.sleep(reply.pause)
                    if reply.hang:
                        time.sleep(reply.hang)
                    if reply.complete:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    else:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True

            do_GET = _serve
            do_POST = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def posts(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == path]

    def __enter__(self) -> FakeVLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(
        status=status, parts=[json.dumps(obj).encode()], headers={"content-type": "application/json"}
    )


def serve(handler: Handler) -> Iterator[FakeVLLM]:
    with FakeVLLM(handler) as server:
        yield server
