"""DeploymentSampler: chat messages or token ids in, n samples out, from vLLM.

Names, signatures and results follow the Fireworks training SDK's
``DeploymentSampler`` (so a trainer switches by changing an import); the
protocol is vLLM's and the SDK's known flaws are fixed:

- tokenization is client-side in Rust (:class:`~rollstream.ChatTokenizer`),
  GIL released, never transformers on the event loop;
- ``n`` samples are ``n`` streaming requests with their own ``X-Request-Id``
  (stable across retries) and their own seed (:func:`sample_seed`: distinct
  calls never share a sample), streamed and decoded in Rust; Python wakes
  once per finished sample;
- a failed attempt is retried alone when retrying can help (jittered
  back-off, ``Retry-After`` honoured, a total deadline per logical request,
  no concurrency slot held while sleeping) and fails at once when it cannot
  (4xx, malformed replies); a terminal failure cancels the siblings and
  names what failed and which samples completed;
- ``max_seq_len`` clamps ``max_tokens`` so no generation is wasted;
- integer stop ids go to vLLM as ``stop_token_ids``; unset ``top_p``/
  ``top_k``/``min_p`` are sent explicitly so server defaults never leak in;
- ``finish_reason="abort"`` (the server paused with ``mode=abort``) is
  retried, not returned as a sample;
- API keys never appear in reprs, logs or exceptions.

The mechanisms live beside this module: request bodies per endpoint
(``_endpoints``), call options (``_options``), retry classification
(``_retry``), result mapping (``_results``), control-plane calls such as
sampling masks (``_control``), where each attempt goes (``_pool``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import uuid
import warnings
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ._control import ControlClient, MaskFetchFailed, fit_mask
from ._endpoints import ENDPOINTS, SampleParams, encode, sample_seed
from ._exceptions import (
    DeadlineExceededError,
    SamplingError,
    SamplingMaskError,
    SamplingRequestError,
    TransportClosedError,
)
from ._http import Transport
from ._models import (
    SampledCompletion,
    SampledRequestResult,
    SampledServerAttempt,
    SamplerMetrics,
    ServerMetrics,
)
from ._options import CallOptions
from ._pool import EndpointPool, Route, pool_for
from ._results import (
    PROCESSED,
    ReplyMismatch,
    Wanted,
    completion,
    failure_metrics,
    join_pieces,
    response_dict,
    success_metrics,
)
from ._retry import (
    RetryPolicy,
    Verdict,
    aborted,
    classify_failure,
    classify_stream_error,
    deadline_error,
    protocol_error,
    terminal_error,
    timeout_diagnostic,
)
from .concurrency import AdaptiveConcurrencyController, FixedConcurrencyController, check_controller
from .streams import StreamResult, _result
from .tokenizer import ChatTokenizer, Message

__all__ = [
    "DeploymentSampler",
    "RetryPolicy",
    "SampledCompletion",
    "SampledRequestResult",
    "SampledServerAttempt",
    "SamplerMetrics",
    "SamplerTimeouts",
    "ServerMetrics",
    "sample_seed",
]

log = logging.getLogger("rollstream.sampler")

T = TypeVar("T")

#: Attempt records kept between :meth:`DeploymentSampler.drain_metrics` calls.
RECENT_METRICS_MAX = 65_536
#: Recent records kept for timeout diagnostics, and how long they count.
DIAGNOSTIC_METRICS_MAX = 32
DIAGNOSTIC_MAX_AGE_S = 600.0


@dataclass(frozen=True)
class SamplerTimeouts:
    """All timeouts in seconds. ``request`` bounds one logical request across
    all its retries; ``attempt`` one try; ``idle`` the silence between stream
    chunks (includes waiting in the server's queue before the first one; a
    call's ``http_timeout`` replaces it)."""

    connect: float = 10.0
    idle: float = 600.0
    attempt: float = 1800.0
    request: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("connect", "idle", "attempt", "request"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SamplerTimeouts.{name}={value!r} must be a positive number of seconds")


class _NoController:
    """Stands in for the concurrency controller where the SDK uses none
    (``async_completions_stream``)."""

    async def acquire(self) -> None:
        return None

    def release(self, metrics: ServerMetrics | None = None) -> None:
        return None


@dataclass
class _Attempt:
    """What one attempt produced."""

    index: int
    completion: SampledCompletion | None = None
    verdict: Verdict | None = None
    result: StreamResult | None = None
    #: The attempt's record (:meth:`DeploymentSampler.drain_metrics`).
    metrics: ServerMetrics | None = None
    #: What the concurrency controller is told (None: nothing it should react to).
    feedback: ServerMetrics | None = None
    response_request_id: str | None = None
    transport_ok: bool = True

    def record(self) -> SampledServerAttempt:
        v = self.verdict
        outcome: Literal["succeeded", "retryable_error", "failed"] = (
            "succeeded" if v is None else ("retryable_error" if v.retry else "failed")
        )
        return SampledServerAttempt(
            index=self.index,
            outcome=outcome,
            status_code=self.metrics.http_status_code if self.metrics is not None else None,
            error_kind=None if v is None else v.kind,
            response_request_id=self.response_request_id,
            upstream_response_id=self.result.request_id if self.result is not None else None,
            server_metrics=self.metrics,
        )


def _run_sync(coro: Coroutine[Any, Any, T], transport: Transport) -> T:
    """``coro`` on a fresh event loop; what the transport kept for that loop
    is closed before the loop ends."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError(
            "the *_sync methods cannot run inside an event loop; await the async method instead"
        )

    async def scoped() -> T:
        try:
            return await coro
        finally:
            await transport.release_loop()

    return asyncio.run(scoped())


def _continued(params: SampleParams, generated: int) -> SampleParams:
    """The request that continues a generation after ``generated`` tokens."""
    if not generated:
        return params
    extra = dict(params.extra)
    min_tokens = extra.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool):
        extra["min_tokens"] = max(0, min_tokens - generated)
    return replace(params, max_tokens=max(1, params.max_tokens - generated), extra=extra)


def _check_prompt(ids: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"prompt_token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        out = cast("list[int]", ids.tolist())
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"prompt_token_ids must be a sequence of ints, got {type(ids).__name__}")
    else:
        out = list(ids)
        for i, x in enumerate(out):
            if not isinstance(x, (int, np.integer)) or isinstance(x, bool):
                raise TypeError(f"prompt_token_ids[{i}] is {x!r}, not an int")
        out = [int(x) for x in out]
    if not out:
        raise ValueError("prompt_token_ids is empty")
    if min(out) < 0:
        raise ValueError(f"prompt_token_ids contains a negative id ({min(out)})")
    return out


class DeploymentSampler:
    """Samples from a vLLM deployment (OpenAI-compatible server).

    ``inference_url`` is the server's base URL (``http://host:8000``);
    ``model`` the served model name. ``tokenizer`` is a
    :class:`ChatTokenizer`, a model path or a transformers tokenizer
    (converted once). ``request_context`` (``session``, ``run``,
    ``checkpoint``, ``step``, ``group``, ``item``) is attached to every
    sampling error, merged with a call's ``sampling_context``. ``endpoint``
    chooses ``"completions"`` (``/v1/completions``: per-request queue metrics
    for AIMD, echo) or ``"generate"`` (``/inference/v1/generate``: weight
    versions, sampling masks, routed experts while streaming). ``pool``
    decides where each attempt goes (:mod:`rollstream._pool`; default: the
    one server at ``inference_url``).

    Use as ``with DeploymentSampler(...) as s:`` or ``async with``, or call
    :meth:`close` / :meth:`aclose`. Any event loop may use it, one after the
    other or at once (``asyncio.run`` per ``*_sync`` call included).
    """

    def __init__(
        self,
        inference_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: ChatTokenizer | Any = None,
        concurrency_controller: Any = None,
        max_concurrency: int | None = None,
        additional_headers: Mapping[str, str] | None = None,
        timeout: SamplerTimeouts | float | None = None,
        *,
        request_context: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        endpoint: Literal["completions", "generate"] = "completions",
        transport: Transport | None = None,
        pool: EndpointPool | None = None,
    ) -> None:
        if pool is None:
            pool = pool_for(inference_url, model)
        elif not isinstance(pool, EndpointPool):
            raise TypeError(f"pool={pool!r} has no async acquire(session) / release(route, ok=...)")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be 'completions' or 'generate', got {endpoint!r}")
        if request_context is not None and not isinstance(request_context, Mapping):
            raise TypeError(f"request_context must be a mapping, got {type(request_context).__name__}")
        self.inference_url = inference_url.rstrip("/") if isinstance(inference_url, str) else inference_url
        self.model = model
        self._api_key = api_key
        self.tokenizer: ChatTokenizer | None = (
            ChatTokenizer.coerce(tokenizer) if tokenizer is not None else None
        )
        if max_concurrency is not None:
            warnings.warn(
                "max_concurrency is deprecated; pass concurrency_controller=FixedConcurrencyController(n)",
                DeprecationWarning,
                stacklevel=2,
            )
            if concurrency_controller is None:
                concurrency_controller = FixedConcurrencyController(max_concurrency)
        self.concurrency_controller = (
            concurrency_controller if concurrency_controller is not None else AdaptiveConcurrencyController()
        )
        self.additional_headers: dict[str, str] | None = (
            dict(additional_headers) if additional_headers is not None else None
        )
        self._request_context = dict(request_context) if request_context is not None else None
        if timeout is None:
            timeout = SamplerTimeouts()
        elif not isinstance(timeout, SamplerTimeouts):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be SamplerTimeouts or seconds, got {timeout!r}")
            timeout = SamplerTimeouts(attempt=float(timeout), request=max(float(timeout), 1.0) * 2)
        self.timeouts: SamplerTimeouts = timeout
        self.retry = retry or RetryPolicy()
        self.endpoint = endpoint
        self._endpoint = ENDPOINTS[endpoint]
        self._pool: EndpointPool = pool
        self._transport = transport or Transport(connect_timeout=self.timeouts.connect)
        self._own_transport = transport is None
        auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._control = ControlClient(auth)
        self._counters = SamplerMetrics()
        self._lock = threading.Lock()
        self._recent: collections.deque[ServerMetrics] = collections.deque(maxlen=RECENT_METRICS_MAX)
        self._diagnostic: collections.deque[tuple[float, ServerMetrics]] = collections.deque(
            maxlen=DIAGNOSTIC_METRICS_MAX
        )
        self._warned_modes: set[str] = set()
        self._closed = False
        #: How sampling masks reach this sampler: "native" (vLLM's
        #: --return-sampling-mask), "plugin" (rollstream's worker extension),
        #: or None until the first sample with sampling_mask=True.
        self.mask_path: str | None = None

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (
            f"DeploymentSampler(inference_url={self.inference_url!r}, model={self.model!r}, "
            f"endpoint={self.endpoint!r}, api_key=<{key}>, pool={self._pool!r}, "
            f"controller={self.concurrency_controller!r})"
        )

    # -- the SDK's attributes ---------------------------------------------------

    @property
    def base_url(self) -> str:
        """The SDK's name of ``inference_url``."""
        return str(self.inference_url)

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @property
    def concurrency_controller(self) -> Any:
        """The controller of later requests (rollstream's or the SDK's:
        anything with ``window_size``, ``async acquire()``,
        ``release(metrics=None)`` and ``step_completed()``)."""
        return self._controller

    @concurrency_controller.setter
    def concurrency_controller(self, controller: Any) -> None:
        self._controller = check_controller(controller)

    # -- lifetime -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the sampler: requests in flight fail with
        :class:`TransportClosedError`, and so do later calls."""
        self._closed = True
        self._control.close()
        if self._own_transport:
            self._transport.close()

    async def aclose(self) -> None:
        self._closed = True
        await self._control.aclose()
        if self._own_transport:
            await self._transport.aclose()

    def __enter__(self) -> DeploymentSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> DeploymentSampler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- metrics --------------------------------------------------------------------

    @property
    def metrics(self) -> SamplerMetrics:
        """A snapshot of rollstream's counters (requests, samples, retries by
        reason, drops, clamps...)."""
        with self._lock:
            return replace(self._counters, retry_reasons=dict(self._counters.retry_reasons))

    def drain_counters(self) -> SamplerMetrics:
        """rollstream's counters since the last drain, resetting them."""
        with self._lock:
            out, self._counters = self._counters, SamplerMetrics()
        return out

    def drain_metrics(self) -> list[ServerMetrics]:
        """The SDK's per-attempt records since the last drain (one per
        completed or failed attempt, cancelled ones excluded; at most the
        newest 65,536), clearing them."""
        with self._lock:
            out = list(self._recent)
            self._recent.clear()
        return out

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self._counters, k, getattr(self._counters, k) + v)

    def _record(self, m: ServerMetrics) -> None:
        with self._lock:
            self._recent.append(m)
            if m.prefill_queue_duration is not None or m.client_ttft is not None:
                self._diagnostic.append((time.monotonic(), m))

    # -- public API -------------------------------------------------------------------

    async def sample_with_tokens(
        self,
        messages: Sequence[Message],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[SampledCompletion]:
        """Render ``messages`` with the chat template, tokenize client-side and
        sample ``n`` completions. See :meth:`sample_with_prompt_tokens`."""
        if self.tokenizer is None:
            raise ValueError("sample_with_tokens needs a tokenizer: DeploymentSampler(..., tokenizer=...)")
        prompt = self.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            tools=tools,
            **dict(chat_template_kwargs or {}),
        )
        return await self.sample_with_prompt_tokens(
            prompt, n=n, max_tokens=max_tokens, temperature=temperature, max_seq_len=max_seq_len, **kwargs
        )

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int] | npt.NDArray[np.integer[Any]],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        stop: Sequence[str | int] | str | int | None = None,
        prompt_cache_key: str | None = None,
        additional_headers_snapshot: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> list[SampledCompletion]:
        """Sample ``n`` completions of a tokenized prompt.

        ``max_seq_len``: a prompt of that many tokens or more returns ``[]``;
        otherwise ``max_tokens`` is clamped to ``max_seq_len - len(prompt)``
        (both counted in :attr:`metrics`). ``stop`` mixes strings and token
        ids (ids go to ``stop_token_ids``). ``prompt_cache_key`` keeps a
        session on one replica (the pool's ``session``). Keyword arguments:
        ``logprobs``, ``top_logprobs``, ``echo`` / ``echo_last`` (prompt
        logprobs, training-aligned), ``top_p``, ``top_k``, ``min_p``,
        ``seed`` (per sample :func:`sample_seed`), ``sampling_mask`` (the
        kept token ids of every sampled token; needs top-k or top-p, see
        :mod:`rollstream.masks`), the SDK's ``http_timeout``,
        ``include_routing_matrix``, ``prompt_cache_max_len``,
        ``sampling_context``, ``timeout_diagnostic_context``; anything else
        goes into the request body verbatim.
        """
        prompt = _check_prompt(prompt_token_ids)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        opts = self._options(
            max_tokens, temperature, max_seq_len, stop, prompt_cache_key, additional_headers_snapshot, kwargs
        )
        self._count(requests=1)
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            log.debug("prompt of %d tokens reaches max_seq_len=%d: no request", len(prompt), max_seq_len)
            self._count(dropped_prompt_too_long=n)
            return []
        opts, clamped = opts.clamped(len(prompt))
        if clamped:
            self._count(max_tokens_clamped=1)
        call_id = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + self.timeouts.request
        results = await self._fan_out(
            [self._sample(prompt, opts, f"{call_id}-{i}", i, deadline) for i in range(n)], call_id
        )
        return [c for r in results for c in r.completions]

    async def sample_with_prompt_tokens_result(
        self,
        prompt_token_ids: Sequence[int] | npt.NDArray[np.integer[Any]],
        *,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        stop: Sequence[str | int] | str | int | None = None,
        prompt_cache_key: str | None = None,
        additional_headers_snapshot: Mapping[str, str] | None = None,
        logical_request_id: str | None = None,
        **kwargs: Any,
    ) -> SampledRequestResult:
        """Sample one completion of an exact prompt and return the request's
        attributable facts: its attempts, their server metrics, its id
        (``logical_request_id``, sent as ``X-Request-Id``)."""
        prompt = _check_prompt(prompt_token_ids)
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            raise ValueError(
                f"prompt_token_ids ({len(prompt)} tokens) already exhaust max_seq_len={max_seq_len}"
            )
        opts = self._options(
            max_tokens, temperature, max_seq_len, stop, prompt_cache_key, additional_headers_snapshot, kwargs
        )
        self._count(requests=1)
        opts, clamped = opts.clamped(len(prompt))
        if clamped:
            self._count(max_tokens_clamped=1)
        logical_id = logical_request_id or uuid.uuid4().hex
        result = await self._sample(prompt, opts, logical_id, 0, time.monotonic() + self.timeouts.request)
        return result

    async def async_completions_stream(
        self,
        prompt: Sequence[int],
        max_tokens: int = 1024,
        temperature: float = 1.0,
        hotload_retry_interval: float = 5.0,
        hotload_max_retries: int = 10,
        logical_request_id: str | None = None,
        prompt_cache_key: str | None = None,
        additional_headers_snapshot: Mapping[str, str] | None = None,
        r3_ttl_seconds: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], ServerMetrics]:
        """One streaming request (the SDK's low-level call): the assembled
        response in the SDK's form (``choices[0]`` with ``text``,
        ``finish_reason``, ``raw_output.completion_token_ids``,
        ``logprobs.content``) and its :class:`ServerMetrics`. No concurrency
        slot, no retries except while the server answers 425 (not ready),
        every ``hotload_retry_interval`` seconds up to ``hotload_max_retries``
        times. Errors raise like the sampling calls."""
        ids = _check_prompt(prompt)
        if r3_ttl_seconds is not None:
            kwargs["r3_ttl_seconds"] = r3_ttl_seconds
        opts = self._options(
            max_tokens,
            temperature,
            None,
            kwargs.pop("stop", None),
            prompt_cache_key,
            additional_headers_snapshot,
            kwargs,
        )
        logical_id = logical_request_id or uuid.uuid4().hex
        params = opts.params(len(ids), 0)
        body = self._endpoint.body(self.model, ids, params)
        headers = self._request_headers(logical_id, opts)
        records: list[SampledServerAttempt] = []
        deadline = time.monotonic() + self.timeouts.request
        for retry in range(hotload_max_retries + 1):
            payload = self._payload(body, opts, logical_id, retry + 1)
            a = await self._attempt(
                ids, payload, headers, opts, logical_id, retry + 1, deadline, _NoController()
            )
            records.append(a.record())
            if a.completion is not None and a.result is not None and a.metrics is not None:
                return response_dict(a.result, a.completion), a.metrics
            assert a.verdict is not None
            if a.verdict.status == 425 and retry < hotload_max_retries:
                log.info("server not ready (HTTP 425), retry %d/%d", retry + 1, hotload_max_retries)
                await asyncio.sleep(hotload_retry_interval)
                continue
            raise self._terminal(a.verdict, logical_id, records, opts, len(ids), exhausted=False)
        raise AssertionError("unreachable")

    async def sample_batch(
        self,
        list_of_messages: Sequence[Sequence[Message]],
        n: int = 1,
        *,
        progress: bool = False,
        **kwargs: Any,
    ) -> list[list[SampledCompletion]]:
        """Sample every conversation; all are submitted at once and the
        concurrency controller keeps the server's pipeline full. Results are in
        input order. ``progress=True`` shows a tqdm bar over prompts."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(list_of_messages), desc="sampling", unit="prompt")

        async def run(msgs: Sequence[Message]) -> list[SampledCompletion]:
            try:
                return await self.sample_with_tokens(msgs, n=n, **kwargs)
            finally:
                if bar is not None:
                    bar.update(1)

        try:
            return await asyncio.gather(*(run(m) for m in list_of_messages))
        finally:
            if bar is not None:
                bar.close()

    def sample_with_tokens_sync(self, messages: Sequence[Message], **kwargs: Any) -> list[SampledCompletion]:
        """Blocking :meth:`sample_with_tokens` for scripts (not inside a running loop)."""
        return _run_sync(self.sample_with_tokens(messages, **kwargs), self._transport)

    def sample_with_prompt_tokens_sync(
        self, prompt_token_ids: Sequence[int], **kwargs: Any
    ) -> list[SampledCompletion]:
        return _run_sync(self.sample_with_prompt_tokens(prompt_token_ids, **kwargs), self._transport)

    def sample_batch_sync(
        self, list_of_messages: Sequence[Sequence[Message]], **kwargs: Any
    ) -> list[list[SampledCompletion]]:
        return _run_sync(self.sample_batch(list_of_messages, **kwargs), self._transport)

    # -- the sampling flow ---------------------------------------------------------------

    def _options(
        self,
        max_tokens: int,
        temperature: float,
        max_seq_len: int | None,
        stop: Sequence[str | int] | str | int | None,
        prompt_cache_key: str | None,
        headers_snapshot: Mapping[str, str] | None,
        kwargs: dict[str, Any],
    ) -> CallOptions:
        if self._closed:
            raise TransportClosedError(f"{self!r} is closed")
        opts = CallOptions.parse(
            max_tokens=max_tokens,
            temperature=temperature,
            max_seq_len=max_seq_len,
            stop=stop,
            prompt_cache_key=prompt_cache_key,
            additional_headers_snapshot=headers_snapshot,
            request_context=self._request_context,
            kwargs=kwargs,
        )
        if opts.echo_wanted and not self._endpoint.supports_prompt_logprobs:
            raise ValueError(
                f"echo=True/echo_last need prompt logprobs, which endpoint={self.endpoint!r} does not stream "
                "in a form rollstream decodes: use DeploymentSampler(..., endpoint='completions') for echoed "
                "logprobs"
            )
        return opts

    async def _fan_out(
        self, coros: list[Coroutine[Any, Any, SampledRequestResult]], call_id: str
    ) -> list[SampledRequestResult]:
        """Run the samples of one call; the first failure cancels the others
        and is raised naming the whole call (with what had completed)."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        completed = [
            c
            for t in tasks
            if t.done() and not t.cancelled() and t.exception() is None
            for c in t.result().completions
        ]
        first = failed[0].exception()
        assert first is not None
        index = tasks.index(failed[0])
        self._count(failures=1)
        msg = (
            f"sample {index} of request {call_id} failed ({first}); "
            f"{len(completed)} of {len(tasks)} samples had completed, the others were cancelled"
        )
        if isinstance(first, SamplingRequestError):
            raise first.with_context(msg, completed=completed) from first
        raise SamplingError(msg, request_id=f"{call_id}-{index}", completed=completed) from first

    def _request_headers(self, request_id: str, opts: CallOptions) -> list[tuple[str, str]]:
        extra = opts.headers_snapshot if opts.headers_snapshot is not None else self.additional_headers
        headers = [
            (k, v) for k, v in (extra or {}).items() if k.lower() not in ("authorization", "x-request-id")
        ]
        if self._api_key:
            headers.append(("authorization", f"Bearer {self._api_key}"))
        headers.append(("x-request-id", request_id))
        return headers

    def _payload(self, body: dict[str, Any], opts: CallOptions, logical_id: str, attempt: int) -> bytes:
        if opts.sampling_mask:
            # A fresh capture key per attempt: a retry never mixes rows of two attempts.
            body = self._endpoint.with_mask_key(body, f"{logical_id}.{attempt}")
        return encode(body)

    async def _sample(
        self, prompt: list[int], opts: CallOptions, logical_id: str, index: int, deadline: float
    ) -> SampledRequestResult:
        """One logical request (one sample): attempts until one succeeds, a
        failure is final, or the attempts or the deadline run out.

        A generation the server aborts (``/pause?mode=abort``, an engine
        taken away) is continued, not restarted: the next attempt sends the
        prompt plus the tokens generated so far with ``max_tokens`` reduced,
        and the pieces are joined into one sample (ids, logprobs, masks,
        weight-version spans per token, text decoded from the ids).
        Continuations do not use up the retry budget."""
        started = time.monotonic()
        params = opts.params(len(prompt), index)
        headers = self._request_headers(logical_id, opts)
        records: list[SampledServerAttempt] = []
        pieces: list[SampledCompletion] = []
        generated = 0
        failures = 0
        last: Verdict | None = None
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() >= deadline:
                raise self._deadline_error(logical_id, records, opts, last)
            sent = prompt if not pieces else prompt + [t for p in pieces for t in p.completion_ids.tolist()]
            body = self._endpoint.body(self.model, sent, _continued(params, generated))
            payload = self._payload(body, opts, logical_id, attempt)
            try:
                a = await self._attempt(
                    sent, payload, headers, opts, logical_id, attempt, deadline, self._controller
                )
            except asyncio.CancelledError as e:
                records.append(SampledServerAttempt(index=attempt, outcome="cancelled"))
                e.server_attempts = tuple(records)  # type: ignore[attr-defined]
                raise
            records.append(a.record())
            v = a.verdict
            if a.completion is not None and v is not None and v.reason == "abort":
                # Keep what was generated; the next attempt continues from it.
                pieces.append(a.completion)
                generated += a.completion.completion_len
                with self._lock:
                    self._counters.continued_tokens += a.completion.completion_len
                    self._counters.retries += 1
                    self._counters.retry_reasons["abort"] = self._counters.retry_reasons.get("abort", 0) + 1
                last = v
                continue
            if a.completion is not None:
                c = a.completion
                if pieces:
                    c = join_pieces(prompt, [*pieces, c], self._decoder())
                kept = [c]
                if opts.max_seq_len is not None and len(c.full_tokens) > opts.max_seq_len:
                    self._count(dropped_over_length=1)
                    kept = []
                return SampledRequestResult(
                    completions=kept,
                    server_metrics=a.metrics,
                    logical_request_id=logical_id,
                    attempts=attempt,
                    wall_seconds=time.monotonic() - started,
                    upstream_response_id=a.result.request_id if a.result is not None else None,
                    server_attempts=tuple(records),
                )
            assert v is not None
            last = v
            failures += 1
            if not v.retry or failures >= self.retry.max_attempts:
                notify = getattr(self._controller, "note_retry_exhausted", None)
                if callable(notify):
                    notify(a.feedback)
                raise self._terminal(v, logical_id, records, opts, len(prompt), exhausted=v.retry)
            with self._lock:
                self._counters.retries += 1
                self._counters.retry_reasons[v.reason] = self._counters.retry_reasons.get(v.reason, 0) + 1
            if v.reason == "abort":
                continue  # a pause: the pool holds the next attempt, the engine queues it
            delay = min(self.retry.delay(failures - 1, v.retry_after), max(0.0, deadline - time.monotonic()))
            log.info(
                "request %s attempt %d failed (%s); retrying in %.2f s", logical_id, attempt, v.message, delay
            )
            await asyncio.sleep(delay)  # no concurrency slot held while sleeping

    def _decoder(self) -> Any:
        tok = self.tokenizer
        if tok is None:
            return None
        return lambda ids: tok.decode(ids, skip_special_tokens=True)

    async def _attempt(
        self,
        prompt: list[int],
        payload: bytes,
        headers: list[tuple[str, str]],
        opts: CallOptions,
        logical_id: str,
        attempt: int,
        deadline: float,
        controller: Any,
    ) -> _Attempt:
        """One try: a concurrency slot, then a route, the stream, the reply
        checked and mapped, the sampling mask from the same route; the route
        and the slot are released exactly once, whatever happens."""
        a = _Attempt(index=attempt)
        await controller.acquire()
        try:
            route = await self._pool.acquire(opts.session)
            mode_lookup = None
            if opts.want_logprobs and not self._control.known_logprobs_mode(route.url)[0]:
                # Once per server: what kind of logprobs it returns, looked up
                # while it generates (its first answer takes a second or so).
                mode_lookup = asyncio.ensure_future(self._control.logprobs_mode(route.url))
            try:
                remaining = max(deadline - time.monotonic(), 1e-3)
                idle = opts.http_timeout if opts.http_timeout is not None else self.timeouts.idle
                self._count(attempts=1)
                outcome = await self._transport.stream(
                    route.url + self._endpoint.path,
                    headers,
                    payload,
                    idle_timeout=min(idle, remaining),
                    total_timeout=min(self.timeouts.attempt, remaining),
                )
                if not outcome.ok and outcome.kind == "cancelled":
                    raise asyncio.CancelledError()
                await self._judge(a, prompt, outcome, opts, logical_id, route, mode_lookup)
                if a.completion is not None and opts.sampling_mask:
                    await self._attach_mask(a, route, f"{logical_id}.{attempt}")
            finally:
                if mode_lookup is not None and not mode_lookup.done():
                    mode_lookup.cancel()  # the shared lookup itself goes on
                self._pool.release(route, ok=a.transport_ok)
        finally:
            controller.release(a.feedback)
        if a.metrics is not None:
            self._record(a.metrics)
        return a

    async def _judge(
        self,
        a: _Attempt,
        prompt: list[int],
        outcome: Any,
        opts: CallOptions,
        logical_id: str,
        route: Route,
        mode_lookup: asyncio.Future[str | None] | None,
    ) -> None:
        """Fill ``a`` from the transport's outcome: a completion, or a verdict."""
        v: Verdict | None
        if not outcome.ok:
            v = classify_failure(outcome)
            a.verdict = v
            a.transport_ok = not v.transport_error
            a.metrics = failure_metrics(
                outcome,
                transport_error=v.transport_error,
                error=v.message[:200],
                attempt=a.index,
                route_url=route.url,
            )
            # The controller reacts to overload and to failures below HTTP,
            # not to replies that were wrong (as the SDK does).
            if v.transport_error or (v.retry and v.status is not None):
                a.feedback = a.metrics
            return
        result = _result(outcome.result)
        a.result = result
        a.response_request_id = outcome.request_id
        tokens = sum(len(c) for c in result.choices)
        metrics = success_metrics(
            outcome,
            result,
            prompt_len=len(prompt),
            completion_len=tokens,
            attempt=a.index,
            route_url=route.url,
        )
        a.metrics = a.feedback = metrics
        v = None
        partial = False
        if result.error is not None:
            v = classify_stream_error(result.error)
            a.metrics = a.feedback = replace(
                metrics, http_status_code=v.status or outcome.status, error=v.message[:200]
            )
        elif len(result.choices) != 1:
            v = protocol_error(f"expected 1 choice in the stream, got {len(result.choices)}")
        elif result.choices[0].finish_reason == "abort":
            self._count(aborted_retried=1)
            if opts.echo_wanted or len(result.choices[0]) == 0:
                v = aborted(len(result.choices[0]))  # nothing to continue from: sent again
            else:
                partial = True
        elif result.choices[0].finish_reason is None:
            v = protocol_error("the stream ended with [DONE] but without a finish_reason")
        if v is not None:
            a.verdict = v
            if a.metrics.error is None:
                a.metrics = replace(a.metrics, error=v.message[:200])
            return
        mode = None
        if opts.want_logprobs:
            if mode_lookup is not None:
                mode = await mode_lookup
            else:
                known, mode = self._control.known_logprobs_mode(route.url)
                if not known:  # looked up by another attempt since this one started
                    mode = await self._control.logprobs_mode(route.url)
            self._warn_logprobs_mode(route.url, mode)
        try:
            a.completion = completion(
                prompt,
                result.choices[0],
                wanted=Wanted(
                    logprobs=opts.want_logprobs,
                    top_logprobs=opts.top_logprobs,
                    echo_count=opts.echo_count(len(prompt)),
                    include_routing_matrix=opts.include_routing_matrix,
                    full_distribution=opts.full_distribution,
                ),
                request_id=logical_id,
                attempts=a.index,
                logprobs_mode=mode,
            )
            a.completion = replace(a.completion, server_url=route.url)
        except ReplyMismatch as e:
            a.verdict = protocol_error(str(e), e.excerpt)
            a.metrics = replace(metrics, error=str(e)[:200])
            return
        if partial:
            a.verdict = aborted(a.completion.completion_len)
            return
        self._count(
            samples=1,
            completion_tokens=a.completion.completion_len,
            prompt_tokens=len(prompt),
            queue_time_s=metrics.prefill_queue_duration or 0.0,
        )

    def _warn_logprobs_mode(self, url: str, mode: str | None) -> None:
        if mode is None or mode == PROCESSED or url in self._warned_modes:
            return
        self._warned_modes.add(url)
        warnings.warn(
            f"the server at {url} runs --logprobs-mode {mode}: its logprobs are not those of the "
            "distribution sampled from once temperature, top-k or top-p apply (sampling_logprobs are "
            "None then); start it with --logprobs-mode processed_logprobs",
            RuntimeWarning,
            stacklevel=2,
        )

    async def _attach_mask(self, a: _Attempt, route: Route, key: str) -> None:
        """The completion's sampling mask: vLLM's own, else the worker
        extension's from the route that served the attempt."""
        c = a.completion
        assert c is not None
        try:
            if c.sampling_mask is not None:
                self.mask_path = self.mask_path or "native"
                mask = c.sampling_mask
            else:
                mask = await self._control.take_mask(route.url, key, c.request_id or key)
                self.mask_path = self.mask_path or "plugin"
            a.completion = replace(c, sampling_mask=fit_mask(mask, c))
        except SamplingMaskError as e:
            a.transport_ok = a.transport_ok and not isinstance(e, MaskFetchFailed)
            a.completion = None
            a.verdict = Verdict(False, "sampling_mask", "sampling_mask", str(e), excerpt=e.excerpt)
            if a.metrics is not None:
                a.metrics = replace(a.metrics, error="sampling_mask")

    # -- errors ----------------------------------------------------------------------------

    def _terminal(
        self,
        v: Verdict,
        logical_id: str,
        records: list[SampledServerAttempt],
        opts: CallOptions,
        prompt_len: int,
        *,
        exhausted: bool,
    ) -> SamplingRequestError:
        diagnostic = self._timeout_diagnostic(opts, prompt_len) if v.timeout_like else ""
        return terminal_error(
            v,
            logical_id=logical_id,
            model=self.model,
            records=records,
            context=opts.context,
            exhausted=exhausted,
            diagnostic=diagnostic,
        )

    def _deadline_error(
        self, logical_id: str, records: list[SampledServerAttempt], opts: CallOptions, last: Verdict | None
    ) -> DeadlineExceededError:
        return deadline_error(
            self.timeouts.request,
            logical_id=logical_id,
            model=self.model,
            records=records,
            context=opts.context,
            last=last,
        )

    def _timeout_diagnostic(self, opts: CallOptions, prompt_len: int) -> str:
        oldest = time.monotonic() - DIAGNOSTIC_MAX_AGE_S
        with self._lock:
            recent = [m for t, m in self._diagnostic if t >= oldest]
        return timeout_diagnostic(
            model=self.model,
            prompt_tokens=prompt_len,
            max_tokens=opts.max_tokens,
            http_timeout=opts.http_timeout if opts.http_timeout is not None else self.timeouts.idle,
            window=getattr(self._controller, "window_size", None),
            context=opts.diagnostic_context,
            recent=recent,
        )
