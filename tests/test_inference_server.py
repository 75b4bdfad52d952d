"""The OpenAI-compatible endpoint's HTTP layer (``OpenAIServer``), driven by
httpx, raw sockets and the ``openai`` package.

The server stands in front of a stand-in for the *client* here (answers of
the client's shape, errors on demand), so that each HTTP behaviour is shown
alone: errors and their statuses, authentication, limits, keep-alive, the
session header, the SSE shape and the pass-through of unknown fields. The
real client against a real engine is in test_inference_server_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import pytest
from _require import require

from rollstream import RequestRejectedError, SamplingRequestError
from rollstream._exceptions import DeploymentSamplerTimeoutError, EngineUnavailableError
from rollstream.inference import fetch_session
from rollstream.inference._server import OpenAIServer, ServerThread, Turn
from rollstream.streams import WeightVersionSpan

MODEL = "stand-in-model"
SESSIONS = "/rollstream/sessions"
CHAT = [{"role": "user", "content": "hi"}]
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"q": "sea"}'},
}


class StandInClient:
    """Answers shaped like ``InferenceEngineClient``'s: OpenAI objects with
    ``prompt_token_ids`` and per choice ``token_ids``, ``token_logprobs``,
    ``weight_versions``. ``error`` is raised instead of answering; ``delay``
    seconds pass before an answer; ``token_logprobs`` are every choice's
    (None: the request asked for none)."""

    model_name = MODEL

    def __init__(
        self,
        *,
        error: BaseException | None = None,
        delay: float = 0.0,
        token_logprobs: tuple[float, ...] | None = (-0.5, -0.25, -0.125),
    ) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.error = error
        self.delay = delay
        self.token_logprobs = None if token_logprobs is None else list(token_logprobs)
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.torn_down = False

    async def _wait(self, payload: dict[str, Any]) -> int:
        self.payloads.append(payload)
        self.started.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.error is not None:
            raise self.error
        return int(payload.get("n") or 1)

    def _extras(self, i: int) -> dict[str, Any]:
        return {
            "token_ids": [10 + i, 11, 12],
            "token_logprobs": self.token_logprobs,
            "weight_versions": [["v1", 0, 2], ["v2", 2, 3]],
        }

    async def chat_completion(self, payload: dict[str, Any]) -> dict[str, Any]:
        n = await self._wait(payload)
        choices = []
        for i in range(n):
            if payload.get("tools"):
                message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
                finish = "tool_calls"
            else:
                message, finish = {"role": "assistant", "content": f"hello {i}"}, "stop"
            choices.append(
                {"index": i, "message": message, "finish_reason": finish, "logprobs": None, **self._extras(i)}
            )
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": choices,
            "usage": {"prompt_tokens": 4, "completion_tokens": 3 * n, "total_tokens": 4 + 3 * n},
            "prompt_token_ids": [1, 2, 3, 4],
        }

    async def completion(self, payload: dict[str, Any]) -> dict[str, Any]:
        n = await self._wait(payload)
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [
                {
                    "index": i,
                    "text": f" world {i}",
                    "finish_reason": "length",
                    "logprobs": None,
                    "prompt_token_ids": [5, 6],
                    **self._extras(i),
                }
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3 * n, "total_tokens": 2 + 3 * n},
            "prompt_token_ids": [5, 6],
        }

    async def teardown(self) -> None:
        self.torn_down = True


def openai_module() -> Any:
    return require("openai", "to drive the endpoint as agent harnesses do")


def openai_client(url: str, api_key: str = "unused") -> Any:
    return openai_module().OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30.0)


@pytest.fixture
def stand_in() -> StandInClient:
    return StandInClient()


@pytest.fixture
def served(stand_in: StandInClient) -> Iterator[ServerThread]:
    with OpenAIServer(stand_in).serve_in_thread() as thread:
        yield thread


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30.0, **kw)


def exchange(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (Content-Length framed) from a socket file."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


# -- the openai client ---------------------------------------------------------------------------


def test_chat_completion_records_the_turn_and_passes_unknown_fields(
    served: ServerThread, stand_in: StandInClient
) -> None:
    client = openai_client(served.url)
    vendor = {"repetition_penalty": 1.1, "vendor_field": {"nested": [1, 2]}, "priority": 3}
    out = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=3,
        extra_headers={"X-Session-ID": "episode-1"},
        extra_body=vendor,
    )
    assert out.choices[0].message.content == "hello 0"
    assert out.choices[0].finish_reason == "stop"
    assert out.to_dict()["choices"][0]["token_ids"] == [10, 11, 12]

    (payload,) = stand_in.payloads
    for key, value in vendor.items():
        assert payload[key] == value
    assert payload["session_id"] == "episode-1"
    assert payload["messages"] == CHAT
    assert "stream" not in payload

    (turn,) = served.server.session_turns("episode-1")
    assert turn.prompt_ids.tolist() == [1, 2, 3, 4]
    assert turn.response_ids.tolist() == [10, 11, 12]
    assert turn.logprobs is not None
    assert turn.logprobs.tolist() == [-0.5, -0.25, -0.125]
    assert turn.weight_versions == (WeightVersionSpan("v1", 0, 2), WeightVersionSpan("v2", 2, 3))
    assert (turn.finish_reason, turn.endpoint, turn.index, turn.response_id) == (
        "stop",
        "chat.completions",
        0,
        "chatcmpl-1",
    )


def test_completion_with_n_records_one_turn_per_choice(served: ServerThread) -> None:
    client = openai_client(served.url)
    out = client.completions.create(
        model=MODEL, prompt="hello", n=2, max_tokens=3, extra_headers={"X-Session-ID": "s"}
    )
    assert [c.text for c in out.choices] == [" world 0", " world 1"]
    turns = served.server.session_turns("s")
    assert [(t.endpoint, t.index, t.response_ids.tolist()[0]) for t in turns] == [
        ("completions", 0, 10),
        ("completions", 1, 11),
    ]
    assert all(t.prompt_ids.tolist() == [5, 6] for t in turns)


def test_streaming_chat_through_the_openai_client(served: ServerThread, stand_in: StandInClient) -> None:
    client = openai_client(served.url)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-ID": "streamed"},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello 0"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    (payload,) = stand_in.payloads
    assert "stream" not in payload
    assert "stream_options" not in payload
    assert len(served.server.session_turns("streamed")) == 1


def test_streaming_completion_through_the_openai_client(served: ServerThread) -> None:
    client = openai_client(served.url)
    chunks = list(client.completions.create(model=MODEL, prompt="hello", n=2, stream=True))
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        assert c.object == "text_completion"
        for choice in c.choices:
            text[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert text == {0: " world 0", 1: " world 1"}
    assert finish == {0: "length", 1: "length"}
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_streamed_tool_calls_carry_their_index(served: ServerThread) -> None:
    client = openai_client(served.url)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, tools=tools, stream=True))
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert [(call.index, call.id, call.function.name, call.function.arguments) for call in calls] == [
        (0, "call_1", "lookup", '{"q": "sea"}')
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_sse_wire_format(served: ServerThread) -> None:
    r = post(
        served.url,
        "/v1/chat/completions",
        {"model": MODEL, "messages": CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = r.text.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    # One content chunk per choice, one finish chunk per choice, the usage chunk.
    assert [(c["choices"][0]["index"] if c["choices"] else None) for c in chunks] == [0, 1, 0, 1, None]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:2]] == ["hello 0", "hello 1"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[2:4]] == ["stop", "stop"]
    assert chunks[0]["choices"][0]["token_ids"] == [10, 11, 12]
    assert chunks[0]["prompt_token_ids"] == [1, 2, 3, 4]
    assert chunks[-1]["usage"]["total_tokens"] == 10
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}


def test_models_list_and_retrieve(served: ServerThread) -> None:
    openai = openai_module()
    client = openai_client(served.url)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other-model")
    assert e.value.code == "model_not_found"


def test_another_model_is_model_not_found(served: ServerThread, stand_in: StandInClient) -> None:
    openai = openai_module()
    with pytest.raises(openai.NotFoundError) as e:
        openai_client(served.url).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert e.value.param == "model"
    assert "gpt-4o" in e.value.message
    assert MODEL in e.value.message
    assert stand_in.payloads == []


def test_a_request_without_model_gets_the_served_name(served: ServerThread, stand_in: StandInClient) -> None:
    assert post(served.url, "/v1/completions", {"prompt": "x"}).status_code == 200
    assert stand_in.payloads[0]["model"] == MODEL


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind", "text"),
    [
        (ValueError("'max_tokens' must be a positive integer, got 0"), 400, "BadRequestError", "max_tokens"),
        (
            RequestRejectedError("rejected", status=422, server_message="prompt is 5000 tokens, limit 2048"),
            422,
            "UnprocessableEntityError",
            "prompt is 5000 tokens",
        ),
        (
            RequestRejectedError("rejected", status=None, server_message="bad"),
            400,
            "BadRequestError",
            "bad",
        ),
        (
            EngineUnavailableError("no engine left: all 2 were taken out"),
            503,
            "InternalServerError",
            "no engine",
        ),
        (SamplingRequestError("engine http://e:1 failed: HTTP 500"), 502, "InternalServerError", "HTTP 500"),
        (DeploymentSamplerTimeoutError("no token within 60 s"), 504, "InternalServerError", "60 s"),
        (RuntimeError("a bug"), 500, "InternalServerError", "RuntimeError: a bug"),
    ],
)
def test_client_errors_become_openai_errors(error: BaseException, status: int, kind: str, text: str) -> None:
    openai = openai_module()
    with OpenAIServer(StandInClient(error=error)).serve_in_thread() as served:
        r = post(served.url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
        assert r.status_code == status
        body = error_of(r)
        assert text in body["message"]
        assert body["type"] == ("invalid_request_error" if status < 500 else "server_error")
        with pytest.raises(getattr(openai, kind)) as e:
            openai_client(served.url).chat.completions.create(
                model=MODEL, messages=CHAT, extra_headers={"X-Session-ID": "failed"}
            )
        assert e.value.status_code == status
        assert served.server.session_turns("failed") == []


def test_malformed_bodies_are_400(served: ServerThread, stand_in: StandInClient) -> None:
    url = served.url + "/v1/chat/completions"
    cases = {
        b"{not json": "not valid JSON",
        b"[1, 2]": "must be a JSON object",
        b'{"model": NaN}': "NaN is not valid JSON",
        b"": "empty",
        b"\xff\xfe": "not",
    }
    for content, text in cases.items():
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, content
        assert text in error_of(r)["message"], content
    fields = [
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"session_id": {"a": 1}}, "session_id"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": "x" * 257}, "session_id"),
    ]
    for extra, param in fields:
        r = post(served.url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, **extra})
        assert r.status_code == 400, extra
        assert error_of(r)["param"] == param, extra
    assert stand_in.payloads == []


def test_unknown_paths_are_404_and_wrong_methods_405(served: ServerThread) -> None:
    r = httpx.get(served.url + "/v1/embeddings", timeout=30)
    assert r.status_code == 404
    assert "POST /v1/chat/completions" in error_of(r)["message"]
    assert httpx.post(served.url + "/", json={}, timeout=30).status_code == 404
    r = httpx.get(served.url + "/v1/chat/completions", timeout=30)
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    error_of(r)
    r = httpx.post(served.url + "/v1/models", json={}, timeout=30)
    assert (r.status_code, r.headers["allow"]) == (405, "GET")


def test_the_body_cap_is_413_before_the_body_is_read() -> None:
    stand_in = StandInClient()
    with OpenAIServer(stand_in, max_body_bytes=1000).serve_in_thread() as served:
        small = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 900}]}
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1000}]}
        assert post(served.url, "/v1/chat/completions", small).status_code == 200
        r = post(served.url, "/v1/chat/completions", big)
        assert r.status_code == 413
        assert "exceeds the limit of 1000 bytes" in error_of(r)["message"]
        assert r.headers["connection"] == "close"
        # The server refused from the header: it never waits for the body.
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{"
        assert exchange(served.url, head).startswith(b"HTTP/1.1 413 ")
    assert len(stand_in.payloads) == 1


def test_a_body_larger_than_the_read_buffer_arrives_whole(
    served: ServerThread, stand_in: StandInClient
) -> None:
    content = "0123456789" * 300_000  # 3 MB: many times the stream's buffer limit
    r = post(
        served.url,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": content}]},
    )
    assert r.status_code == 200
    assert stand_in.payloads[0]["messages"][0]["content"] == content


def test_chunked_request_bodies_are_refused_with_411(served: ServerThread) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "stand-in-model", '
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    r = httpx.post(served.url + "/v1/chat/completions", content=body(), timeout=30)
    assert r.status_code == 411
    assert "Content-Length" in error_of(r)["message"]
    raw = exchange(served.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 411 ")


def test_protocol_errors(served: ServerThread) -> None:
    assert exchange(served.url, b"GET /v1/models HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert exchange(served.url, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(served.url, b"GET /v1/models HTTP/1.1\r\nbad header\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert exchange(served.url, huge).startswith(b"HTTP/1.1 431 ")
    two_lengths = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    assert exchange(served.url, two_lengths).startswith(b"HTTP/1.1 400 ")


def test_keep_alive_serves_several_requests_on_one_connection(served: ServerThread) -> None:
    parts = urlsplit(served.url)
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    post_req = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, payload = read_response(f)
            assert (status, headers["connection"]) == (200, "keep-alive")
            assert json.loads(payload)["data"][0]["id"] == MODEL
            s.sendall(post_req)
            status, headers, payload = read_response(f)
            assert status == 200
            assert json.loads(payload)["choices"][0]["text"] == " world 0"
        # An error after the body was read keeps the connection too.
        s.sendall(b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(f)[0] == 404
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = read_response(f)
        assert (status, headers["connection"]) == (200, "close")
        assert f.read() == b""  # the server closed
    # HTTP/1.0 closes unless asked to keep the connection.
    raw = exchange(served.url, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in raw


def test_expect_100_continue(served: ServerThread) -> None:
    parts = urlsplit(served.url)
    body = json.dumps({"model": MODEL, "prompt": "x"}).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        f = s.makefile("rb")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        s.sendall(body)
        assert read_response(f)[0] == 200


# -- authentication and exposure -----------------------------------------------------------------


def test_api_key_is_required_when_set() -> None:
    openai = openai_module()
    stand_in = StandInClient()
    with OpenAIServer(stand_in, api_key="s3cret-key").serve_in_thread() as served:
        r = httpx.get(served.url + "/v1/models", timeout=30)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert error_of(r)["code"] == "invalid_api_key"
        for header in ("Bearer wrong", "Bearer s3cret-key-and-more", "Basic s3cret-key", "s3cret-key"):
            r = httpx.get(served.url + "/v1/models", headers={"Authorization": header}, timeout=30)
            assert r.status_code == 401, header
        with pytest.raises(openai.AuthenticationError):
            openai_client(served.url, api_key="wrong").chat.completions.create(model=MODEL, messages=CHAT)
        assert stand_in.payloads == []
        good = openai_client(served.url, api_key="s3cret-key")
        assert (
            good.chat.completions.create(model=MODEL, messages=CHAT).choices[0].message.content == "hello 0"
        )
        assert [m.id for m in good.models.list()] == [MODEL]


def test_a_non_loopback_host_needs_a_key_or_allow_remote() -> None:
    client = StandInClient()
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ValueError, match="not a loopback address") as e:
            OpenAIServer(client, host=host)
        assert "api_key" in str(e.value)
        assert "allow_remote" in str(e.value)
        OpenAIServer(client, host=host, api_key="k")
        OpenAIServer(client, host=host, allow_remote=True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        OpenAIServer(client, host=host)
    with pytest.raises(ValueError, match="api_key"):
        OpenAIServer(client, api_key="")


# -- sessions ------------------------------------------------------------------------------------


def test_session_from_the_header_or_the_body(served: ServerThread, stand_in: StandInClient) -> None:
    server = served.server
    url = "/v1/chat/completions"
    body = {"model": MODEL, "messages": CHAT}
    post(served.url, url, body, headers={"X-Session-ID": "from-header"})
    post(served.url, url, {**body, "session_id": "from-body"}, headers={"X-Session-ID": "ignored"})
    post(served.url, url, {**body, "session_id": 7})
    post(served.url, url, body)
    assert [p.get("session_id") for p in stand_in.payloads] == ["from-header", "from-body", "7", None]
    assert sorted(server.session_ids()) == ["7", "from-body", "from-header"]
    assert len(server.session_turns(7)) == 1
    assert server.session_turns("ignored") == []
    # Turns of one session accumulate in order; pop takes them.
    post(served.url, "/v1/completions", {"prompt": "x"}, headers={"x-session-id": "from-header"})
    turns = server.pop_session("from-header")
    assert [t.endpoint for t in turns] == ["chat.completions", "completions"]
    assert server.session_turns("from-header") == []
    assert server.pop_session("from-header") == []


def test_the_session_record_keeps_the_most_recently_used_sessions(stand_in: StandInClient) -> None:
    with OpenAIServer(stand_in, max_sessions=2).serve_in_thread() as served:
        server = served.server

        def turn(session: str) -> None:
            assert (
                post(served.url, "/v1/completions", {"prompt": "x", "session_id": session}).status_code == 200
            )

        turn("a")
        turn("b")
        turn("a")  # a is now the most recently used
        turn("c")  # b goes
        assert server.session_ids() == ["a", "c"]
        assert len(server.session_turns("a")) == 2
        assert server.session_turns("b") == []
        assert server.sessions_evicted == 1
        listing = httpx.get(served.url + SESSIONS, timeout=30).json()
        assert listing == {"object": "list", "data": ["a", "c"], "evicted": 1}


def test_turns_are_read_only_values() -> None:
    def make() -> Turn:
        ids = np.array([1, 2], np.int64)
        ids.flags.writeable = False
        return Turn(ids, ids, None, "stop", (WeightVersionSpan("v", 0, 2),), "completions")

    a, b = make(), make()
    assert a == b
    assert a != Turn(a.prompt_ids, a.response_ids, None, "length", a.weight_versions, "completions")
    with pytest.raises(ValueError, match="read-only"):
        a.response_ids[0] = 5
    with pytest.raises(TypeError):
        hash(a)


# -- the record of sessions over HTTP ------------------------------------------------------------


def get(url: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.get(url + path, timeout=30.0, **kw)


def delete(url: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.delete(url + path, timeout=30.0, **kw)


def test_sessions_over_http_list_get_and_delete(served: ServerThread) -> None:
    server = served.server
    chat = {"model": MODEL, "messages": CHAT}
    assert post(served.url, "/v1/chat/completions", chat, headers={"X-Session-ID": "a"}).status_code == 200
    assert post(served.url, "/v1/completions", {"prompt": "x", "n": 2, "session_id": "a"}).status_code == 200
    assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": "b"}).status_code == 200

    r = get(served.url, SESSIONS)
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": ["a", "b"], "evicted": 0}

    r = get(served.url, SESSIONS + "/a")
    assert r.status_code == 200
    record = r.json()
    assert record["id"] == "a"
    assert record["turns"][0] == {
        "index": 0,
        "endpoint": "chat.completions",
        "prompt_ids": [1, 2, 3, 4],
        "response_ids": [10, 11, 12],
        "logprobs": [-0.5, -0.25, -0.125],
        "finish_reason": "stop",
        "weight_versions": [["v1", 0, 2], ["v2", 2, 3]],
        "response_id": "chatcmpl-1",
    }
    assert [
        (t["endpoint"], t["index"], t["prompt_ids"], t["response_ids"], t["finish_reason"], t["response_id"])
        for t in record["turns"][1:]
    ] == [
        ("completions", 0, [5, 6], [10, 11, 12], "length", "cmpl-1"),
        ("completions", 1, [5, 6], [11, 11, 12], "length", "cmpl-1"),
    ]

    # GET leaves the record; DELETE answers the same and takes it.
    assert get(served.url, SESSIONS + "/a").json() == record
    assert len(server.session_turns("a")) == 3
    r = delete(served.url, SESSIONS + "/a")
    assert (r.status_code, r.json()) == (200, record)
    assert server.session_ids() == ["b"]
    assert get(served.url, SESSIONS).json()["data"] == ["b"]
    for method in (get, delete):
        r = method(served.url, SESSIONS + "/a")
        assert r.status_code == 404
        error = error_of(r)
        assert (error["code"], error["param"]) == ("session_not_found", "session_id")
        assert "'a'" in error["message"]
    # A later turn of a taken session starts a new record.
    assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": "a"}).status_code == 200
    assert [t["endpoint"] for t in get(served.url, SESSIONS + "/a").json()["turns"]] == ["completions"]


@pytest.mark.parametrize("session", ["ep/7", "a b?c=d#e&f", "100%", "%41", "a+b", "é-ü", "..", ".", "7"])
def test_session_ids_are_percent_decoded_from_the_path(served: ServerThread, session: str) -> None:
    assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": session}).status_code == 200
    assert get(served.url, SESSIONS).json()["data"] == [session]
    escaped = quote(session, safe="").replace(".", "%2E")
    r = get(served.url, f"{SESSIONS}/{escaped}")
    assert r.status_code == 200
    assert r.json()["id"] == session
    assert len(r.json()["turns"]) == 1
    expected = served.server.session_turns(session)
    assert fetch_session(served.url, session) == expected
    assert served.server.session_ids() == []


def test_session_paths_in_raw_forms(served: ServerThread) -> None:
    session = "ep/é 1"
    assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": session}).status_code == 200

    def ask(target: bytes) -> tuple[int, dict[str, Any]]:
        raw = exchange(served.url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    # Lower-case escapes, UTF-8 and "/" sent unescaped, a query (not part of the id).
    for target in (
        b"/rollstream/sessions/ep%2f%c3%a9%201",
        b"/rollstream/sessions/ep/\xc3\xa9%201",
        b"/rollstream/sessions/ep%2F%C3%A9%201?pop=1",
    ):
        status, body = ask(target)
        assert (status, body["id"]) == (200, session), target
    status, body = ask(b"/rollstream/sessions/%ff")
    assert status == 400
    assert "not percent-encoded UTF-8" in body["error"]["message"]
    status, body = ask(b"/rollstream/sessions/")
    assert status == 400
    assert "empty" in body["error"]["message"]
    status, body = ask(b"/rollstream/sessions/ep%2F%C3%A9")
    assert (status, body["error"]["code"]) == (404, "session_not_found")


def test_the_session_routes_allow_get_and_delete_only(served: ServerThread) -> None:
    for method in ("POST", "DELETE", "PUT"):
        r = httpx.request(method, served.url + SESSIONS, content=b"{}", timeout=30)
        assert (r.status_code, r.headers["allow"]) == (405, "GET"), method
        assert error_of(r)["code"] == "method_not_allowed"
    for method in ("POST", "PUT", "PATCH"):
        r = httpx.request(method, served.url + SESSIONS + "/s", content=b"{}", timeout=30)
        assert (r.status_code, r.headers["allow"]) == (405, "GET, DELETE"), method
        assert "GET or DELETE" in error_of(r)["message"]


def test_the_session_routes_take_no_body(served: ServerThread) -> None:
    assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": "s"}).status_code == 200
    parts = urlsplit(served.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        f = s.makefile("rb")
        body = b'{"pop": false}'
        s.sendall(
            b"DELETE /rollstream/sessions/s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        status, headers, answer = read_response(f)
        assert status == 400
        assert "takes no body" in json.loads(answer)["error"]["message"]
        # The body was read: the connection goes on. An empty body is no body.
        assert headers["connection"] == "keep-alive"
        s.sendall(b"GET /rollstream/sessions/s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        status, _, answer = read_response(f)
        assert (status, len(json.loads(answer)["turns"])) == (200, 1)
    assert served.server.session_ids() == ["s"]  # the refused DELETE took nothing


def test_the_session_routes_need_the_api_key_when_set() -> None:
    with OpenAIServer(StandInClient(), api_key="s3cret-key").serve_in_thread() as served:
        key = {"Authorization": "Bearer s3cret-key"}
        body = {"prompt": "x", "session_id": "s"}
        assert post(served.url, "/v1/completions", body, headers=key).status_code == 200
        for method, path in ((get, SESSIONS), (get, SESSIONS + "/s"), (delete, SESSIONS + "/s")):
            r = method(served.url, path)
            assert r.status_code == 401
            assert error_of(r)["code"] == "invalid_api_key"
            assert method(served.url, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert served.server.session_ids() == ["s"]  # nothing taken without the key
        with pytest.raises(RuntimeError, match="HTTP 401: no API key"):
            fetch_session(served.url, "s")
        with pytest.raises(RuntimeError, match="HTTP 401: incorrect API key"):
            fetch_session(served.url, "s", api_key="wrong")
        assert get(served.url, SESSIONS, headers=key).json()["data"] == ["s"]
        assert len(fetch_session(served.url, "s", api_key="s3cret-key")) == 1


def test_fetch_session_returns_the_recorded_turns_once() -> None:
    stand_in = StandInClient(token_logprobs=(float("nan"), -0.25, -0.1))
    with OpenAIServer(stand_in).serve_in_thread() as served:
        session = "episode/1"
        chat = {"model": MODEL, "messages": CHAT, "session_id": session}
        assert post(served.url, "/v1/chat/completions", chat).status_code == 200
        assert (
            post(served.url, "/v1/completions", {"prompt": "x", "n": 2, "session_id": session}).status_code
            == 200
        )
        expected = served.server.session_turns(session)
        assert len(expected) == 3
        assert expected[0].logprobs is not None
        assert np.isnan(expected[0].logprobs[0])
        # JSON has no NaN: null on the wire, NaN again in the Turn.
        wire = get(served.url, f"{SESSIONS}/{quote(session, safe='')}").text
        assert '"logprobs":[null,-0.25,' in wire
        assert "NaN" not in wire

        peeked = fetch_session(served.url, session, pop=False)
        assert peeked == expected
        assert peeked[0] != expected[1]  # the comparison sees the differences
        for turn in peeked:
            assert (turn.prompt_ids.dtype, turn.response_ids.dtype) == (np.int64, np.int64)
            assert turn.logprobs is not None
            assert turn.logprobs.dtype == np.float32
            with pytest.raises(ValueError, match="read-only"):
                turn.response_ids[0] = 5
        assert served.server.session_ids() == [session]

        # pop (the default) takes them; the API root works as the URL too.
        assert fetch_session(served.url + "/v1/", session) == expected
        assert served.server.session_ids() == []
        with pytest.raises(LookupError, match="episode/1"):
            fetch_session(served.url, session)
        with pytest.raises(LookupError, match="never-seen"):
            fetch_session(served.url, "never-seen", pop=False)
        # A 404 from a wrong URL is not an unknown session.
        with pytest.raises(RuntimeError, match="HTTP 404: no route"):
            fetch_session(served.url + "/elsewhere", "s")
        with pytest.raises(ValueError, match="empty"):
            fetch_session(served.url, "")
        url = served.url
    with pytest.raises(RuntimeError, match="ConnectError"):
        fetch_session(url, session)


def test_fetch_session_without_logprobs_and_with_an_int_id() -> None:
    with OpenAIServer(StandInClient(token_logprobs=None)).serve_in_thread() as served:
        assert post(served.url, "/v1/completions", {"prompt": "x", "session_id": 7}).status_code == 200
        assert get(served.url, SESSIONS + "/7").json()["turns"][0]["logprobs"] is None
        (turn,) = fetch_session(served.url, 7)
        assert turn.logprobs is None
        assert turn == Turn(
            prompt_ids=np.array([5, 6], np.int64),
            response_ids=np.array([10, 11, 12], np.int64),
            logprobs=None,
            finish_reason="length",
            weight_versions=(WeightVersionSpan("v1", 0, 2), WeightVersionSpan("v2", 2, 3)),
            endpoint="completions",
            index=0,
            response_id="cmpl-1",
        )


# -- lifetime ------------------------------------------------------------------------------------


def test_a_client_that_disconnects_cancels_its_request() -> None:
    stand_in = StandInClient(delay=60.0)
    with OpenAIServer(stand_in).serve_in_thread() as served:
        body = json.dumps({"model": MODEL, "prompt": "x", "session_id": "gone"}).encode()
        parts = urlsplit(served.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert stand_in.started.wait(10)
        assert stand_in.cancelled.wait(10), "the request was not cancelled after the client left"
        assert served.server.session_turns("gone") == []


def test_stop_lets_requests_in_flight_finish_then_closes() -> None:
    stand_in = StandInClient(delay=0.5)
    served = OpenAIServer(stand_in, close_client=True).serve_in_thread()
    results: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: results.append(post(served.url, "/v1/completions", {"prompt": "x"}))
    )
    caller.start()
    assert stand_in.started.wait(10)
    t0 = time.monotonic()
    served.stop()
    caller.join(10)
    assert time.monotonic() - t0 < 5
    (r,) = results
    assert r.status_code == 200
    assert r.headers["connection"] == "close"
    assert stand_in.torn_down
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "/v1/models", timeout=5)


def test_stop_cancels_what_outlives_the_grace_period() -> None:
    stand_in = StandInClient(delay=60.0)
    served = OpenAIServer(stand_in, stop_grace=0.2).serve_in_thread()
    failures: list[BaseException] = []

    def call() -> None:
        try:
            post(served.url, "/v1/completions", {"prompt": "x"})
        except httpx.HTTPError as e:
            failures.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    assert stand_in.started.wait(10)
    t0 = time.monotonic()
    served.stop()
    assert time.monotonic() - t0 < 5
    assert stand_in.cancelled.is_set()
    caller.join(10)
    assert len(failures) == 1, "the cancelled request's connection closes without an answer"


def test_async_server_with_the_async_openai_client() -> None:
    openai = openai_module()
    stand_in = StandInClient()

    async def main() -> list[str]:
        async with OpenAIServer(stand_in, close_client=True) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            outs = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL, messages=CHAT, extra_headers={"X-Session-ID": f"s{i}"}
                    )
                    for i in range(8)
                )
            )
            await client.close()
            assert sorted(server.session_ids()) == [f"s{i}" for i in range(8)]
            return [o.choices[0].message.content for o in outs]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == ["hello 0"] * 8
    assert stand_in.torn_down


def test_url_before_start_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = OpenAIServer(StandInClient()).url
