"""Control-plane calls to the replica that served an attempt.

- sampling masks captured by rollstream's worker extension
  (``POST /collective_rpc`` ``rollstream_take_sampling_masks``), checked
  before use: a malformed reply raises :class:`SamplingMaskError` with the
  reply's bytes, never a raw ``KeyError`` or ``JSONDecodeError``;
- the server's logprobs mode (``GET /server_info``, vLLM's dev mode), read
  once per server.

httpx clients are per event loop (:class:`~rollstream._http.LoopLocal`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np

from ._exceptions import SamplingMaskError
from ._http import LoopLocal, close_clients, ssl_context
from ._models import SampledCompletion
from ._retry import server_message
from .masks import SamplingMask

__all__ = ["ControlClient", "MaskFetchFailed", "fit_mask", "parse_mask_reply"]

log = logging.getLogger("rollstream.sampler")

_HINT = (
    "On vLLM's V1 runner (e.g. the CPU build) start the server with --worker-extension-cls "
    "rollstream.vllm_ext.RollstreamWorkerExtension and VLLM_SERVER_DEV_MODE=1; on GPU, "
    "--return-sampling-mask with endpoint='generate'"
)


class MaskFetchFailed(SamplingMaskError):
    """The mask could not be fetched because the connection failed (the
    replica is unreachable), as opposed to a reply that was wrong."""


def _excerpt(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[:limit] + "..."


def _b64_array(entry: Mapping[str, Any], name: str, dtype: type[np.generic], where: str) -> np.ndarray:
    value = entry.get(name)
    if not isinstance(value, str):
        raise SamplingMaskError(
            f"{where}: field {name!r} is {type(value).__name__}, expected a base64 string",
            excerpt=_excerpt(repr(value)),
        )
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SamplingMaskError(
            f"{where}: field {name!r} is not base64 ({e})", excerpt=_excerpt(value)
        ) from e
    width = np.dtype(dtype).itemsize
    if len(raw) % width:
        raise SamplingMaskError(
            f"{where}: field {name!r} holds {len(raw)} bytes, not a whole number of {width}-byte values",
            excerpt=_excerpt(value),
        )
    return np.frombuffer(raw, dtype=dtype)


def _reply_entries(body: bytes, where: str, request_id: str | None) -> dict[str, Any]:
    """The per-key entries of a ``rollstream_take_sampling_masks`` reply."""
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise SamplingMaskError(
            f"{where} is not JSON ({e})", request_id=request_id, excerpt=_excerpt(body)
        ) from e
    results = reply.get("results") if isinstance(reply, dict) else None
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise SamplingMaskError(
            f"{where} has no per-worker results (expected {{'results': [{{key: entry}}]}})",
            request_id=request_id,
            excerpt=_excerpt(body),
        )
    return results[0]


def _entry_mask(entries: Mapping[str, Any], key: str, request_id: str, body: bytes) -> SamplingMask:
    """The mask of ``key`` among a reply's entries, checked."""
    where = f"the sampling-mask reply for {request_id}"
    if key not in entries:
        raise SamplingMaskError(
            f"{where} does not mention key {key!r}", request_id=request_id, excerpt=_excerpt(body)
        )
    entry = entries[key]
    if entry is None:
        raise SamplingMaskError(
            f"the server recorded no sampling mask for {request_id} (captured on another replica, "
            f"or evicted from the worker extension's bounded store). {_HINT}",
            request_id=request_id,
        )
    if not isinstance(entry, dict):
        raise SamplingMaskError(
            f"{where}: the entry is {type(entry).__name__}, expected an object",
            request_id=request_id,
            excerpt=_excerpt(body),
        )
    untruncated = entry.get("untruncated_rows", 0)
    if not isinstance(untruncated, int) or isinstance(untruncated, bool) or untruncated < 0:
        raise SamplingMaskError(
            f"{where}: untruncated_rows={untruncated!r} is not a count",
            request_id=request_id,
            excerpt=_excerpt(body),
        )
    if untruncated:
        raise SamplingMaskError(
            f"{untruncated} tokens of {request_id} were sampled without truncation (no top-k/top-p in "
            "effect): there is no mask to apply",
            request_id=request_id,
        )
    try:
        ids = _b64_array(entry, "token_ids", np.int32, where)
        offsets = _b64_array(entry, "offsets", np.int64, where)
        return SamplingMask(ids, offsets)
    except SamplingMaskError as e:
        e.request_id = request_id
        raise
    except ValueError as e:  # SamplingMask's own consistency checks
        raise SamplingMaskError(
            f"{where} is inconsistent: {e}", request_id=request_id, excerpt=_excerpt(body)
        ) from e


