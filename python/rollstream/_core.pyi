"""Type stubs of the compiled extension ``rollstream._core`` (Rust).

These are low-level entry points; the public API wraps them in
:mod:`rollstream.streams` and friends.
"""

from collections.abc import Callable
from typing import Any, Literal, final

__version__: str

@final
class StreamDecoder:
    """Incremental decoder of one vLLM SSE response body."""

    def __init__(self) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def finish(self) -> dict[str, Any]: ...
    def partial(self) -> dict[str, Any]: ...
    @property
    def events(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def done(self) -> bool: ...

def decode_stream(body: bytes) -> dict[str, Any]: ...

@final
class ChatTokenizer:
    """Low-level chat tokenizer (see rollstream.ChatTokenizer)."""

    def __init__(
        self,
        tokenizer_json: str,
        chat_template: str | None = None,
        special_tokens: dict[str, Any] | None = None,
        extra_roles: list[str] = ...,
        fixed_time: int | None = None,
    ) -> None: ...
    @property
    def has_fast_path(self) -> bool: ...
    @property
    def encoder(self) -> str: ...
    @property
    def has_template(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def render(
        self,
        messages: Any,
        tools: Any = None,
        documents: Any = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> str: ...
    def apply(
        self,
        messages: Any,
        tools: Any = None,
        documents: Any = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...
    def apply_batch(
        self,
        conversations: Any,
        tools: Any = None,
        documents: Any = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]: ...
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def encode_reference(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[Any]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

@final
class RequestHandle:
    def cancel(self) -> None: ...
    @property
    def tokens(self) -> int: ...

@final
class StreamOk:
    """A completed attempt: a 2xx response whose stream decoded to [DONE]."""

    def __init__(
        self,
        status: int,
        result: dict[str, Any],
        head_s: float,
        first_byte_s: float,
        first_token_s: float,
        total_s: float,
        request_id: str | None = None,
    ) -> None: ...
    @property
    def ok(self) -> Literal[True]: ...
    @property
    def status(self) -> int: ...
    @property
    def result(self) -> dict[str, Any]: ...
    @property
    def head_s(self) -> float: ...
    @property
    def first_byte_s(self) -> float: ...
    @property
    def first_token_s(self) -> float: ...
    @property
    def total_s(self) -> float: ...
    @property
    def request_id(self) -> str | None: ...

FailureKind = Literal["invalid", "connect", "timeout", "transport", "status", "decode", "cancelled", "closed"]

@final
class StreamFailure:
    """How an attempt failed."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        tokens: int = 0,
        *,
        status: int | None = None,
        body: str | None = None,
        retry_after: str | None = None,
        truncated: bool = False,
        offset: int | None = None,
        excerpt: str | None = None,
    ) -> None: ...
    @property
    def ok(self) -> Literal[False]: ...
    @property
    def kind(self) -> FailureKind: ...
    @property
    def message(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def status(self) -> int | None: ...
    @property
    def body(self) -> str | None: ...
    @property
    def retry_after(self) -> str | None: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def excerpt(self) -> str | None: ...

@final
class StreamClient:
    def __init__(
        self, worker_threads: int = 1, connect_timeout: float = 10.0, pool_idle_timeout: float = 90.0
    ) -> None: ...
    def submit(
        self,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        idle_timeout: float,
        total_timeout: float,
        callback: Callable[[StreamOk | StreamFailure], None],
    ) -> RequestHandle: ...
    @property
    def in_flight(self) -> int: ...
    def close(self) -> None: ...

@final
class Aimd:
    def __init__(
        self,
        initial_window: float,
        min_window: float,
        max_window: float,
        target: float,
        *,
        additive_increase: float = 1.0,
        decrease: float = 0.5,
        alpha: float = 0.3,
        interval: int = 32,
        cooldown: float = 1.0,
    ) -> None: ...
    @property
    def window(self) -> int: ...
    @property
    def ema(self) -> float | None: ...
    def queue_time(self, seconds: float, now: float) -> int: ...
    def first_token(self, seconds: float, prefill_tokens: int, now: float) -> int: ...
    def congestion(self, retry_attempt: int, now: float) -> int: ...
    def step(self, now: float) -> dict[str, Any]: ...

def shutdown_callbacks() -> None: ...
def adler32(data: Any, value: int = 1) -> int: ...
def xxh3_64(data: Any) -> int: ...
def encode_delta_files(
    base: Any, new: Any, out: Any, format: str = "rsd1", level: int = 1, chunk_elems: int = ...
) -> dict[str, Any]: ...
def decode_delta_files(base: Any, delta_path: Any, out: Any) -> dict[str, Any]: ...
def encode_delta_buffers(
    base: list[tuple[str, str, list[int], Any]],
    new: list[tuple[str, str, list[int], Any]],
    format: str = "rsd1",
    level: int = 1,
    chunk_elems: int = ...,
) -> tuple[bytes, dict[str, Any]]: ...
def decode_delta_buffers(
    base: list[tuple[str, str, list[int], Any]], delta_bytes: Any
) -> tuple[list[tuple[str, str, list[int], bytes]], dict[str, Any]]: ...
def write_safetensors(
    path: Any, tensors: list[tuple[str, str, list[int], Any]], metadata: dict[str, str] | None = None
) -> dict[str, tuple[int, int]]: ...
def safetensors_checksums(path: Any) -> dict[str, tuple[str, list[int], int, int]]: ...
def encode_delta_from_file(
    base: Any,
    new: list[tuple[str, str, list[int], Any]],
    out: Any,
    format: str = "rsd1",
    level: int = 1,
    chunk_elems: int = ...,
) -> dict[str, Any]: ...
def apply_mask_inplace(
    logits: Any, row_start: int, token_ids: Any, offsets: Any, fill_bits: int, keep: Any = None
) -> None: ...
def mask_to_dense(token_ids: Any, offsets: Any, vocab: int) -> Any: ...
