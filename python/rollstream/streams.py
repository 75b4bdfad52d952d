"""Decoding vLLM's streaming responses.

The Rust core parses the SSE framing and every JSON event; what comes back are
contiguous numpy arrays per choice (``int64`` token ids, ``float32`` logprobs),
never one Python object per token.

Two entry points:

- :func:`parse_stream` for a complete recorded body (handy for debugging a
  logged response);
- :class:`StreamDecoder` to decode a body incrementally as it arrives.

Logprobs are faithful to the wire: vLLM clamps them at ``-9999.0`` (kept as
is) and sends NaN as ``null`` (kept as NaN, never turned into 0).

One event may buffer at most ``max_event_bytes`` (default
:data:`DEFAULT_MAX_EVENT_BYTES`, 64 MiB) before its terminating blank line:
a server that never sends one gets :class:`~rollstream.StreamProtocolError`
instead of growing the client's memory without bound.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias, Union

import numpy as np
import numpy.typing as npt

from . import _core
from ._exceptions import StreamServerError
from .masks import SamplingMask

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "ServerErrorInfo",
    "StreamChoice",
    "StreamDecoder",
    "StreamResult",
    "TopLogprobs",
    "Usage",
    "WeightVersionSpan",
    "parse_stream",
]

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
Candidate: TypeAlias = Union[int, str]  # noqa: UP007 - runtime alias on 3.10

#: Cap on one SSE event's buffered bytes: far above any vLLM event, far below memory.
DEFAULT_MAX_EVENT_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class TopLogprobs:
    """Top-logprob candidates of every generated token, in CSR form.

    Candidates of token ``t`` are entries ``offsets[t]:offsets[t+1]`` of
    ``logprobs`` and of ``token_ids`` (when the server identified candidates
    by id: the generate endpoint, or ``return_tokens_as_token_ids``; ``-1``
    marks a candidate given only by string) or of :meth:`tokens` (the
    completions and chat endpoints, keyed by decoded string; vLLM merges
    candidates whose strings collide, so rows can be shorter than asked).
    """

    offsets: Int64Array
    logprobs: Float32Array
    token_ids: Int64Array | None
    token_bytes: bytes = field(repr=False)
    token_offsets: Int64Array = field(repr=False)

    def __len__(self) -> int:
        return max(len(self.offsets) - 1, 0)

    def tokens(self) -> list[str] | None:
        """Candidate strings (flat, aligned with ``logprobs``), or None when
        the server gave only ids."""
        if len(self.token_offsets) == 0:
            return None
        text = self.token_bytes
        offs = self.token_offsets.tolist()
        return [text[a:b].decode("utf-8") for a, b in itertools.pairwise(offs)]

    def row(self, t: int) -> dict[Candidate, float]:
        """Candidates of generated token ``t`` as ``{id or string: logprob}``."""
        n = len(self)
        if not -n <= t < n:
            raise IndexError(f"token index {t} out of range for {n} generated tokens")
        t %= n
        a, b = int(self.offsets[t]), int(self.offsets[t + 1])
        keys: list[Candidate]
        if self.token_ids is not None and (self.token_ids[a:b] >= 0).all():
            keys = [int(x) for x in self.token_ids[a:b]]
        else:
            toks = self.tokens() or []
            keys = list(toks[a:b])
        return dict(zip(keys, (float(x) for x in self.logprobs[a:b]), strict=True))

    def to_list(self) -> list[dict[Candidate, float]]:
        """All rows as dicts (builds Python objects: for inspection, not hot paths)."""
        return [self.row(t) for t in range(len(self))]


@dataclass(frozen=True, slots=True)
class WeightVersionSpan:
    """Output tokens ``[start, end)`` were produced by weights ``version``."""

    version: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class StreamChoice:
    """Everything the stream carried for one choice index."""

    index: int
    token_ids: Int64Array
    #: Logprob of each sampled token (NaN where the server sent null); None
    #: when the request asked for no logprobs.
    logprobs: Float32Array | None
    #: Rank of each sampled token (generate endpoint only).
    ranks: Int64Array | None
    top_logprobs: TopLogprobs | None
    #: With ``echo``: logprobs of the prompt tokens (the first is NaN, nothing
    #: predicts it) and their top candidates; None without echo.
    prompt_logprobs: Float32Array | None
    prompt_top_logprobs: TopLogprobs | None
    text: str
    reasoning: str
    finish_reason: str | None
    #: The stop token id or stop string that ended the choice.
    stop_reason: int | str | None
    prompt_token_ids: Int64Array | None
    #: Routed expert ids, shape (tokens, layers, top_k) (MoE router replay).
    routed_experts: np.ndarray | None
    sampling_mask: SamplingMask | None
    weight_versions: tuple[WeightVersionSpan, ...]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ServerErrorInfo:
    """An ``{"error": ...}`` event the server sent inside the stream."""

    message: str
    type: str | None
    code: str | None
    param: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class StreamResult:
    """A decoded response stream."""

    #: Ordered by choice index.
    choices: list[StreamChoice]
    usage: Usage | None
    #: Per-request metrics (``--enable-per-request-metrics``): ``queue_time_ms``,
    #: ``time_to_first_token_ms``, ``generation_time_ms``, ...
    metrics: dict[str, float]
    request_id: str | None
    model: str | None
    error: ServerErrorInfo | None
    events: int
    bytes: int

    def __iter__(self) -> Iterator[StreamChoice]:
        return iter(self.choices)

    def raise_for_error(self) -> StreamResult:
        """Raise :class:`StreamServerError` if the server reported an error."""
        if self.error is not None:
            e = self.error
            raise StreamServerError(
                f"server error in stream: {e.message}"
                + (f" (type={e.type}, code={e.code})" if e.type or e.code else ""),
                e.offset,
                error_type=e.type,
                code=e.code,
                result=self,
            )
        return self


def _opt_array(a: np.ndarray, present: bool) -> Any:
    return a if present else None


def _top(top: dict[str, Any] | None) -> TopLogprobs | None:
    if top is None:
        return None
    ids = top["token_ids"]
    return TopLogprobs(
        offsets=top["offsets"],
        logprobs=top["logprobs"],
        token_ids=ids if len(ids) or not len(top["token_offsets"]) else None,
        token_bytes=top["token_bytes"],
        token_offsets=top["token_offsets"],
    )


def _choice(d: dict[str, Any]) -> StreamChoice:
    token_ids: Int64Array = d["token_ids"]
    logprobs: Float32Array = d["logprobs"]
    ranks: Int64Array = d["ranks"]
    top = d["top_logprobs"]
    prompt_lp: Float32Array = d["prompt_logprobs"]
    routed = None
    if d["routed_experts"] is not None:
        dtype, shape, raw = d["routed_experts"]
        routed = raw.view(np.dtype(dtype)).reshape(shape)
    mask = None
    if d["sampling_mask"] is not None:
        ids32, offs = d["sampling_mask"]
        mask = SamplingMask(ids32, offs)
    return StreamChoice(
        index=d["index"],
        token_ids=token_ids,
        logprobs=_opt_array(logprobs, d["has_logprobs"]),
        ranks=_opt_array(ranks, len(ranks) > 0),
        top_logprobs=_top(top),
        prompt_logprobs=_opt_array(prompt_lp, len(prompt_lp) > 0),
        prompt_top_logprobs=_top(d["prompt_top_logprobs"]),
        text=d["text"],
        reasoning=d["reasoning"],
        finish_reason=d["finish_reason"],
        stop_reason=d["stop_reason"],
        prompt_token_ids=d["prompt_token_ids"],
        routed_experts=routed,
        sampling_mask=mask,
        weight_versions=tuple(WeightVersionSpan(*w) for w in d["weight_versions"]),
    )


def _result(d: dict[str, Any]) -> StreamResult:
    usage = Usage(**d["usage"]) if d["usage"] is not None else None
    err = ServerErrorInfo(**d["error"]) if d["error"] is not None else None
    return StreamResult(
        choices=[_choice(c) for c in d["choices"]],
        usage=usage,
        metrics=d["metrics"],
        request_id=d["request_id"],
        model=d["model"],
        error=err,
        events=d["events"],
        bytes=d["bytes"],
    )


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")


def parse_stream(
    body: bytes | bytearray | memoryview,
    *,
    raise_on_error: bool = True,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> StreamResult:
    """Decode a complete vLLM SSE response body.

    Raises :class:`~rollstream.StreamTruncatedError` when the body is cut
    short, :class:`~rollstream.StreamProtocolError` when it is malformed (or
    one event exceeds ``max_event_bytes``), and
    (unless ``raise_on_error=False``) :class:`~rollstream.StreamServerError`
    when the server reported an error inside the stream; with
    ``raise_on_error=False`` that error is in :attr:`StreamResult.error`.
    """
    result = _result(_core.decode_stream(_as_bytes(body), max_event_bytes=max_event_bytes))
    return result.raise_for_error() if raise_on_error else result


class StreamDecoder:
    """Incremental decoder: :meth:`feed` body chunks as they arrive (any
    sizes, any split points), then :meth:`finish`. ``max_event_bytes`` caps
    what one event may buffer before its blank line."""

    __slots__ = ("_inner",)

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._inner = _core.StreamDecoder(max_event_bytes=max_event_bytes)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decode the next chunk. Raises :class:`~rollstream.StreamProtocolError`
        as soon as the bytes cannot be a valid stream."""
        self._inner.feed(_as_bytes(data))

    def finish(self, *, raise_on_error: bool = True) -> StreamResult:
        """End of body: the result, or :class:`~rollstream.StreamTruncatedError`."""
        result = _result(self._inner.finish())
        return result.raise_for_error() if raise_on_error else result

    def partial(self) -> StreamResult:
        """What was decoded so far, whatever state the body is in (for
        diagnostics after a failure). Ends the decoder."""
        return _result(self._inner.partial())

    @property
    def events(self) -> int:
        """Events decoded so far."""
        return self._inner.events

    @property
    def tokens(self) -> int:
        """Tokens decoded so far, over all choices."""
        return self._inner.tokens

    @property
    def done(self) -> bool:
        """Whether ``data: [DONE]`` was seen."""
        return self._inner.done