def parse_mask_reply(body: bytes, key: str, request_id: str) -> SamplingMask:
    """The mask of ``key`` in a ``/collective_rpc`` reply, or a
    :class:`SamplingMaskError` saying what is wrong with the reply."""
    entries = _reply_entries(body, f"the sampling-mask reply for {request_id}", request_id)
    return _entry_mask(entries, key, request_id, body)


#: Masks of attempts that finish within this many seconds of each other on
#: one server are fetched with one request (a step's hundreds of samples
#: would otherwise cost hundreds of control calls).
COALESCE_S = 0.005
#: At most this many keys per request.
MAX_KEYS = 256


class _Batch:
    __slots__ = ("flushing", "waiters")

    def __init__(self) -> None:
        self.waiters: dict[str, tuple[asyncio.Future[SamplingMask], str]] = {}
        self.flushing = False


def fit_mask(mask: SamplingMask, c: SampledCompletion) -> SamplingMask:
    """``mask`` checked against the completion it belongs to: a row per
    returned token (rows of tokens a stop string cut off are dropped), each
    containing its sampled token."""
    if mask.rows < c.completion_len:
        raise SamplingMaskError(
            f"the sampling mask of {c.request_id} has {mask.rows} rows for {c.completion_len} tokens",
            request_id=c.request_id,
        )
    if mask.rows > c.completion_len:
        end = c.completion_len
        mask = SamplingMask(mask.token_ids[: mask.offsets[end]], mask.offsets[: end + 1])
    if not mask.contains(c.completion_ids).all():
        raise SamplingMaskError(
            f"the sampling mask of {c.request_id} does not contain its sampled tokens",
            request_id=c.request_id,
        )
    return mask


#: The logprobs mode of each server URL, as it reported it (None: it did
#: not say); a server's flags do not change while it runs, so once per process.
_LOGPROBS_MODES: dict[str, str | None] = {}
_LOOKUP_LOCK = threading.Lock()


