"""One streaming attempt, awaited from asyncio.

``http://`` URLs go through the Rust client (its own threads; decoding in
Rust; one wake-up of the event loop per finished request). Other schemes
(``https://``) use httpx with the same Rust decoder, so behaviour and
results are identical, only the per-chunk cost differs.

Both return the same dict:

- success: ``{"ok": True, "status", "result", "head_s", "first_byte_s",
  "first_token_s", "total_s", "request_id"}`` where ``result`` is the decoded
  stream in the raw form :func:`rollstream.streams._result` takes;
- failure: ``{"ok": False, "kind", "message", "tokens", ...}`` with kind one
  of ``invalid``, ``connect``, ``timeout``, ``transport``, ``status`` (plus
  ``status``, ``body``, ``retry_after``), ``decode`` (plus ``truncated``,
  ``offset``) or ``cancelled``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import time
import weakref
from collections.abc import Sequence
from typing import Any

import httpx

from . import _core
from ._exceptions import StreamError, StreamTruncatedError

__all__ = ["Transport"]

Headers = Sequence[tuple[str, str]]


def _deliver(fut: asyncio.Future[dict[str, Any]], payload: dict[str, Any]) -> None:
    if not fut.done():
        fut.set_result(payload)


_LIVE: weakref.WeakSet[Transport] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Rust threads must not call into an interpreter that is finalizing: stop
    # every client, then make sure no completion callback is still running.
    for t in list(_LIVE):
        t.close()
    _core.shutdown_callbacks()


class Transport:
    """Streams POST requests; safe to share across tasks of one process."""

    def __init__(self, *, worker_threads: int = 1, connect_timeout: float = 10.0) -> None:
        self._rust = _core.StreamClient(worker_threads, connect_timeout)
        _LIVE.add(self)
        self._connect_timeout = connect_timeout
        self._httpx: httpx.AsyncClient | None = None

    @property
    def in_flight(self) -> int:
        return int(self._rust.in_flight)

    async def stream(
        self, url: str, headers: Headers, body: bytes, *, idle_timeout: float, total_timeout: float
    ) -> dict[str, Any]:
        if url.startswith("http://"):
            return await self._stream_rust(url, headers, body, idle_timeout, total_timeout)
        return await self._stream_httpx(url, headers, body, idle_timeout, total_timeout)

    async def _stream_rust(
        self, url: str, headers: Headers, body: bytes, idle_timeout: float, total_timeout: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()

        def done(payload: dict[str, Any]) -> None:
            # RuntimeError: the loop is gone, nobody waits for this result.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, fut, payload)

        handle = self._rust.submit(url, list(headers), body, idle_timeout, total_timeout, done)
        try:
            return await fut
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def _stream_httpx(
        self, url: str, headers: Headers, body: bytes, idle_timeout: float, total_timeout: float
    ) -> dict[str, Any]:
        from .streams import StreamDecoder

        if self._httpx is None:
            self._httpx = httpx.AsyncClient(
                timeout=httpx.Timeout(idle_timeout, connect=self._connect_timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            )
        t0 = time.perf_counter()
        timings = {"head_s": 0.0, "first_byte_s": 0.0, "first_token_s": 0.0}
        decoder = StreamDecoder()
        hdrs = dict(headers)
        hdrs.setdefault("content-type", "application/json")
        client = self._httpx

        async def run() -> dict[str, Any] | None:
            async with client.stream("POST", url, content=body, headers=hdrs) as resp:
                timings["head_s"] = time.perf_counter() - t0
                if resp.status_code >= 300:
                    text = (await resp.aread())[: 64 * 1024].decode("utf-8", "replace")
                    return {
                        "ok": False,
                        "kind": "status",
                        "status": resp.status_code,
                        "body": text,
                        "retry_after": resp.headers.get("retry-after"),
                        "message": f"HTTP {resp.status_code}: {text}",
                        "tokens": 0,
                    }
                async for part in resp.aiter_raw():
                    if not timings["first_byte_s"]:
                        timings["first_byte_s"] = time.perf_counter() - t0
                    decoder.feed(part)
                    if not timings["first_token_s"] and decoder.tokens:
                        timings["first_token_s"] = time.perf_counter() - t0
                meta["request_id"] = resp.headers.get("x-request-id")
                meta["status"] = resp.status_code
            return None

        meta: dict[str, Any] = {}
        try:
            early = await asyncio.wait_for(run(), total_timeout)
        except asyncio.TimeoutError:
            return _fail("timeout", f"timed out after {time.perf_counter() - t0:.1f} s", decoder)
        except httpx.ConnectError as e:
            return _fail("connect", f"cannot connect: {e}", decoder)
        except httpx.TimeoutException as e:
            return _fail("timeout", f"timed out: {e!r}", decoder)
        except httpx.HTTPError as e:
            return _fail("transport", f"connection failed mid-stream: {e!r}", decoder)
        except StreamError as e:
            out = _fail("decode", str(e), decoder)
            out.update(truncated=isinstance(e, StreamTruncatedError), offset=e.offset)
            return out
        if early is not None:
            return early
        request_id, status = meta["request_id"], meta["status"]
        tokens = decoder.tokens
        try:
            raw = decoder._inner.finish()
        except StreamError as e:
            return {
                "ok": False,
                "kind": "decode",
                "message": str(e),
                "tokens": tokens,
                "truncated": isinstance(e, StreamTruncatedError),
                "offset": e.offset,
            }
        return {
            "ok": True,
            "status": status,
            "result": raw,
            "request_id": request_id,
            "total_s": time.perf_counter() - t0,
            **timings,
        }

    async def aclose(self) -> None:
        self._rust.close()
        if self._httpx is not None:
            await self._httpx.aclose()
            self._httpx = None

    def close(self) -> None:
        self._rust.close()


def _fail(kind: str, message: str, decoder: Any) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "message": message, "tokens": decoder.tokens}
