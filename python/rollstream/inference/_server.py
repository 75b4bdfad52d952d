"""An OpenAI-compatible HTTP endpoint in front of an inference client, for
agent harnesses that speak the OpenAI API.

>>> server = OpenAIServer(client)              # client: InferenceEngineClient
>>> async with server:
...     print(server.url)                      # http://127.0.0.1:<port>; /v1 is the API root
...     ...                                    # the harness runs against it
...     turns = server.pop_session("episode-7")

``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``
(``/v1/models/<id>``) answer as OpenAI's do, streaming included. A request's
session comes from its body's ``session_id`` or, when the body has none, the
``X-Session-ID`` header; it keeps the session on one engine (prefix cache)
and names the record of its turns. Every other body field goes to the
client, which passes fields it does not know to vLLM.

Every choice of every request that has a session is recorded as a
:class:`Turn` (prompt ids, sampled ids, their logprobs, the weight versions
that produced them) before the response is sent, so a harness's reply and the
trainer's record never disagree. The store keeps the ``max_sessions`` most
recently used sessions (10,000 by default) and forgets the least recently
used one beyond that (counted in :attr:`OpenAIServer.sessions_evicted`): a
trainer takes a session's turns with :meth:`OpenAIServer.pop_session` when
its episode ends.

A trainer in another process (the usual case with ``rollstream serve``) reads
the record over HTTP, with the same authentication as the API:
``GET /rollstream/sessions`` lists the recorded sessions
(``{"object": "list", "data": [ids], "evicted": N}``),
``GET /rollstream/sessions/<id>`` sends one's turns
(``{"id", "turns": [{"index", "endpoint", "prompt_ids", "response_ids",
"logprobs", "finish_reason", "weight_versions": [[version, start, end]],
"response_id"}]}``, NaN logprobs as null) and ``DELETE`` sends them and
forgets them, so each turn is taken once. The id is percent-encoded UTF-8 in
the path; an unknown one is 404 ``session_not_found``.
:func:`fetch_session` does this and returns :class:`Turn` objects.

The HTTP/1.1 layer is asyncio's streams and nothing else: keep-alive,
``Content-Length`` bodies (chunked request bodies are refused with 411),
a body cap (413), a header cap (431), OpenAI error bodies
(``{"error": {"message", "type", "param", "code"}}``) with the matching
status. A request whose client disconnects before its answer is ready is
cancelled, and nothing is recorded for it. The server listens on loopback
unless given an ``api_key`` (then every request needs
``Authorization: Bearer <key>``) or ``allow_remote=True``.

Streaming requests (``"stream": true``) are answered as server-sent events
built from the whole result: one chunk with each choice's text, one with its
finish reason, and a usage chunk with ``stream_options.include_usage``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import http
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import quote, unquote_to_bytes

import httpx
import numpy as np
import numpy.typing as npt

from .._exceptions import (
    DeploymentSamplerTimeoutError,
    EngineUnavailableError,
    RequestRejectedError,
    SamplingRequestError,
    TemplateError,
)
from .._models import _same
from ..streams import WeightVersionSpan

__all__ = ["InferenceClient", "OpenAIServer", "ServerThread", "Turn", "fetch_session"]

logger = logging.getLogger("rollstream.inference")

#: Largest request body accepted by default (bytes).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Largest request head (request line and headers) accepted (bytes).
MAX_HEAD_BYTES = 64 * 1024
#: Longest session id accepted (characters).
MAX_SESSION_ID_CHARS = 256
#: Seconds between checks for clients that went away mid-request.
DISCONNECT_POLL_S = 0.25
#: Where the record of sessions is served (``/<id>`` for one session).
SESSIONS_PATH = "/rollstream/sessions"

Endpoint = Literal["chat.completions", "completions"]
JSONObject = dict[str, Any]


class InferenceClient(Protocol):
    """What :class:`OpenAIServer` needs of its client
    (:class:`~rollstream.inference.InferenceEngineClient` has it)."""

    @property
    def model_name(self) -> str: ...

    async def chat_completion(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def completion(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def teardown(self) -> None: ...


@dataclass(frozen=True, eq=False)
class Turn:
    """One sampled choice of one request of a session, as the trainer needs it.

    ``prompt_ids`` are the tokens the engine was given (the rendered chat for
    ``/v1/chat/completions``), ``response_ids`` the tokens it sampled and
    ``logprobs`` their logprobs (None when the request asked for none; NaN
    where the engine sent none). ``weight_versions`` say which weights
    produced which ``response_ids`` positions. ``endpoint`` is
    ``"chat.completions"`` or ``"completions"``, ``index`` the choice's index
    (requests with ``n > 1`` record one turn per choice) and ``response_id``
    the response's ``id``. The arrays are read-only.
    """

    prompt_ids: npt.NDArray[np.int64]
    response_ids: npt.NDArray[np.int64]
    logprobs: npt.NDArray[np.float32] | None
    finish_reason: str | None
    weight_versions: tuple[WeightVersionSpan, ...]
    endpoint: Endpoint
    index: int = 0
    response_id: str | None = None

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    # Equal by value, arrays inside: unhashable, like SampledCompletion.
    __hash__ = None  # type: ignore[assignment]


class _HTTPError(Exception):
    """A request that ends in an error response; ``close`` ends the
    connection after it (the rest of the request was not read)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        close: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.close = close
        self.headers = headers

    def body(self) -> JSONObject:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The client call in flight for this connection, if any.
    call: asyncio.Task[JSONObject] | None = None
    busy: bool = False
    disconnected: bool = False