class ControlClient:
    """Control-plane requests to the servers a sampler uses."""

    def __init__(self, headers: Mapping[str, str], timeout: float = 60.0) -> None:
        # identity: vLLM does not compress these replies, and setting up
        # httpx's decoders costs about a millisecond per response.
        self._headers = {"accept-encoding": "identity", **headers}
        self._timeout = timeout
        self._clients: LoopLocal[httpx.AsyncClient] = LoopLocal(self._new_client)
        self._lookups: dict[tuple[Any, str], asyncio.Task[str | None]] = {}
        self._batches: dict[tuple[asyncio.AbstractEventLoop, str], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _new_client(self) -> httpx.AsyncClient:
        # No idle connections: they would outlive an event loop that ends
        # (asyncio.run per *_sync call) with nobody left to close them. One
        # connection per control call costs far less than the generation
        # it follows.
        return httpx.AsyncClient(
            timeout=self._timeout,
            headers=self._headers,
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=ssl_context(),
        )

    async def take_mask(self, base_url: str, key: str, request_id: str) -> SamplingMask:
        """The sampling mask captured under ``key`` on the server at
        ``base_url``. Calls that arrive together are fetched together."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get((loop, base_url))
        if batch is None or batch.flushing:
            batch = self._batches[(loop, base_url)] = _Batch()
            loop.call_later(COALESCE_S, self._flush_soon, loop, base_url, batch)
        fut: asyncio.Future[SamplingMask] = loop.create_future()
        batch.waiters[key] = (fut, request_id)
        if len(batch.waiters) >= MAX_KEYS:
            self._flush_soon(loop, base_url, batch)
        return await fut

    def _flush_soon(self, loop: asyncio.AbstractEventLoop, base_url: str, batch: _Batch) -> None:
        if batch.flushing:
            return
        batch.flushing = True
        if self._batches.get((loop, base_url)) is batch:
            del self._batches[(loop, base_url)]
        task = loop.create_task(self._fetch(base_url, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, base_url: str, batch: _Batch) -> None:
        waiters = batch.waiters
        first = next(iter(waiters.values()))[1]
        label = first if len(waiters) == 1 else f"{first} (and {len(waiters) - 1} more)"
        try:
            try:
                r = await self._clients.get().post(
                    base_url + "/collective_rpc",
                    json={"method": "rollstream_take_sampling_masks", "kwargs": {"keys": list(waiters)}},
                )
            except httpx.HTTPError as e:
                raise MaskFetchFailed(
                    f"fetching the sampling masks of {label} from {base_url} failed: {e!r}", request_id=first
                ) from e
            if r.status_code >= 300:
                raise SamplingMaskError(
                    f"the server at {base_url} returned no sampling mask for {label} and cannot provide one "
                    f"(HTTP {r.status_code}: {server_message(r.text)}). {_HINT}",
                    request_id=first,
                    excerpt=_excerpt(r.content),
                )
            entries = _reply_entries(r.content, f"the sampling-mask reply for {label}", first)
        except BaseException as e:
            for fut, _ in waiters.values():
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for key, (fut, request_id) in waiters.items():
            if fut.done():
                continue
            try:
                fut.set_result(_entry_mask(entries, key, request_id, r.content))
            except SamplingMaskError as e:
                fut.set_exception(e)

    @staticmethod
    def known_logprobs_mode(base_url: str) -> tuple[bool, str | None]:
        """(whether the mode of ``base_url`` was looked up, the mode)."""
        with _LOOKUP_LOCK:
            if base_url in _LOGPROBS_MODES:
                return True, _LOGPROBS_MODES[base_url]
        return False, None

    async def logprobs_mode(self, base_url: str) -> str | None:
        """The server's ``--logprobs-mode`` as it reports it (vLLM's
        ``/server_info``, dev mode only); None when it does not say. Looked up
        once per server and process: concurrent callers on one loop share the
        lookup (the server computes its environment report on the first call)."""
        known, mode = self.known_logprobs_mode(base_url)
        if known:
            return mode
        loop = asyncio.get_running_loop()
        with _LOOKUP_LOCK:
            task = self._lookups.get((loop, base_url))
            if task is None or (task.done() and task.cancelled()):
                task = self._lookups[(loop, base_url)] = loop.create_task(self._lookup_mode(base_url))
        return await asyncio.shield(task)

    async def _lookup_mode(self, base_url: str) -> str | None:
        mode: str | None = None
        try:
            r = await self._clients.get().get(base_url + "/server_info", params={"config_format": "json"})
            if r.status_code == 200:
                config = r.json().get("vllm_config")
                model_config = config.get("model_config") if isinstance(config, dict) else None
                value = model_config.get("logprobs_mode") if isinstance(model_config, dict) else None
                mode = value if isinstance(value, str) else None
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            log.debug("cannot read the logprobs mode of %s: %r", base_url, e)
        with _LOOKUP_LOCK:
            _LOGPROBS_MODES[base_url] = mode
            self._lookups = {k: t for k, t in self._lookups.items() if k[1] != base_url}
        return mode

    def close(self) -> None:
        for client in close_clients(self._clients.take_all()):
            asyncio.get_running_loop().create_task(client.aclose())

    async def aclose(self) -> None:
        for client in close_clients(self._clients.take_all()):
            await client.aclose()
