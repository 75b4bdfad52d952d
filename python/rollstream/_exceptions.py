"""The exception hierarchy of rollstream: everything raised on purpose derives
from :class:`RollstreamError`.

Errors caused by a bad argument also derive from the matching builtin
(``ValueError``/``TypeError``) so existing ``except ValueError`` code keeps
working.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DeadlineExceededError",
    "DeploymentError",
    "DeploymentSamplerTimeoutError",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "RequestRejectedError",
    "RetriesExhaustedError",
    "RollstreamError",
    "SamplingError",
    "SamplingMaskError",
    "SamplingProtocolError",
    "SamplingRequestError",
    "SamplingTimeoutError",
    "StreamError",
    "StreamProtocolError",
    "StreamServerError",
    "StreamTruncatedError",
    "TransportClosedError",
]


class RollstreamError(Exception):
    """Base class of every exception rollstream raises on purpose."""


class StreamError(RollstreamError):
    """A response stream could not be decoded.

    ``offset`` is the absolute byte offset in the body the problem refers to,
    ``excerpt`` a few bytes around it (decoded leniently, for the message).
    """

    def __init__(self, message: str, offset: int = 0, excerpt: str = "") -> None:
        self.message = message
        self.offset = offset
        self.excerpt = excerpt
        text = f"{message} (at byte {offset})"
        if excerpt:
            text += f" near {excerpt!r}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.offset, self.excerpt))


class StreamTruncatedError(StreamError):
    """The body ended inside an event or before ``data: [DONE]``: the
    connection was cut, so the result is incomplete. Safe to retry."""


class StreamProtocolError(StreamError):
    """The body is not a valid vLLM stream (malformed JSON, wrong field types,
    invalid UTF-8, inconsistent lengths, events after ``[DONE]``)."""


class StreamServerError(StreamError):
    """The server reported an error inside the stream (HTTP status stays 200).

    ``error_type`` and ``code`` are the server's; ``result`` holds what was
    decoded before the error (partial tokens), when available.
    """

    def __init__(
        self,
        message: str,
        offset: int = 0,
        excerpt: str = "",
        *,
        error_type: str | None = None,
        code: str | None = None,
        result: Any = None,
    ) -> None:
        super().__init__(message, offset, excerpt)
        self.error_type = error_type
        self.code = code
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_server_error, (self.message, self.offset, self.excerpt, self.error_type, self.code))


def _rebuild_server_error(
    message: str, offset: int, excerpt: str, error_type: str | None, code: str | None
) -> StreamServerError:
    return StreamServerError(message, offset, excerpt, error_type=error_type, code=code)


class EngineError(RollstreamError):
    """A local inference engine could not be installed, started or reached."""


class EngineUnavailableError(EngineError):
    """No engine can take the request: the pool is empty or closed, or every
    replica of a deployment is gone."""


class DeploymentError(EngineError):
    """A deployment operation failed (create, scale, update, delete). The
    message names the deployment and, where one is involved, the replica."""


class EngineStartError(EngineError):
    """The engine process exited or did not become healthy in time. The message
    includes the tail of the server log."""


class TokenizerError(RollstreamError):
    """A tokenizer could not be loaded, or encoding/decoding failed."""


class TemplateError(TokenizerError):
    """The chat template failed to compile or render.

    ``template_message`` is the template's own message (for
    ``raise_exception``), ``line`` the 1-based template line and
    ``source_line`` its text, when known; ``raised`` tells a deliberate
    ``raise_exception`` from a template bug.
    """

    def __init__(
        self,
        message: str,
        template_message: str | None = None,
        line: int | None = None,
        source_line: str | None = None,
        raised: bool = False,
    ) -> None:
        super().__init__(message)
        self.template_message = template_message if template_message is not None else message
        self.line = line
        self.source_line = source_line
        self.raised = raised

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.template_message, self.line, self.source_line, self.raised))


class ChatFormatError(TokenizerError, ValueError):
    """The conversation is malformed (unknown role, content of the wrong
    type, ...): raised before rendering instead of producing a wrong prompt."""


#: Context keys a caller may attach to sampling errors (the sampler's
#: ``request_context`` and a call's ``sampling_context``), as the Fireworks
#: SDK does: identity, never payloads.
CONTEXT_KEYS = ("session", "run", "checkpoint", "step", "group", "item")


def clean_context(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recognised, non-None context keys of ``raw``."""
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"a sampling context must be a mapping, got {type(raw).__name__}")
    return {k: raw[k] for k in CONTEXT_KEYS if raw.get(k) is not None}


