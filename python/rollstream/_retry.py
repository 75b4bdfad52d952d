"""Which failed attempts are worth another try, how long to wait, and the
exception a request ends with.

Retried: retryable HTTP statuses (timeouts, rate limits, server errors),
failures below HTTP (connect, reset, idle or attempt timeout), truncated
streams, server errors reported inside the stream, and generations the
server aborted (``finish_reason="abort"``, a pause with ``mode=abort``).
Failed at once: other 4xx statuses, and replies that cannot be valid
(malformed streams, inconsistent lengths): the same request would get the
same reply, so another generation would be wasted.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from ._exceptions import (
    DeadlineExceededError,
    RequestRejectedError,
    RetriesExhaustedError,
    SamplingMaskError,
    SamplingProtocolError,
    SamplingRequestError,
    SamplingTimeoutError,
    TransportClosedError,
)
from ._http import Outcome
from ._models import SampledServerAttempt, ServerMetrics
from .streams import ServerErrorInfo

__all__ = [
    "RETRYABLE_STATUS",
    "TIMEOUT_STATUS",
    "RetryPolicy",
    "Verdict",
    "aborted",
    "classify_failure",
    "classify_stream_error",
    "deadline_error",
    "protocol_error",
    "server_message",
    "terminal_error",
    "timeout_diagnostic",
]

#: Statuses worth retrying: timeouts, rate limits, server errors.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Statuses that mean a timeout (the request may have been too slow).
TIMEOUT_STATUS = frozenset({408, 504})

#: The Fireworks SDK's coarse kinds of failure, plus rollstream's own.
ErrorKind = Literal[
    "http_status",
    "sse_truncation",
    "connection",
    "timeout",
    "upstream_stream",
    "protocol",
    "sampling_mask",
    "closed",
]


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
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts={self.max_attempts!r} must be an int >= 1")
        for name in ("base", "cap", "max_retry_after"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"RetryPolicy.{name}={value!r} must be a non-negative number of seconds")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep after the 0-based ``attempt`` failed."""
        d = min(self.cap, self.base * 2.0 ** min(attempt, 64)) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d


