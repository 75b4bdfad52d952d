"""rollstream: samples out of vLLM and weights back in, for RL trainers.

The hot paths (stream decoding, tokenization, masks, checksums, deltas) are
in a Rust core; this package is the API trainers call.
"""

from __future__ import annotations

from . import _core
from ._exceptions import (
    EngineError,
    EngineStartError,
    RollstreamError,
    StreamError,
    StreamProtocolError,
    StreamServerError,
    StreamTruncatedError,
)
from .streams import StreamDecoder, StreamResult, parse_stream

__version__: str = _core.__version__

__all__ = [
    "EngineError",
    "EngineStartError",
    "RollstreamError",
    "StreamDecoder",
    "StreamError",
    "StreamProtocolError",
    "StreamResult",
    "StreamServerError",
    "StreamTruncatedError",
    "__version__",
    "parse_stream",
]
