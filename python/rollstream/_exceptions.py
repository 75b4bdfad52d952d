"""The exception hierarchy of rollstream: everything raised on purpose derives
from :class:`RollstreamError`.

Errors caused by a bad argument also derive from the matching builtin
(``ValueError``/``TypeError``) so existing ``except ValueError`` code keeps
working.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "DeploymentError",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "RollstreamError",
    "StreamError",
    "StreamProtocolError",
    "StreamServerError",
    "StreamTruncatedError",
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


class SamplingError(RollstreamError):
    """Sampling failed.

    ``request_id`` names the request (``X-Request-Id``) that failed;
    ``completed`` holds the samples of the same call that had completed
    before the failure cancelled their siblings (nothing is returned twice:
    these are not returned by the call).
    """

    def __init__(
        self, message: str, *, request_id: str | None = None, completed: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.completed: list[Any] = completed or []

    def with_context(self, message: str, *, completed: list[Any]) -> SamplingError:
        """A copy with a message naming the whole call, and its completed samples."""
        new = copy.copy(self)
        new.args = (message,)
        new.completed = completed
        return new


class RequestRejectedError(SamplingError, ValueError):
    """The server refused the request (a 4xx other than 408/425/429):
    retrying cannot help. ``server_message`` is the server's own message."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
        request_id: str | None = None,
        completed: list[Any] | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, completed=completed)
        self.status = status
        self.server_message = server_message


class RetriesExhaustedError(SamplingError):
    """Every attempt failed with a retryable error; the message names the last."""


class DeadlineExceededError(SamplingError, TimeoutError):
    """The logical request's total deadline passed (across retries)."""


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