class _SessionStore:
    """Turns per session, the ``max_sessions`` most recently used kept.
    Thread-safe: the trainer reads it from any thread."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.evicted = 0
        self._turns: collections.OrderedDict[str, list[Turn]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, session: str, turns: list[Turn]) -> None:
        with self._lock:
            record = self._turns.get(session)
            if record is None:
                record = self._turns[session] = []
            else:
                self._turns.move_to_end(session)
            record.extend(turns)
            while len(self._turns) > self.max_sessions:
                oldest, _ = self._turns.popitem(last=False)
                self.evicted += 1
                if self.evicted == 1:
                    logger.warning(
                        "session %r forgotten: the record keeps the %d most recently used sessions "
                        "(OpenAIServer(max_sessions=...)); pop_session() each one when its episode ends",
                        oldest,
                        self.max_sessions,
                    )

    def get(self, session: str) -> list[Turn] | None:
        """The session's turns, None when it has no record."""
        with self._lock:
            record = self._turns.get(session)
            return None if record is None else list(record)

    def pop(self, session: str) -> list[Turn] | None:
        """As :meth:`get`, forgetting the record."""
        with self._lock:
            return self._turns.pop(session, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._turns)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_default(value: Any) -> Any:
    """JSON for what a client's result may hold beside plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, WeightVersionSpan):
        return [value.version, value.start, value.end]
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8")


def _span(value: Any) -> WeightVersionSpan:
    if isinstance(value, WeightVersionSpan):
        return value
    version, start, end = value
    return WeightVersionSpan(str(version), int(start), int(end))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _session_key(session: str | int) -> str:
    return str(session)


class OpenAIServer:
    """OpenAI's HTTP API in front of ``client`` (see the module documentation).

    ``host``/``port`` are where to listen (port 0: any free port; read
    :attr:`url` after :meth:`start`). ``api_key``: when set, every request
    needs ``Authorization: Bearer <api_key>``. A host other than loopback is
    refused unless ``api_key`` is set or ``allow_remote=True``.
    ``max_body_bytes`` caps request bodies (413 beyond), ``max_sessions`` the
    sessions whose turns are kept. ``idle_timeout`` closes a keep-alive
    connection with no request for that many seconds; ``read_timeout``
    bounds the arrival of a request's body. ``stop_grace`` is how long
    :meth:`stop` lets requests in flight finish before cancelling them.
    ``close_client=True`` tears the client down in :meth:`stop`.
    """

    def __init__(
        self,
        client: InferenceClient,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        allow_remote: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_sessions: int = 10_000,
        idle_timeout: float = 60.0,
        read_timeout: float = 30.0,
        stop_grace: float = 10.0,
        close_client: bool = False,
    ) -> None:
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None for no authentication)")
        if not _is_loopback(host) and api_key is None and not allow_remote:
            raise ValueError(
                f"host={host!r} is not a loopback address: anyone who can reach it could sample from "
                "the engines. Pass api_key=... (clients then send 'Authorization: Bearer <key>'), or "
                "allow_remote=True to serve without authentication"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r} must be an int in [0, 65535] (0: any free port)")
        if not isinstance(max_body_bytes, int) or max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes={max_body_bytes!r} must be a positive int")
        if not isinstance(max_sessions, int) or max_sessions <= 0:
            raise ValueError(f"max_sessions={max_sessions!r} must be a positive int")
        for name, value in (
            ("idle_timeout", idle_timeout),
            ("read_timeout", read_timeout),
            ("stop_grace", stop_grace),
        ):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number of seconds")
        self.client = client
        # "localhost" may resolve to two addresses, which would get two ports.
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = float(idle_timeout)
        self.read_timeout = float(read_timeout)
        self.stop_grace = float(stop_grace)
        self.close_client = close_client
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self._sessions = _SessionStore(max_sessions)
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._stopped = False
        self._created = int(time.time())

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:<port>``); the OpenAI API root is ``url + "/v1"``."""
        if self._bound_port is None:
            raise RuntimeError("the server is not listening: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    async def start(self) -> OpenAIServer:
        """Listen (returns once connections are accepted)."""
        if self._server is not None or self._stopped:
            raise RuntimeError("an OpenAIServer starts once")
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self._bound_port = int(self._server.sockets[0].getsockname()[1])
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnects())
        logger.info("serving %s at %s/v1", self.client.model_name, self.url)
        return self

    async def stop(self) -> None:
        """Stop listening, close idle connections, let requests in flight
        finish for up to ``stop_grace`` seconds, cancel the rest; then tear
        the client down when ``close_client``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections.values()):
                if not conn.busy:
                    conn.writer.close()
            tasks = set(self._connections)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.stop_grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            if self.close_client:
                await self.client.teardown()

    async def __aenter__(self) -> OpenAIServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def serve_in_thread(self, *, timeout: float = 30.0) -> ServerThread:
        """Run the server on an event loop of its own in a background thread
        (for synchronous scripts and tests); returns once it listens. The
        client is then used from that thread's loop only."""
        return ServerThread(self, timeout=timeout)

    # -- the record of sessions -------------------------------------------------------------------

    def session_turns(self, session_id: str | int) -> list[Turn]:
        """The turns recorded for ``session_id`` so far, oldest first ([] for
        a session never seen, popped, or evicted)."""
        return self._sessions.get(_session_key(session_id)) or []

    def pop_session(self, session_id: str | int) -> list[Turn]:
        """The turns of ``session_id``, oldest first, forgetting them ([] as
        for :meth:`session_turns`). Later requests of the session start a
        new record."""
        return self._sessions.pop(_session_key(session_id)) or []

    def session_ids(self) -> list[str]:
        """The sessions with recorded turns, least recently used first."""
        return self._sessions.ids()

    @property
    def sessions_evicted(self) -> int:
        """Sessions forgotten because the store was full (``max_sessions``)."""
        return self._sessions.evicted

    # -- HTTP/1.1 ---------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(reader, writer)
        self._connections[task] = conn
        try:
            await self._converse(conn)
        except asyncio.CancelledError:
            # Only stop() and the loop's shutdown cancel a connection. Ending
            # quietly keeps asyncio (3.11) from logging the cancellation of
            # its connection task as an unhandled error.
            pass
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, conn: _Connection) -> None:
        """Requests of one connection, one after the other, until it closes."""
        while not self._closing:
            try:
                head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
            except asyncio.LimitOverrunError:
                error = _HTTPError(
                    431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes", close=True
                )
                await self._send_error(conn, error, keep_alive=False)
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            conn.busy = True
            try:
                keep_alive = await self._handle(conn, head)
            finally:
                conn.busy = False
            if not keep_alive:
                return

    async def _handle(self, conn: _Connection, head: bytes) -> bool:
        """Answer one request; whether the connection stays open."""
        request: _Request | None = None
        try:
            request = self._parse_head(head)
            self._authorize(request)
            await self._read_body(conn, request)
            response = await self._route(conn, request)
        except _HTTPError as e:
            keep_alive = request is not None and request.keep_alive and not e.close
            return await self._send_error(conn, e, keep_alive=keep_alive)
        except _ClientGone:
            return False
        except Exception as e:
            logger.exception("%s failed", request.path if request else "a request")
            error = _HTTPError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            return await self._send_error(conn, error, keep_alive=False)
        keep_alive = request.keep_alive and not self._closing
        return await self._send(conn, response, keep_alive)

    def _parse_head(self, head: bytes) -> _Request:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
            raise _HTTPError(400, f"malformed request line {lines[0][:200]!r}", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HTTPError(505, f"HTTP version {version!r} is not supported: use HTTP/1.1", close=True)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _HTTPError(400, f"malformed header line {line[:200]!r}", close=True)
            key = name.decode("latin-1").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key == "content-length" and headers[key] != text:
                    raise _HTTPError(400, "conflicting Content-Length headers", close=True)
                if key != "content-length":
                    headers[key] = f"{headers[key]}, {text}"
            else:
                headers[key] = text
        return _Request(method, target.split("?", 1)[0], version, headers)

    def _authorize(self, request: _Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self._api_key):
            return
        missing = "authorization" not in request.headers
        raise _HTTPError(
            401,
            "no API key: send 'Authorization: Bearer <key>'"
            if missing
            else "incorrect API key in the Authorization header (expected 'Bearer <key>')",
            code="invalid_api_key",
            close=_has_body(request),
            headers=(("WWW-Authenticate", 'Bearer realm="rollstream"'),),
        )

    async def _read_body(self, conn: _Connection, request: _Request) -> None:
        encoding = request.headers.get("transfer-encoding")
        if encoding is not None:
            if "chunked" in encoding.lower():
                raise _HTTPError(
                    411,
                    "chunked request bodies are not supported: send the body with a Content-Length header",
                    close=True,
                )
            raise _HTTPError(501, f"Transfer-Encoding {encoding!r} is not supported", close=True)
        raw = request.headers.get("content-length")
        if raw is None:
            if request.method == "POST":
                raise _HTTPError(411, "a POST needs a Content-Length header", close=True)
            return
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise _HTTPError(400, f"invalid Content-Length {raw[:40]!r}", close=True)
        length = int(raw)
        if length > self.max_body_bytes:
            raise _HTTPError(
                413,
                f"request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes "
                "(OpenAIServer(max_body_bytes=...))",
                close=True,
            )
        expect = request.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise _HTTPError(417, f"Expect: {expect[:80]!r} is not supported", close=True)
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            request.body = await asyncio.wait_for(conn.reader.readexactly(length), self.read_timeout)
        except asyncio.TimeoutError:
            raise _HTTPError(
                408, f"the body did not arrive within {self.read_timeout:g} s", close=True
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _ClientGone from None

    async def _send(self, conn: _Connection, response: _Response, keep_alive: bool) -> bool:
        reason = http.HTTPStatus(response.status).phrase
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{k}: {v}" for k, v in response.headers),
        ]
        conn.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body)
        try:
            await conn.writer.drain()
        except ConnectionError:
            return False
        return keep_alive

    async def _send_error(self, conn: _Connection, error: _HTTPError, *, keep_alive: bool) -> bool:
        return await self._send(
            conn, _Response(error.status, _json_bytes(error.body()), headers=error.headers), keep_alive
        )

    # -- routes -----------------------------------------------------------------------------------

    async def _route(self, conn: _Connection, request: _Request) -> _Response:
        path = request.path
        if path in ("/v1/chat/completions", "/v1/completions"):
            if request.method != "POST":
                raise _method_not_allowed(request, ("POST",))
            endpoint: Endpoint = "chat.completions" if path == "/v1/chat/completions" else "completions"
            return await self._generate(conn, request, endpoint)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if request.method != "GET":
                raise _method_not_allowed(request, ("GET",))
            return self._models(path[len("/v1/models/") :] if path != "/v1/models" else None)
        if path == SESSIONS_PATH:
            if request.method != "GET":
                raise _method_not_allowed(request, ("GET",))
            _refuse_body(request)
            listing = {"object": "list", "data": self._sessions.ids(), "evicted": self._sessions.evicted}
            return _Response(200, _json_bytes(listing))
        if path.startswith(SESSIONS_PATH + "/"):
            if request.method not in ("GET", "DELETE"):
                raise _method_not_allowed(request, ("GET", "DELETE"))
            _refuse_body(request)
            return self._session_record(request.method, _path_session(path[len(SESSIONS_PATH) + 1 :]))
        raise _HTTPError(
            404,
            f"no route {request.method} {path}: this server answers POST /v1/chat/completions, "
            f"POST /v1/completions, GET /v1/models, GET {SESSIONS_PATH} and GET or DELETE "
            f"{SESSIONS_PATH}/<id>",
            code="not_found",
        )

    def _session_record(self, method: str, session: str) -> _Response:
        """A session's turns; a DELETE also forgets them."""
        turns = self._sessions.pop(session) if method == "DELETE" else self._sessions.get(session)
        if turns is None:
            raise _HTTPError(
                404,
                f"no session {session!r} is recorded here: never seen, already taken with DELETE, or "
                f"forgotten because the store was full (max_sessions); GET {SESSIONS_PATH} lists them",
                param="session_id",
                code="session_not_found",
            )
        return _Response(200, _json_bytes({"id": session, "turns": [_turn_json(t) for t in turns]}))

    def _model_card(self) -> JSONObject:
        return {
            "id": self.client.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "rollstream",
        }

    def _models(self, model: str | None) -> _Response:
        if model is None:
            return _Response(200, _json_bytes({"object": "list", "data": [self._model_card()]}))
        if model != self.client.model_name:
            raise _model_not_found(model, self.client.model_name)
        return _Response(200, _json_bytes(self._model_card()))

    async def _generate(self, conn: _Connection, request: _Request, endpoint: Endpoint) -> _Response:
        payload = _parse_json(request.body)
        model = payload.get("model")
        if model is None:
            payload["model"] = self.client.model_name
        elif model != self.client.model_name:
            raise _model_not_found(model, self.client.model_name)
        session = _session_of(payload, request.headers)
        stream, include_usage = _stream_of(payload)
        if session is not None:
            payload["session_id"] = session
        call = self.client.chat_completion if endpoint == "chat.completions" else self.client.completion
        result = await self._call(conn, call, payload)
        if not isinstance(result.get("choices"), list):
            raise TypeError(f"the client's result has no list of choices: {sorted(result)}")
        if session is not None:
            self._sessions.add(session, _turns(endpoint, result))
        if not stream:
            return _Response(200, _json_bytes(result))
        chunks = (
            _chat_chunks(result, include_usage)
            if endpoint == "chat.completions"
            else _completion_chunks(result, include_usage)
        )
        body = b"".join(b"data: " + _json_bytes(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return _Response(
            200,
            body,
            content_type="text/event-stream; charset=utf-8",
            headers=(("Cache-Control", "no-cache"),),
        )

    async def _call(
        self,
        conn: _Connection,
        call: Callable[[JSONObject], Coroutine[Any, Any, JSONObject]],
        payload: JSONObject,
    ) -> JSONObject:
        """The client's answer, its errors as OpenAI error responses; cancelled
        when the HTTP client goes away (see :meth:`_watch_disconnects`)."""
        task = asyncio.get_running_loop().create_task(call(payload))
        conn.call = task
        try:
            return await task
        except asyncio.CancelledError:
            if conn.disconnected:
                raise _ClientGone from None
            raise
        except RequestRejectedError as e:
            status = e.status if isinstance(e.status, int) and 400 <= e.status < 500 else 400
            raise _HTTPError(status, e.server_message or str(e), code=e.upstream_error_code) from e
        except EngineUnavailableError as e:
            raise _HTTPError(503, str(e), type="server_error", code="engine_unavailable") from e
        except DeploymentSamplerTimeoutError as e:
            raise _HTTPError(504, str(e), type="server_error", code="engine_timeout") from e
        except SamplingRequestError as e:
            raise _HTTPError(502, str(e), type="server_error", code="engine_error") from e
        except TemplateError as e:
            if e.raised:
                raise _HTTPError(400, e.template_message, param="messages", code="chat_template") from e
            raise
        except ValueError as e:
            raise _HTTPError(400, str(e), param=getattr(e, "param", None)) from e
        finally:
            conn.call = None

    async def _watch_disconnects(self) -> None:
        """Cancel the client calls of connections whose client went away (a
        client closing its side is seen as end of input on the reader)."""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            for conn in self._connections.values():
                call = conn.call
                if call is not None and not call.done() and conn.reader.at_eof():
                    conn.disconnected = True
                    call.cancel()


class _ClientGone(Exception):
    """The HTTP client went away: nothing to answer."""


def _has_body(request: _Request) -> bool:
    return "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"


def _method_not_allowed(request: _Request, allowed: tuple[str, ...]) -> _HTTPError:
    return _HTTPError(
        405,
        f"{request.method} is not allowed on {request.path}: use {' or '.join(allowed)}",
        code="method_not_allowed",
        headers=(("Allow", ", ".join(allowed)),),
    )


def _refuse_body(request: _Request) -> None:
    """The session routes take no body (it was read: the connection stays usable)."""
    if request.body:
        raise _HTTPError(
            400,
            f"{request.method} {request.path} takes no body, got {len(request.body)} bytes: "
            "the session id is the path's last part",
        )


def _path_session(raw: str) -> str:
    """The session id at the end of a session path: percent-encoded UTF-8
    (the request line was read as latin-1, so raw UTF-8 bytes work too)."""
    try:
        session = unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        raise _HTTPError(
            400, f"the session id {raw[:300]!r} is not percent-encoded UTF-8", param="session_id"
        ) from None
    if not session:
        raise _HTTPError(
            400, f"the session id is empty: use {SESSIONS_PATH}/<percent-encoded id>", param="session_id"
        )
    return session


def _model_not_found(model: object, served: str) -> _HTTPError:
    return _HTTPError(
        404,
        f"the model {model!r} does not exist here: this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


def _parse_json(body: bytes) -> JSONObject:
    if not body:
        raise _HTTPError(400, "the request body is empty: send a JSON object")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise _HTTPError(400, f"the request body is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise _HTTPError(400, f"the request body is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        raise _HTTPError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _HTTPError(400, f"the request body must be a JSON object, got a JSON {type(value).__name__}")
    return value


def _session_of(payload: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The request's session: the body's ``session_id``, else the
    ``X-Session-ID`` header, else None."""
    value = payload.get("session_id")
    param = "session_id"
    if value is None:
        value = headers.get("x-session-id")
        param = "X-Session-ID"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _HTTPError(
            400, f"{param} must be a string or an integer, got {type(value).__name__}", param="session_id"
        )
    session = str(value)
    if not session or len(session) > MAX_SESSION_ID_CHARS:
        raise _HTTPError(
            400,
            f"{param} must have 1 to {MAX_SESSION_ID_CHARS} characters, got {len(session)}",
            param="session_id",
        )
    return session


def _stream_of(payload: JSONObject) -> tuple[bool, bool]:
    """Whether to answer as a stream, and with a usage chunk; removes both
    fields from ``payload`` (the client returns whole results)."""
    stream = payload.pop("stream", None)
    options = payload.pop("stream_options", None)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _HTTPError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _HTTPError(400, f"stream_options must be an object, got {options!r}", param="stream_options")
    if not stream:
        raise _HTTPError(400, "stream_options is only allowed with stream=true", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _HTTPError(
            400,
            f"stream_options.include_usage must be a boolean, got {include_usage!r}",
            param="stream_options",
        )
    return stream, include_usage


def _turns(endpoint: Endpoint, result: Mapping[str, Any]) -> list[Turn]:
    """One :class:`Turn` per choice of ``result``."""
    turns = []
    top_prompt = result.get("prompt_token_ids")
    for position, choice in enumerate(result["choices"]):
        index = choice.get("index", position)
        prompt = choice.get("prompt_token_ids", top_prompt)
        ids = choice.get("token_ids")
        if prompt is None or ids is None:
            missing = "prompt_token_ids" if prompt is None else "token_ids"
            raise TypeError(
                f"the client's result has no {missing} for choice {index}: cannot record the turn"
            )
        logprobs = choice.get("token_logprobs")
        turns.append(
            Turn(
                prompt_ids=_frozen(np.asarray(prompt, dtype=np.int64)),
                response_ids=_frozen(np.asarray(ids, dtype=np.int64)),
                logprobs=None if logprobs is None else _frozen(np.asarray(logprobs, dtype=np.float32)),
                finish_reason=choice.get("finish_reason"),
                weight_versions=tuple(_span(w) for w in choice.get("weight_versions") or ()),
                endpoint=endpoint,
                index=int(index),
                response_id=result.get("id"),
            )
        )
    return turns


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if array.ndim != 1:
        raise TypeError(f"expected a flat list, got an array of shape {array.shape}")
    array.flags.writeable = False
    return array


def _turn_json(turn: Turn) -> JSONObject:
    """A turn as the session routes send it. NaN logprobs (the engine sent
    none) go as null: JSON has no NaN."""
    logprobs = None
    if turn.logprobs is not None:
        logprobs = [None if math.isnan(x) else x for x in turn.logprobs.tolist()]
    return {
        "index": turn.index,
        "endpoint": turn.endpoint,
        "prompt_ids": turn.prompt_ids.tolist(),
        "response_ids": turn.response_ids.tolist(),
        "logprobs": logprobs,
        "finish_reason": turn.finish_reason,
        "weight_versions": [[w.version, w.start, w.end] for w in turn.weight_versions],
        "response_id": turn.response_id,
    }


def _turn_of_json(value: Any) -> Turn:
    """The :class:`Turn` that :func:`_turn_json` sent (KeyError, TypeError or
    ValueError when ``value`` is not one)."""
    endpoint = value["endpoint"]
    if endpoint not in ("chat.completions", "completions"):
        raise ValueError(f"endpoint {endpoint!r} is neither 'chat.completions' nor 'completions'")
    logprobs = value["logprobs"]
    if logprobs is not None:
        logprobs = _frozen(np.asarray([math.nan if x is None else x for x in logprobs], dtype=np.float32))
    return Turn(
        prompt_ids=_frozen(np.asarray(value["prompt_ids"], dtype=np.int64)),
        response_ids=_frozen(np.asarray(value["response_ids"], dtype=np.int64)),
        logprobs=logprobs,
        finish_reason=value["finish_reason"],
        weight_versions=tuple(_span(w) for w in value["weight_versions"]),
        endpoint=endpoint,
        index=int(value["index"]),
        response_id=value["response_id"],
    )


def _chunk_base(result: Mapping[str, Any], obj: str) -> JSONObject:
    base: JSONObject = {
        "id": result.get("id"),
        "object": obj,
        "created": result.get("created", int(time.time())),
        "model": result.get("model"),
    }
    if result.get("system_fingerprint") is not None:
        base["system_fingerprint"] = result["system_fingerprint"]
    return base


def _chunks(
    result: Mapping[str, Any],
    obj: str,
    include_usage: bool,
    content: Callable[[Mapping[str, Any]], JSONObject],
    empty: JSONObject,
) -> Iterator[JSONObject]:
    """Chunks equivalent to a whole response: per choice, one with its
    ``content`` (and token ids), then one with its finish reason (``empty``
    content), then the usage when asked."""
    base = _chunk_base(result, obj)
    if include_usage:
        base["usage"] = None
    for position, choice in enumerate(result["choices"]):
        first = {
            "index": choice.get("index", position),
            **content(choice),
            "logprobs": choice.get("logprobs"),
            "finish_reason": None,
        }
        if "token_ids" in choice:
            first["token_ids"] = choice["token_ids"]
        chunk = {**base, "choices": [first]}
        if position == 0 and "prompt_token_ids" in result:
            chunk["prompt_token_ids"] = result["prompt_token_ids"]
        yield chunk
    for position, choice in enumerate(result["choices"]):
        last = {
            "index": choice.get("index", position),
            **empty,
            "logprobs": None,
            "finish_reason": choice.get("finish_reason"),
        }
        yield {**base, "choices": [last]}
    if include_usage:
        yield {**base, "choices": [], "usage": result.get("usage")}


def _chat_delta(choice: Mapping[str, Any]) -> JSONObject:
    message = choice.get("message") or {}
    delta: JSONObject = {"role": message.get("role") or "assistant", "content": message.get("content")}
    for key, value in message.items():
        if key not in ("role", "content", "tool_calls") and value is not None:
            delta[key] = value
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    return {"delta": delta}


def _chat_chunks(result: Mapping[str, Any], include_usage: bool) -> Iterator[JSONObject]:
    """``chat.completion.chunk`` objects equivalent to a whole ``chat.completion``."""
    return _chunks(result, "chat.completion.chunk", include_usage, _chat_delta, {"delta": {}})


def _completion_chunks(result: Mapping[str, Any], include_usage: bool) -> Iterator[JSONObject]:
    """``text_completion`` chunks equivalent to a whole ``text_completion``."""
    return _chunks(
        result, "text_completion", include_usage, lambda c: {"text": c.get("text", "")}, {"text": ""}
    )


class ServerThread:
    """An :class:`OpenAIServer` running on its own event loop in a daemon
    thread (:meth:`OpenAIServer.serve_in_thread`). ``server`` is the server
    (its session methods are thread-safe); :meth:`stop` stops it."""

    def __init__(self, server: OpenAIServer, *, timeout: float = 30.0) -> None:
        self.server = server
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.name = "rollstream-openai-server"
        self._thread.start()
        try:
            self._started.result(timeout)
        except concurrent.futures.TimeoutError:
            self.stop()
            raise TimeoutError(f"the server did not start listening within {timeout:g} s") from None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._started.set_exception(e)
            await self.server.stop()
            return
        self._started.set_result(None)
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    @property
    def url(self) -> str:
        """The server's base URL (see :attr:`OpenAIServer.url`)."""
        return self.server.url

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server (as :meth:`OpenAIServer.stop`) and end the thread. Idempotent."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just ended
                loop.call_soon_threadsafe(event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the server thread did not end within {timeout:g} s")

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def fetch_session(
    url: str,
    session_id: str | int,
    *,
    api_key: str | None = None,
    pop: bool = True,
    timeout: float = 30.0,
) -> list[Turn]:
    """The turns an :class:`OpenAIServer` (``rollstream serve``) recorded for
    ``session_id``, oldest first, read from another process.

    ``url`` is the server's base URL or its API root (``.../v1``, what
    ``rollstream serve`` prints); ``api_key`` the server's, when it has one.
    ``pop=True`` takes the turns (``DELETE /rollstream/sessions/<id>``): the
    server forgets them, so each turn reaches the trainer once, and later
    requests of the session start a new record (a DELETE whose answer is
    lost on the way has taken them all the same). ``pop=False`` reads them
    and leaves them (``GET``). ``timeout`` is httpx's: seconds for
    connecting and for each read and write.

    Raises :class:`LookupError` when the server has no record of the session
    (never seen, already taken, or evicted by ``max_sessions``), and
    :class:`RuntimeError` naming the HTTP status, or the transport error, for
    any other failure.
    """
    session = str(session_id)
    if not session:
        raise ValueError("session_id is empty: pass the session's X-Session-ID (or body session_id)")
    base = url.rstrip("/").removesuffix("/v1")
    # Dots escaped too: clients drop a "." or ".." path segment.
    target = f"{base}{SESSIONS_PATH}/{quote(session, safe='').replace('.', '%2E')}"
    method = "DELETE" if pop else "GET"
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    try:
        response = httpx.request(method, target, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise RuntimeError(f"{method} {target} failed: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        message, code = _error_of(response)
        if response.status_code == 404 and code == "session_not_found":
            raise LookupError(f"{base}: {message}")
        raise RuntimeError(f"{method} {target} answered HTTP {response.status_code}: {message}")
    try:
        body = response.json()
        if body["id"] != session:
            raise ValueError(f"it is the record of session {body['id']!r}")
        return [_turn_of_json(turn) for turn in body["turns"]]
    except (KeyError, TypeError, ValueError) as e:
        raise RuntimeError(
            f"{method} {target} answered HTTP 200 with something other than the session's record: "
            f"{type(e).__name__}: {e}"
        ) from e


def _error_of(response: httpx.Response) -> tuple[str, str | None]:
    """The message and code of an error response (OpenAI's shape, else its text)."""
    try:
        error = response.json()["error"]
        return str(error["message"]), error.get("code")
    except (KeyError, TypeError, ValueError, AttributeError):
        return response.text[:500] or response.reason_phrase, None
