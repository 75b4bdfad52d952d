"""DeploymentSampler: chat messages or token ids in, n samples out, from vLLM.

Names and signatures follow the Fireworks training SDK (and so Tinker-style
trainers), so switching is a change of import; the protocol is vLLM's and
the reference's known flaws are fixed:

- tokenization is client-side in Rust (:class:`~rollstream.ChatTokenizer`),
  GIL released, never transformers on the event loop;
- ``n`` samples are ``n`` streaming requests with their own ``X-Request-Id``
  (stable across retries) and their own seed (``seed + i``), streamed and
  decoded in Rust; Python wakes once per finished sample;
- a failed request is retried alone (jittered back-off, ``Retry-After``
  honoured, a total deadline per logical request, concurrency slot released
  while sleeping); a terminal failure cancels the siblings and names what
  failed and which samples completed;
- ``max_seq_len`` clamps ``max_tokens`` so no generation is wasted, and every
  dropped sample is counted in :attr:`DeploymentSampler.metrics`;
- integer stop ids go to vLLM as ``stop_token_ids``; unset ``top_p``/
  ``top_k``/``min_p`` are sent explicitly so server defaults never leak in;
- ``finish_reason="abort"`` (the server paused with ``mode=abort``) is
  retried, not returned as a sample;
- API keys never appear in reprs, logs or exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from ._exceptions import (
    DeadlineExceededError,
    RequestRejectedError,
    RetriesExhaustedError,
    SamplingError,
)
from ._http import Transport
from .concurrency import AdaptiveConcurrencyController, ConcurrencyController, FixedConcurrencyController
from .masks import SamplingMask
from .streams import StreamChoice, StreamResult, TopLogprobs, WeightVersionSpan, _result
from .tokenizer import ChatTokenizer, Message

__all__ = [
    "DeploymentSampler",
    "RetryPolicy",
    "SampledCompletion",
    "SamplerMetrics",
    "SamplerTimeouts",
]

log = logging.getLogger("rollstream.sampler")

T = TypeVar("T")

#: Statuses worth retrying: timeouts, rate limits, server errors.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Statuses that signal overload to the concurrency controller.
CONGESTION_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class SamplerTimeouts:
    """All timeouts in seconds. ``request`` bounds one logical request across
    all its retries; ``attempt`` one try; ``idle`` the silence between stream
    chunks (includes waiting in the server's queue before the first one)."""

    connect: float = 10.0
    idle: float = 600.0
    attempt: float = 1800.0
    request: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("connect", "idle", "attempt", "request"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SamplerTimeouts.{name}={value!r} must be a positive number of seconds")


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential back-off: ``base * 2**k`` capped at ``cap``,
    times U[0.5, 1.5); a server's ``Retry-After`` is a floor (capped at
    ``max_retry_after``)."""

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 15.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts={self.max_attempts} must be >= 1")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.cap, self.base * 2.0**attempt) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d


@dataclass(frozen=True, eq=False)
class SampledCompletion:
    """One sample.

    Lists where the reference SDK has lists (``full_tokens``,
    ``inference_logprobs``); numpy arrays for the long per-token data that is
    new here (``completion_ids``, ``completion_logprobs``).
    """

    text: str
    #: Prompt + completion token ids.
    full_tokens: list[int]
    prompt_len: int
    #: "stop" or "length" ("repetition" when the server detects loops).
    finish_reason: str
    completion_len: int
    #: Per-token logprobs of the completion (of the distribution sampled
    #: from, with ``--logprobs-mode processed_logprobs``); with ``echo=True``,
    #: training-aligned: P+C-1 entries aligned with ``full_tokens[1:]``.
    inference_logprobs: list[float] | None = None
    logprobs_echoed: bool = False
    #: Prompt logprobs included at the head of ``inference_logprobs``.
    echoed_prompt_logprob_count: int = 0
    #: Top candidates per completion token (ids where the server gave ids).
    top_logprobs: TopLogprobs | None = None
    #: Routed experts (tokens, layers, top_k) for MoE router replay.
    routing_matrices: np.ndarray | None = None
    sampling_mask: SamplingMask | None = None
    #: Weights that produced the sample, when the server reports it (generate
    #: endpoint); "mixed" when a weight update happened mid-sample.
    weight_version: str | None = None
    weight_versions: tuple[WeightVersionSpan, ...] = ()
    #: The X-Request-Id of the request that produced this sample.
    request_id: str | None = None
    stop_reason: int | str | None = None
    completion_ids: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    completion_logprobs: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    attempts: int = 1

    @property
    def prompt_tokens(self) -> list[int]:
        return self.full_tokens[: self.prompt_len]


@dataclass
class SamplerMetrics:
    """Counters since the last :meth:`DeploymentSampler.drain_metrics`."""

    requests: int = 0
    samples: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    aborted_retried: int = 0
    #: Samples not requested because the prompt alone reaches max_seq_len.
    dropped_prompt_too_long: int = 0
    #: Samples dropped after generation for exceeding max_seq_len.
    dropped_over_length: int = 0
    max_tokens_clamped: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    queue_time_s: float = 0.0
    retry_reasons: dict[str, int] = field(default_factory=dict)


class _Retry(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(
        self, reason: str, message: str, *, retry_after: float | None = None, congestion: bool = False
    ):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.congestion = congestion


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _server_message(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (ValueError, AttributeError):
        pass
    return body.strip()[:2000] or "(empty body)"


def _run_sync(coro: Awaitable[T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    raise RuntimeError("the *_sync methods cannot run inside an event loop; await the async method instead")


class DeploymentSampler:
    """Samples from a vLLM deployment (OpenAI-compatible server).

    ``inference_url`` is the server's base URL (``http://host:8000``);
    ``model`` the served model name. ``tokenizer`` is a
    :class:`ChatTokenizer`, a model path or a transformers tokenizer
    (converted once). ``endpoint`` chooses ``"completions"``
    (``/v1/completions``: per-request queue metrics for AIMD, echo) or
    ``"generate"`` (``/inference/v1/generate``: weight versions, sampling
    masks, routed experts while streaming).
    """

    def __init__(
        self,
        inference_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: ChatTokenizer | Any = None,
        concurrency_controller: ConcurrencyController | None = None,
        max_concurrency: int | None = None,
        additional_headers: Mapping[str, str] | None = None,
        timeout: SamplerTimeouts | float | None = None,
        *,
        retry: RetryPolicy | None = None,
        endpoint: Literal["completions", "generate"] = "completions",
        transport: Transport | None = None,
    ) -> None:
        if not isinstance(inference_url, str) or not inference_url.startswith(("http://", "https://")):
            raise ValueError(f"inference_url must be an http(s) URL, got {inference_url!r}")
        if endpoint not in ("completions", "generate"):
            raise ValueError(f"endpoint must be 'completions' or 'generate', got {endpoint!r}")
        self.inference_url = inference_url.rstrip("/")
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
        self.concurrency_controller: ConcurrencyController = (
            concurrency_controller if concurrency_controller is not None else AdaptiveConcurrencyController()
        )
        self._headers = dict(additional_headers or {})
        if isinstance(timeout, (int, float)):
            timeout = SamplerTimeouts(attempt=float(timeout), request=max(float(timeout), 1.0) * 2)
        self.timeouts = timeout or SamplerTimeouts()
        self.retry = retry or RetryPolicy()
        self.endpoint = endpoint
        self._transport = transport or Transport(connect_timeout=self.timeouts.connect)
        self._own_transport = transport is None
        self._metrics = SamplerMetrics()
        self._metrics_lock = threading.Lock()
        self._control: httpx.AsyncClient | None = None
        #: How sampling masks reach this sampler: "native" (vLLM's
        #: --return-sampling-mask), "plugin" (rollstream's worker extension),
        #: or None until the first sample with sampling_mask=True.
        self.mask_path: str | None = None

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (
            f"DeploymentSampler(inference_url={self.inference_url!r}, model={self.model!r}, "
            f"endpoint={self.endpoint!r}, api_key=<{key}>, controller={self.concurrency_controller!r})"
        )

    # -- metrics --------------------------------------------------------------

    @property
    def metrics(self) -> SamplerMetrics:
        """A snapshot of the counters."""
        with self._metrics_lock:
            return replace(self._metrics, retry_reasons=dict(self._metrics.retry_reasons))

    def drain_metrics(self) -> SamplerMetrics:
        """The counters since the last drain, resetting them."""
        with self._metrics_lock:
            out, self._metrics = self._metrics, SamplerMetrics()
        return out

    def _count(self, **deltas: float) -> None:
        with self._metrics_lock:
            for k, v in deltas.items():
                setattr(self._metrics, k, getattr(self._metrics, k) + v)

    # -- public API -----------------------------------------------------------

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
            messages, add_generation_prompt=True, tools=tools, **dict(chat_template_kwargs or {})
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
        logprobs: bool = False,
        top_logprobs: int = 0,
        echo: bool = False,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str | int] | str | int | None = None,
        sampling_mask: bool = False,
        **extra: Any,
    ) -> list[SampledCompletion]:
        """Sample ``n`` completions of a tokenized prompt.

        ``max_seq_len``: a prompt of that many tokens or more returns ``[]``
        (counted in ``metrics.dropped_prompt_too_long``); otherwise
        ``max_tokens`` is clamped to ``max_seq_len - len(prompt)``.
        ``stop`` mixes strings and token ids (ids go to ``stop_token_ids``).
        ``sampling_mask=True`` attaches the kept token ids of every sampled
        token (:attr:`SampledCompletion.sampling_mask`; needs top-k or top-p,
        see :mod:`rollstream.masks`). Other keyword arguments go into the
        request body verbatim.
        """
        prompt = self._check_prompt(prompt_token_ids)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        if sampling_mask and (temperature == 0 or ((top_k in (None, 0, -1)) and (top_p in (None, 1.0)))):
            raise ValueError(
                "sampling_mask=True needs truncated sampling (temperature > 0 with top_k or top_p): "
                "without truncation the support is the whole vocabulary and there is no mask to apply"
            )
        self._count(requests=1)
        if max_seq_len is not None:
            if len(prompt) >= max_seq_len:
                log.debug("prompt of %d tokens reaches max_seq_len=%d: no request", len(prompt), max_seq_len)
                self._count(dropped_prompt_too_long=n)
                return []
            if max_tokens > max_seq_len - len(prompt):
                max_tokens = max_seq_len - len(prompt)
                self._count(max_tokens_clamped=1)
        stops = [stop] if isinstance(stop, (str, int)) else list(stop or ())
        stop_strings = [s for s in stops if isinstance(s, str)]
        stop_ids = [int(s) for s in stops if isinstance(s, int) and not isinstance(s, bool)]
        if len(stop_strings) + len(stop_ids) != len(stops):
            raise TypeError(f"stop entries must be str or int, got {stop!r}")
        params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            # Explicit: server-side generation_config defaults must not leak in.
            "top_p": 1.0 if top_p is None else top_p,
            "top_k": 0 if top_k is None else top_k,
            "min_p": 0.0 if min_p is None else min_p,
        }
        if stop_strings:
            params["stop"] = stop_strings
        if stop_ids:
            params["stop_token_ids"] = stop_ids
        want_logprobs = logprobs or top_logprobs > 0 or echo
        logical_id = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + self.timeouts.request

        async def one(i: int) -> SampledCompletion:
            p = dict(params)
            if seed is not None:
                p["seed"] = seed + i
            body = self._body(prompt, p, want_logprobs, top_logprobs, echo, extra)
            return await self._sample_one(
                prompt, body, f"{logical_id}-{i}", deadline, echo, want_logprobs, sampling_mask
            )

        completions = await self._gather_all([one(i) for i in range(n)], logical_id)
        kept = []
        for c in completions:
            if max_seq_len is not None and len(c.full_tokens) > max_seq_len:
                self._count(dropped_over_length=1)
                continue
            kept.append(c)
        return kept

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
        return _run_sync(self.sample_with_tokens(messages, **kwargs))

    def sample_with_prompt_tokens_sync(
        self, prompt_token_ids: Sequence[int], **kwargs: Any
    ) -> list[SampledCompletion]:
        return _run_sync(self.sample_with_prompt_tokens(prompt_token_ids, **kwargs))

    def sample_batch_sync(
        self, list_of_messages: Sequence[Sequence[Message]], **kwargs: Any
    ) -> list[list[SampledCompletion]]:
        return _run_sync(self.sample_batch(list_of_messages, **kwargs))

    async def aclose(self) -> None:
        if self._control is not None:
            await self._control.aclose()
            self._control = None
        if self._own_transport:
            await self._transport.aclose()

    def close(self) -> None:
        if self._own_transport:
            self._transport.close()

    async def __aenter__(self) -> DeploymentSampler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _check_prompt(ids: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"prompt_token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
            out = [int(x) for x in ids]
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

    def _body(
        self,
        prompt: list[int],
        params: dict[str, Any],
        want_logprobs: bool,
        top_logprobs: int,
        echo: bool,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        if self.endpoint == "completions":
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": prompt,
                "n": 1,
                "stream": True,
                "stream_options": {"include_usage": True},
                "return_token_ids": True,
                **params,
            }
            if want_logprobs:
                body["logprobs"] = top_logprobs
                # Candidates as "token_id:N" strings: decoded to ids in Rust.
                body["return_tokens_as_token_ids"] = True
            if echo:
                body["echo"] = True
        else:
            sp = dict(params)
            if want_logprobs:
                sp["logprobs"] = top_logprobs
            if echo:
                sp["prompt_logprobs"] = top_logprobs
            body = {
                "model": self.model,
                "token_ids": prompt,
                "sampling_params": sp,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        for k, v in extra.items():
            if self.endpoint == "generate" and k not in ("request_id", "cache_salt", "priority", "model"):
                body["sampling_params"][k] = v
            else:
                body[k] = v
        return body

    def _request_headers(self, request_id: str) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in self._headers.items()]
        if self._api_key:
            headers.append(("authorization", f"Bearer {self._api_key}"))
        headers.append(("x-request-id", request_id))
        return headers

    @property
    def _url(self) -> str:
        path = "/v1/completions" if self.endpoint == "completions" else "/inference/v1/generate"
        return self.inference_url + path

    async def _gather_all(
        self, coros: list[Awaitable[SampledCompletion]], logical_id: str
    ) -> list[SampledCompletion]:
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
        completed = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        first = failed[0].exception()
        assert first is not None
        index = tasks.index(failed[0])
        self._count(failures=1)
        msg = (
            f"sample {index} of request {logical_id} failed ({first}); "
            f"{len(completed)} of {len(tasks)} samples had completed, the others were cancelled"
        )
        if isinstance(first, SamplingError):
            raise first.with_context(msg, completed=completed) from first
        raise SamplingError(msg, request_id=f"{logical_id}-{index}", completed=completed) from first

    def _mask_flag(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        """The body with the mask-capture key (a fresh one per attempt, so a
        retried request never mixes rows of two attempts)."""
        body = dict(body)
        if self.endpoint == "completions":
            body["vllm_xargs"] = {**body.get("vllm_xargs", {}), "rollstream_mask_id": key}
        else:
            sp = dict(body["sampling_params"])
            sp["extra_args"] = {**(sp.get("extra_args") or {}), "rollstream_mask_id": key}
            body["sampling_params"] = sp
        return body

    async def _take_mask(self, key: str, request_id: str) -> SamplingMask:
        import base64

        if self._control is None:
            headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._control = httpx.AsyncClient(base_url=self.inference_url, timeout=60.0, headers=headers)
        try:
            r = await self._control.post(
                "/collective_rpc",
                json={"method": "rollstream_take_sampling_masks", "kwargs": {"keys": [key]}},
            )
        except httpx.HTTPError as e:
            raise SamplingError(
                f"fetching the sampling mask of {request_id} failed: {e!r}", request_id=request_id
            ) from e
        if r.status_code >= 300:
            raise SamplingError(
                f"the server returned no sampling mask for {request_id} and cannot provide one (HTTP "
                f"{r.status_code}: {_server_message(r.text)}). On vLLM's V1 runner (e.g. the CPU build) "
                "start it with --worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension and "
                "VLLM_SERVER_DEV_MODE=1; on GPU, --return-sampling-mask with endpoint='generate'",
                request_id=request_id,
            )
        entry = (r.json().get("results") or [{}])[0].get(key)
        if entry is None:
            raise SamplingError(
                f"the server recorded no sampling mask for {request_id}", request_id=request_id
            )
        if entry["untruncated_rows"]:
            raise SamplingError(
                f"{entry['untruncated_rows']} tokens of {request_id} were sampled without truncation "
                "(no top-k/top-p in effect): there is no mask to apply",
                request_id=request_id,
            )
        ids = np.frombuffer(base64.b64decode(entry["token_ids"]), dtype=np.int32)
        offsets = np.frombuffer(base64.b64decode(entry["offsets"]), dtype=np.int64)
        self.mask_path = self.mask_path or "plugin"
        return SamplingMask(ids, offsets)

    async def _attach_mask(self, c: SampledCompletion, key: str) -> SampledCompletion:
        if c.sampling_mask is not None:
            self.mask_path = self.mask_path or "native"
            mask = c.sampling_mask
        else:
            mask = await self._take_mask(key, c.request_id or key)
        if mask.rows < c.completion_len:
            raise SamplingError(
                f"sampling mask of {c.request_id} has {mask.rows} rows for {c.completion_len} tokens",
                request_id=c.request_id,
            )
        if mask.rows > c.completion_len:
            # Tokens sampled but not returned (a stop string cut them off).
            end = c.completion_len
            mask = SamplingMask(mask.token_ids[: mask.offsets[end]], mask.offsets[: end + 1])
        if not mask.contains(c.completion_ids).all():
            raise SamplingError(
                f"sampling mask of {c.request_id} does not contain its sampled tokens",
                request_id=c.request_id,
            )
        return replace(c, sampling_mask=mask)

    async def _sample_one(
        self,
        prompt: list[int],
        body: dict[str, Any],
        request_id: str,
        deadline: float,
        echo: bool,
        want_lp: bool,
        want_mask: bool = False,
    ) -> SampledCompletion:
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = self._request_headers(request_id)
        controller = self.concurrency_controller
        last: _Retry | None = None
        for attempt in range(self.retry.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(
                    f"request {request_id} exceeded its {self.timeouts.request:.0f} s deadline after "
                    f"{attempt} attempts" + (f" (last error: {last})" if last else ""),
                    request_id=request_id,
                )
            mask_key = f"{request_id}.{attempt}"
            if want_mask:
                payload = json.dumps(self._mask_flag(body, mask_key), separators=(",", ":")).encode()
            await controller.acquire()
            try:
                self._count(attempts=1)
                outcome = await self._transport.stream(
                    self._url,
                    headers,
                    payload,
                    idle_timeout=min(self.timeouts.idle, remaining),
                    total_timeout=min(self.timeouts.attempt, remaining),
                )
            finally:
                controller.release()
            try:
                completion = self._finish(prompt, outcome, request_id, echo, want_lp, attempt + 1)
            except _Retry as r:
                last = r
                with self._metrics_lock:
                    self._metrics.retries += 1
                    self._metrics.retry_reasons[r.reason] = self._metrics.retry_reasons.get(r.reason, 0) + 1
                if r.congestion:
                    controller.record_congestion(attempt)
                if attempt + 1 >= self.retry.max_attempts:
                    break
                delay = min(self.retry.delay(attempt, r.retry_after), max(0.0, deadline - time.monotonic()))
                log.info(
                    "request %s attempt %d failed (%s); retrying in %.2f s", request_id, attempt + 1, r, delay
                )
                await asyncio.sleep(delay)  # no slot held while sleeping
                continue
            if want_mask:
                completion = await self._attach_mask(completion, mask_key)
            return completion
        raise RetriesExhaustedError(
            f"request {request_id} failed after {self.retry.max_attempts} attempts; last error: {last}",
            request_id=request_id,
        )

    def _finish(
        self,
        prompt: list[int],
        outcome: dict[str, Any],
        request_id: str,
        echo: bool,
        want_lp: bool,
        attempts: int,
    ) -> SampledCompletion:
        if not outcome["ok"]:
            kind = outcome["kind"]
            if kind == "status":
                status = int(outcome["status"])
                message = _server_message(outcome.get("body") or "")
                if status in RETRYABLE_STATUS:
                    raise _Retry(
                        f"http_{status}",
                        f"HTTP {status}: {message}",
                        retry_after=_retry_after(outcome.get("retry_after")),
                        congestion=status in CONGESTION_STATUS,
                    )
                raise RequestRejectedError(
                    f"server rejected request {request_id} with HTTP {status}: {message}",
                    status=status,
                    server_message=message,
                    request_id=request_id,
                )
            if kind == "invalid":
                raise ValueError(outcome["message"])
            if kind == "cancelled":
                raise asyncio.CancelledError()
            raise _Retry(kind, outcome["message"], congestion=kind in ("connect", "transport", "timeout"))
        result = _result(outcome["result"])
        if result.error is not None:
            code = result.error.code or ""
            if code.isdigit() and 400 <= int(code) < 500 and int(code) not in RETRYABLE_STATUS:
                raise RequestRejectedError(
                    f"server error in stream of {request_id}: {result.error.message}",
                    status=int(code),
                    server_message=result.error.message,
                    request_id=request_id,
                )
            raise _Retry("stream_error", f"server error in stream: {result.error.message}")
        if len(result.choices) != 1:
            raise _Retry("protocol", f"expected 1 choice, got {len(result.choices)}")
        choice = result.choices[0]
        if choice.finish_reason == "abort":
            self._count(aborted_retried=1)
            raise _Retry("abort", f"generation aborted by the server after {len(choice.token_ids)} tokens")
        if choice.finish_reason is None:
            raise _Retry("protocol", "stream ended without a finish_reason")
        if choice.prompt_token_ids is not None and choice.prompt_token_ids.tolist() != prompt:
            raise SamplingError(
                f"the server's prompt for {request_id} differs from the one sent "
                f"({len(choice.prompt_token_ids)} vs {len(prompt)} tokens)",
                request_id=request_id,
            )
        self._feedback(result, outcome, len(prompt))
        return self._completion(prompt, choice, result, request_id, echo, want_lp, attempts)

    def _feedback(self, result: StreamResult, outcome: dict[str, Any], prompt_len: int) -> None:
        q_ms = result.metrics.get("queue_time_ms")
        queue_s = q_ms / 1000.0 if q_ms is not None else None
        ttft = outcome.get("first_token_s") or None
        cached = result.usage.cached_tokens if result.usage is not None else None
        self.concurrency_controller.record_success(
            queue_time_s=queue_s, first_token_s=ttft, prompt_tokens=prompt_len, cached_tokens=cached
        )
        self._count(queue_time_s=queue_s or 0.0)

    def _completion(
        self,
        prompt: list[int],
        choice: StreamChoice,
        result: StreamResult,
        request_id: str,
        echo: bool,
        want_lp: bool,
        attempts: int,
    ) -> SampledCompletion:
        ids = choice.token_ids
        lps = choice.logprobs
        if want_lp and (lps is None or len(lps) != len(ids)):
            got = None if lps is None else len(lps)
            raise _Retry("protocol", f"{got} logprobs for {len(ids)} tokens")
        inference: list[float] | None = None
        echoed = 0
        if want_lp and lps is not None:
            if echo:
                plp = choice.prompt_logprobs
                if plp is None or len(plp) != len(prompt):
                    raise _Retry("protocol", f"echo gave {None if plp is None else len(plp)} prompt logprobs")
                # Training-aligned: entry j is log p(full[j+1] | full[:j+1]).
                inference = np.concatenate([plp[1:], lps]).tolist()
                echoed = len(prompt) - 1
            else:
                inference = lps.tolist()
        versions = choice.weight_versions
        names = {v.version for v in versions}
        weight_version = None if not names else (next(iter(names)) if len(names) == 1 else "mixed")
        self._count(samples=1, completion_tokens=len(ids), prompt_tokens=len(prompt))
        return SampledCompletion(
            text=choice.text,
            full_tokens=prompt + ids.tolist(),
            prompt_len=len(prompt),
            finish_reason=choice.finish_reason or "unknown",
            completion_len=len(ids),
            inference_logprobs=inference,
            logprobs_echoed=echo and inference is not None,
            echoed_prompt_logprob_count=echoed,
            top_logprobs=choice.top_logprobs,
            routing_matrices=choice.routed_experts,
            sampling_mask=choice.sampling_mask,
            weight_version=weight_version,
            weight_versions=versions,
            request_id=request_id,
            stop_reason=choice.stop_reason,
            completion_ids=ids,
            completion_logprobs=lps,
            attempts=attempts,
        )
