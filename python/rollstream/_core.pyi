"""Type stubs of the compiled extension ``rollstream._core`` (Rust).

These are low-level entry points; the public API wraps them in
:mod:`rollstream.streams` and friends.
"""

from collections.abc import Callable
from typing import Any, final

__version__: str

@final
class StreamDecoder:
    """Incremental decoder of one vLLM SSE response body."""

    def __init__(self, *, max_event_bytes: int = ...) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def finish(self) -> dict[str, Any]: ...
    def partial(self) -> dict[str, Any]: ...
    @property
    def events(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def done(self) -> bool: ...

def decode_stream(body: bytes, *, max_event_bytes: int = ...) -> dict[str, Any]: ...

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
class StreamClient:
    def __init__(
        self,
        worker_threads: int = 1,
        connect_timeout: float = 10.0,
        pool_idle_timeout: float = 90.0,
        *,
        max_event_bytes: int = ...,
    ) -> None: ...
    def submit(
        self,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        idle_timeout: float,
        total_timeout: float,
        callback: Callable[[dict[str, Any]], None],
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
        interval: int = 32,
        cooldown: float = 1.0,
    ) -> None: ...
    @property
    def window(self) -> int: ...
    def queue_time(self, seconds: float, now: float) -> int: ...
    def first_token(self, seconds: float, now: float) -> int: ...
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
def safetensors_header(path: Any) -> dict[str, tuple[str, tuple[int, ...]]]: ...
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
