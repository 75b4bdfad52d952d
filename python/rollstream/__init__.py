"""rollstream: samples out of vLLM and weights back in, for RL trainers.

The hot paths (stream decoding, tokenization, masks, checksums, deltas) are
in a Rust core; this package is the API trainers call.
"""

from __future__ import annotations

from . import _core
from ._exceptions import (
    ChatFormatError,
    EngineError,
    EngineStartError,
    RollstreamError,
    StreamError,
    StreamProtocolError,
    StreamServerError,
    StreamTruncatedError,
    TemplateError,
    TokenizerError,
)
from .streams import StreamDecoder, StreamResult, parse_stream
from .tokenizer import ChatTokenizer

__version__: str = _core.__version__

__all__ = [
    "ChatFormatError",
    "ChatTokenizer",
    "EngineError",
    "EngineStartError",
    "RollstreamError",
    "StreamDecoder",
    "StreamError",
    "StreamProtocolError",
    "StreamResult",
    "StreamServerError",
    "StreamTruncatedError",
    "TemplateError",
    "TokenizerError",
    "__version__",
    "parse_stream",
]