class SamplingRequestError(RollstreamError, RuntimeError):
    """A logical sampling request failed (the Fireworks SDK's terminal error,
    with its attributes).

    Every sampling failure rollstream raises derives from it, so ``except
    SamplingRequestError`` and ``except RuntimeError`` catch them all.

    ``logical_request_id`` is the request's stable id (sent as
    ``X-Request-Id`` on every attempt), ``request_id`` the id the server
    echoed on the last attempt, ``attempts`` how many were made and
    ``server_attempts`` what each one did (:class:`~rollstream.SampledServerAttempt`).
    ``final_status`` is the last HTTP status that decided the outcome,
    ``final_error_kind`` one of ``http_status``, ``sse_truncation``,
    ``connection``, ``timeout``, ``upstream_stream``, ``protocol``,
    ``sampling_mask``, ``closed``, ``deadline``. ``context`` holds the
    recognised keys of the sampler's ``request_context`` and the call's
    ``sampling_context``. Never carries prompts, tokens or keys. Picklable
    (``BaseException``'s protocol: the message, then the attributes).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        logical_request_id: str | None = None,
        model: str | None = None,
        attempts: int | None = None,
        final_status: int | None = None,
        final_error_kind: str | None = None,
        request_id: str | None = None,
        wire_status: int | None = None,
        upstream_response_id: str | None = None,
        upstream_error_code: str | None = None,
        upstream_error_type: str | None = None,
        upstream_finish_reason: str | None = None,
        retry_budget_exhausted: bool | None = None,
        context: Mapping[str, Any] | None = None,
        server_attempts: tuple[Any, ...] = (),
        completed: list[Any] | None = None,
    ) -> None:
        self.logical_request_id = logical_request_id
        self.model = model
        self.attempts = attempts
        self.final_status = final_status
        self.final_error_kind = final_error_kind
        self.request_id = request_id
        self.wire_status = wire_status
        self.upstream_response_id = upstream_response_id
        self.upstream_error_code = upstream_error_code
        self.upstream_error_type = upstream_error_type
        self.upstream_finish_reason = upstream_finish_reason
        self.retry_budget_exhausted = retry_budget_exhausted
        self.context = clean_context(context)
        self.server_attempts: tuple[Any, ...] = tuple(server_attempts)
        #: Samples of the same call that completed before this failure
        #: cancelled their siblings (they are not returned by the call).
        self.completed: list[Any] = list(completed or [])
        super().__init__(message if message is not None else self._default_message())

    def _default_message(self) -> str:
        parts = [f"sampling request failed after {self.attempts} attempts:"]
        if self.final_status is not None:
            parts.append(f"HTTP {self.final_status}")
        elif self.final_error_kind:
            parts.append(self.final_error_kind)
        if self.model:
            parts.append(f"model={self.model}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        parts.extend(f"{k}={v}" for k, v in self.context.items())
        if self.logical_request_id:
            parts.append(f"logical_request_id={self.logical_request_id}")
        return " ".join(parts)

    def as_error_record(self) -> dict[str, Any]:
        """A compact record for logs: identity and terminal status only."""
        record: dict[str, Any] = {
            "logical_request_id": self.logical_request_id,
            "model": self.model,
            "attempts": self.attempts,
            "final_status": self.final_status,
            "final_error_kind": self.final_error_kind,
            "request_id": self.request_id,
        }
        if self.context:
            record["context"] = dict(self.context)
        for key in (
            "wire_status",
            "upstream_response_id",
            "upstream_error_code",
            "upstream_error_type",
            "upstream_finish_reason",
            "retry_budget_exhausted",
        ):
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        return record

    def with_context(self, message: str, *, completed: list[Any]) -> SamplingRequestError:
        """A copy with a message naming the whole call, and its completed samples."""
        new = copy.copy(self)
        new.args = (message,)
        new.completed = completed
        return new


class DeploymentSamplerTimeoutError(SamplingRequestError):
    """A sampling request failed on a timeout (HTTP 408/504, no progress within
    the idle or attempt timeout, or the request's total deadline). The message
    carries the diagnostic: prompt and token sizes, the concurrency window,
    recent queue and time-to-first-token p95s, ``timeout_diagnostic_context``."""


class SamplingError(SamplingRequestError):
    """rollstream's sampling failures (all are :class:`SamplingRequestError`).

    ``request_id`` names the request (``X-Request-Id``) that failed;
    ``completed`` holds the samples of the same call that had completed
    before the failure cancelled their siblings (nothing is returned twice:
    these are not returned by the call).
    """


class RequestRejectedError(SamplingError, ValueError):
    """The server refused the request (a 4xx other than 408/425/429):
    retrying cannot help. ``status`` is the HTTP status, ``server_message``
    the server's own message."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        server_message: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("final_status", status)
        kwargs.setdefault("final_error_kind", "http_status")
        super().__init__(message, **kwargs)
        self.status = status
        self.server_message = server_message


class RetriesExhaustedError(SamplingError):
    """Every attempt failed with a retryable error; the message names the last."""


class SamplingTimeoutError(RetriesExhaustedError, DeploymentSamplerTimeoutError):
    """Every attempt failed and the last one on a timeout (HTTP 408/504, or
    no progress within the idle or attempt timeout)."""


class DeadlineExceededError(SamplingError, DeploymentSamplerTimeoutError, TimeoutError):
    """The logical request's total deadline passed (across retries)."""


class SamplingProtocolError(SamplingError):
    """The server's reply cannot be a valid answer to the request (malformed
    stream, wrong number of logprobs, a missing finish reason...). Such
    replies are deterministic, so they are not retried. ``excerpt`` holds the
    offending bytes (or a description), ``offset`` their position in the
    body when known."""

    def __init__(
        self, message: str | None = None, *, excerpt: str = "", offset: int | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("final_error_kind", "protocol")
        super().__init__(message, **kwargs)
        self.excerpt = excerpt
        self.offset = offset


class SamplingMaskError(SamplingError):
    """The sampling mask of a completion is unavailable or its reply from the
    server is malformed (``excerpt`` shows the reply)."""

    def __init__(self, message: str | None = None, *, excerpt: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("final_error_kind", "sampling_mask")
        super().__init__(message, **kwargs)
        self.excerpt = excerpt


class TransportClosedError(SamplingError):
    """The sampler (or its transport) was closed while the request was in
    flight, or before it was made."""

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("final_error_kind", "closed")
        super().__init__(message, **kwargs)


class SnapshotError(RollstreamError):
    """A snapshot or delta operation failed. ``path`` and ``tensor`` name
    what it is about, when known. Nothing is written where a result would
    live when an operation fails."""

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.path, self.tensor))


class SnapshotIOError(SnapshotError, OSError):
    """Reading or writing a snapshot file failed."""


class SnapshotCorruptError(SnapshotError):
    """A file is not a valid safetensors file, delta or manifest (truncated,
    bad header, offsets outside the file...)."""


class TensorMismatchError(SnapshotError, ValueError):
    """Base and new (or base and delta) disagree on a tensor's presence,
    dtype or shape."""


class ChecksumMismatchError(SnapshotError):
    """Decoded data does not match its recorded checksum: a corrupted delta,
    or a delta applied to the wrong base."""


class HotloadError(RollstreamError, RuntimeError):
    """Loading weights into a running server or deployment failed. Servers
    were resumed (never left paused); ``stage`` names the step that failed
    (``check``, ``stage``, ``pause``, ``reload``, ``verify``, ``resume``,
    ``rollback``) and ``replica`` the server, when one is to blame. A
    ``RuntimeError`` too, as the Fireworks SDK's hot-load failures are."""

    def __init__(self, message: str, stage: str | None = None, replica: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.replica = replica

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.stage, self.replica))
