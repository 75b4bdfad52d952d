"""What sampling returns: completions, per-request results, per-attempt
server metrics, and the sampler's own counters.

The Fireworks SDK's names, fields, constructor order and defaults come
first (a trainer written for it reads these unchanged); rollstream's richer
data follows under its own names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .masks import SamplingMask
from .streams import TopLogprobs, WeightVersionSpan

__all__ = [
    "SampledCompletion",
    "SampledRequestResult",
    "SampledServerAttempt",
    "SamplerMetrics",
    "ServerMetrics",
]

#: Response headers that may carry the request id the server logged.
REQUEST_ID_HEADERS = ("x-request-id", "x-fireworks-request-id", "cf-ray")


def _same(a: Any, b: Any) -> bool:
    """Value equality that also holds for numpy arrays (NaN equal to NaN,
    as a repeated decode of the same stream must compare equal)."""
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            return False
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, type(a))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


@dataclass(frozen=True)
class ServerMetrics:
    """What the server (and the client) measured for one attempt.

    The Fireworks SDK's record, field for field. On vLLM:
    ``prefill_queue_duration`` is the engine's ``queue_time_ms`` (the
    completions endpoint with ``--enable-per-request-metrics``),
    ``server_ttft`` its ``time_to_first_token_ms`` and
    ``generation_duration`` its ``generation_time_ms`` (all in seconds);
    ``cached_prompt_tokens`` is ``usage.prompt_tokens_details.cached_tokens``
    (vLLM's ``--enable-prompt-tokens-details``) and None when the server does
    not say. ``backend_host`` is the replica that served the attempt. Fields
    the server does not report are None.
    """

    num_concurrent_requests: int | None = None
    prefill_queue_duration: float | None = None
    generation_queue_duration: float | None = None
    server_ttft: float | None = None
    cached_prompt_tokens: int | None = None
    prompt_tokens: int | None = None
    server_processing_time: float | None = None
    tokenizer_queue_duration: float | None = None
    tokenizer_duration: float | None = None
    prefill_duration: float | None = None
    generation_duration: float | None = None
    #: Client-measured seconds from sending the attempt to its first token.
    client_ttft: float | None = None
    #: Client-measured seconds from sending the attempt to its end.
    client_latency: float | None = None
    completion_tokens: int | None = None
    http_status_code: int | None = None
    #: The attempt failed below HTTP (connect, reset, timeout).
    transport_error: bool = False
    #: 1-based attempt that produced this record.
    retry_attempt: int | None = None
    #: Why the attempt failed (``"HTTP 503"``, ``"SSE truncation"``...); None when it completed.
    error: str | None = None
    response_request_id: str | None = None
    backend_host: str | None = None
    deployment: str | None = None
    pod_template_hash: str | None = None

    @staticmethod
    def from_headers(
        headers: Mapping[str, object],
        client_ttft: float | None = None,
        http_status_code: int | None = None,
        retry_attempt: int | None = None,
        client_latency: float | None = None,
        completion_tokens: int | None = None,
    ) -> ServerMetrics:
        """Parse Fireworks-style metric headers (``prefill-queue-duration``,
        optionally prefixed ``fireworks-``); unparsable values become None."""
        lower = {str(k).lower(): v for k, v in headers.items()}

        def raw(key: str) -> object | None:
            v = lower.get(key)
            return v if v not in (None, "") else lower.get(f"fireworks-{key}")

        def num(key: str, kind: type[int] | type[float]) -> Any:
            v = raw(key)
            if not isinstance(v, (str, int, float)):
                return None
            try:
                return kind(v)
            except ValueError:
                return None

        def text(key: str) -> str | None:
            v = raw(key)
            return None if v in (None, "") else str(v)

        request_id = next((str(lower[h])[:256] for h in REQUEST_ID_HEADERS if lower.get(h)), None)
        return ServerMetrics(
            num_concurrent_requests=num("num-concurrent-requests", int),
            prefill_queue_duration=num("prefill-queue-duration", float),
            generation_queue_duration=num("generation-queue-duration", float),
            server_ttft=num("server-time-to-first-token", float),
            cached_prompt_tokens=num("cached-prompt-tokens", int),
            prompt_tokens=num("prompt-tokens", int),
            server_processing_time=num("server-processing-time", float),
            tokenizer_queue_duration=num("tokenizer-queue-duration", float),
            tokenizer_duration=num("tokenizer-duration", float),
            prefill_duration=num("prefill-duration", float),
            generation_duration=num("generation-duration", float),
            client_ttft=client_ttft,
            client_latency=client_latency,
            completion_tokens=completion_tokens,
            http_status_code=http_status_code,
            retry_attempt=retry_attempt,
            response_request_id=request_id,
            backend_host=text("backend-host"),
            deployment=text("deployment"),
            pod_template_hash=text("pod-template-hash"),
        )


@dataclass(frozen=True, eq=False)
class SampledCompletion:
    """One sample.

    The first fields are the Fireworks SDK's (same order, same defaults, value
    equality): lists where it has lists. ``inference_logprobs`` are the
    logprobs the server returned for the completion tokens (with
    ``--logprobs-mode processed_logprobs``, rollstream's server flag: those
    of the distribution actually sampled from); ``sampling_logprobs`` are the
    behaviour policy's (the same values when the server runs processed
    logprobs or the sampling was full-distribution, else None entries).
    With ``echo=True`` both are training-aligned: P+C-1 entries aligned with
    ``full_tokens[1:]``. ``routing_matrices`` is the SDK's form (one base64
    string per position, see :attr:`routed_experts`) when
    ``include_routing_matrix=True``.

    rollstream's own data follows: numpy arrays for per-token data
    (``completion_ids``, ``completion_logprobs``), CSR candidates
    (``top_logprobs``), the ``sampling_mask``, routed experts as an array,
    weight versions.
    """

    text: str
    #: Prompt + completion token ids.
    full_tokens: list[int]
    prompt_len: int
    #: "stop" or "length" ("repetition" when the server detects loops).
    finish_reason: str = "unknown"
    completion_len: int = 0
    inference_logprobs: list[float] | None = None
    sampling_logprobs: list[float | None] | None = None
    logprobs_echoed: bool = False
    #: Per position (aligned with ``inference_logprobs``): base64 of the
    #: position's routed expert ids, little-endian int16, layers x top_k,
    #: "" where the server reported none.
    routing_matrices: list[str] | None = None
    #: Prompt logprobs included at the head of ``inference_logprobs``.
    echoed_prompt_logprob_count: int = 0
    #: Top candidates per position (aligned with ``inference_logprobs``).
    inference_topk_token_ids: list[list[int]] | None = None
    inference_topk_logprobs: list[list[float]] | None = None
    #: Fireworks' Parquet references; vLLM has no such store (always None).
    top_sampling_references: Any = None
    sampling_mask_references: Any = None
    # -- rollstream ----------------------------------------------------------
    #: Top candidates per completion token, CSR (ids where the server gave ids).
    top_logprobs: TopLogprobs | None = None
    #: Routed experts, shape (positions, layers, top_k), for MoE router replay.
    routed_experts: np.ndarray | None = None
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
    #: Base URL of the server (replica) that produced the sample.
    server_url: str | None = None

    @property
    def prompt_tokens(self) -> list[int]:
        return self.full_tokens[: self.prompt_len]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    # Equal values, mutable contents (lists): unhashable, like the SDK's.
    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class SampledServerAttempt:
    """One transport attempt of a logical request."""

    #: 1-based.
    index: int
    outcome: Literal["succeeded", "retryable_error", "failed", "cancelled"]
    status_code: int | None = None
    #: ``http_status``, ``sse_truncation``, ``connection``, ``timeout``,
    #: ``upstream_stream``, ``protocol``, ``sampling_mask``, ``closed``.
    error_kind: str | None = None
    response_request_id: str | None = None
    upstream_response_id: str | None = None
    server_metrics: ServerMetrics | None = None


@dataclass(frozen=True)
class SampledRequestResult:
    """One logical sampling request (one sample) and its attributable facts."""

    completions: list[SampledCompletion]
    server_metrics: ServerMetrics | None
    logical_request_id: str
    attempts: int
    wall_seconds: float
    #: The completion's ``id`` as the server streamed it.
    upstream_response_id: str | None = None
    server_attempts: tuple[SampledServerAttempt, ...] = ()


@dataclass
class SamplerMetrics:
    """rollstream's counters (:attr:`DeploymentSampler.metrics`, reset by
    :meth:`DeploymentSampler.drain_counters`)."""

    requests: int = 0
    samples: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    aborted_retried: int = 0
    #: Tokens kept from aborted attempts and continued (not generated again).
    continued_tokens: int = 0
    #: Samples not requested because the prompt alone reaches max_seq_len.
    dropped_prompt_too_long: int = 0
    #: Samples dropped after generation for exceeding max_seq_len.
    dropped_over_length: int = 0
    max_tokens_clamped: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    queue_time_s: float = 0.0
    retry_reasons: dict[str, int] = field(default_factory=dict)