@dataclass(frozen=True)
class Verdict:
    """What a failed attempt means."""

    retry: bool
    kind: ErrorKind
    #: Short label, counted in ``SamplerMetrics.retry_reasons``.
    reason: str
    message: str
    #: The status that decided it (HTTP, or the one a stream error carried).
    status: int | None = None
    retry_after: float | None = None
    #: The attempt failed below HTTP (it counts as congestion).
    transport_error: bool = False
    #: The server's bytes, for deterministic failures.
    excerpt: str = ""
    offset: int | None = None
    #: The server's own message, when it sent one.
    detail: str = ""
    #: The stream's error code / finish reason, for stream-level failures.
    upstream_error_code: str | None = None
    upstream_finish_reason: str | None = None

    @property
    def timeout_like(self) -> bool:
        return self.kind == "timeout"


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def server_message(body: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else its start."""
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (ValueError, AttributeError):
        pass
    return body.strip()[:2000] or "(empty body)"


def classify_failure(outcome: Outcome) -> Verdict:
    """The verdict on a failed transport outcome (``outcome.ok`` is False).
    ``cancelled`` outcomes never reach here (the caller re-raises)."""
    assert not outcome.ok
    kind = outcome.kind
    if kind == "status":
        status = int(outcome.status or 0)
        detail = server_message(outcome.body or "")
        return Verdict(
            retry=status in RETRYABLE_STATUS,
            kind="timeout" if status in TIMEOUT_STATUS else "http_status",
            reason=f"http_{status}",
            message=f"HTTP {status}: {detail}",
            status=status,
            retry_after=retry_after(outcome.retry_after),
            detail=detail,
        )
    if kind == "decode":
        if outcome.truncated:
            return Verdict(True, "sse_truncation", "truncated", outcome.message)
        return Verdict(
            False,
            "protocol",
            "protocol",
            f"the server's stream is not valid: {outcome.message}",
            excerpt=outcome.excerpt or "",
            offset=outcome.offset,
        )
    if kind == "timeout":
        return Verdict(True, "timeout", "timeout", outcome.message, transport_error=True)
    if kind in ("connect", "transport"):
        return Verdict(True, "connection", kind, outcome.message, transport_error=True)
    if kind == "closed":
        return Verdict(False, "closed", "closed", outcome.message)
    # "invalid": our own request could not be built (bad URL or header).
    return Verdict(False, "protocol", "invalid", f"invalid request: {outcome.message}")


def classify_stream_error(error: ServerErrorInfo) -> Verdict:
    """An ``{"error": ...}`` event inside an HTTP 200 stream: a client error
    code fails at once, anything else (engine errors) is retried."""
    code = (error.code or "").strip()
    status = int(code) if code.isdigit() else None
    retry = status is None or status >= 500 or status in RETRYABLE_STATUS
    return Verdict(
        retry=retry,
        kind="upstream_stream",
        reason="stream_error",
        message=f"server error in stream: {error.message}",
        status=status,
        detail=error.message,
        upstream_error_code=error.code,
    )


def protocol_error(message: str, excerpt: str = "") -> Verdict:
    """A well-formed stream that cannot answer the request (deterministic)."""
    return Verdict(False, "protocol", "protocol", message, excerpt=excerpt)


def aborted(tokens: int) -> Verdict:
    """The server aborted the generation (``/pause?mode=abort``): retried."""
    return Verdict(
        True,
        "upstream_stream",
        "abort",
        f"generation aborted by the server after {tokens} tokens",
        upstream_finish_reason="abort",
    )


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def timeout_diagnostic(
    *,
    model: str,
    prompt_tokens: int,
    max_tokens: int,
    http_timeout: float,
    window: int | None,
    context: Mapping[str, Any] | None,
    recent: Sequence[ServerMetrics],
) -> str:
    """What a timeout error says beside the failure: the request's size, the
    concurrency window, the caller's ``timeout_diagnostic_context`` and the
    p95 queue and first-token times of recent attempts."""
    fields = [
        f"model={model}",
        f"prompt_tokens={prompt_tokens}",
        f"max_tokens={max_tokens}",
        f"http_timeout={http_timeout:g}s",
    ]
    if window is not None:
        fields.append(f"sampler_concurrency_window={window}")
    fields += [f"{k}={v}" for k, v in sorted((context or {}).items()) if v is not None]
    for name, values in (
        ("recent_prefill_queue_p95", [m.prefill_queue_duration for m in recent]),
        ("recent_client_ttft_p95", [m.client_ttft for m in recent]),
    ):
        p95 = _p95([x for x in values if x is not None])
        if p95 is not None:
            fields.append(f"{name}={p95:.1f}s")
    return (
        "Timeout diagnostic: "
        + " ".join(fields)
        + ". If queue or time-to-first-token p95s are high, lower the concurrency or max_tokens, or add "
        "capacity; otherwise check the network and http_timeout."
    )


def terminal_error(
    v: Verdict,
    *,
    logical_id: str,
    model: str,
    records: Sequence[SampledServerAttempt],
    context: Mapping[str, Any],
    exhausted: bool,
    diagnostic: str = "",
) -> SamplingRequestError:
    """The exception a logical request ends with, from its last verdict."""
    last = records[-1] if records else None
    common: dict[str, Any] = {
        "logical_request_id": logical_id,
        "model": model,
        "attempts": len(records),
        "final_status": v.status,
        "final_error_kind": v.kind,
        "request_id": (last.response_request_id if last is not None else None) or logical_id,
        "wire_status": last.status_code if last is not None else None,
        "upstream_response_id": last.upstream_response_id if last is not None else None,
        "upstream_error_code": v.upstream_error_code,
        "upstream_finish_reason": v.upstream_finish_reason,
        "retry_budget_exhausted": exhausted,
        "context": context,
        "server_attempts": tuple(records),
    }
    where = f"request {logical_id}"
    if v.kind == "closed":
        return TransportClosedError(f"{where}: {v.message}", **common)
    if v.kind == "sampling_mask":
        return SamplingMaskError(v.message, excerpt=v.excerpt, **common)
    if v.kind == "protocol":
        near = f" near {v.excerpt!r}" if v.excerpt else ""
        return SamplingProtocolError(
            f"{where} failed at once (the reply cannot be valid, retrying would repeat it): "
            f"{v.message}{near}",
            excerpt=v.excerpt,
            offset=v.offset,
            **common,
        )
    if not v.retry:
        return RequestRejectedError(
            f"server rejected {where} with HTTP {v.status}: {v.detail or v.message}",
            status=v.status,
            server_message=v.detail or v.message,
            **common,
        )
    message = f"{where} failed after {len(records)} attempts; last error: {v.message}"
    if v.timeout_like:
        return SamplingTimeoutError(f"{message}. {diagnostic}" if diagnostic else message, **common)
    return RetriesExhaustedError(message, **common)


def deadline_error(
    seconds: float,
    *,
    logical_id: str,
    model: str,
    records: Sequence[SampledServerAttempt],
    context: Mapping[str, Any],
    last: Verdict | None,
) -> DeadlineExceededError:
    message = f"request {logical_id} exceeded its {seconds:.0f} s deadline after {len(records)} attempts" + (
        f" (last error: {last.message})" if last else ""
    )
    return DeadlineExceededError(
        message,
        logical_request_id=logical_id,
        model=model,
        attempts=len(records),
        final_status=last.status if last else None,
        final_error_kind="deadline",
        request_id=logical_id,
        retry_budget_exhausted=False,
        context=context,
        server_attempts=tuple(records),
    )
