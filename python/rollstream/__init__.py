"""rollstream: samples out of vLLM and weights back in, for RL trainers.

The hot paths (stream decoding, tokenization, masks, checksums, deltas) are
in a Rust core; this package is the API trainers call.
"""

from __future__ import annotations

from . import _core
from ._exceptions import (
    ChatFormatError,
    DeadlineExceededError,
    EngineError,
    EngineStartError,
    RequestRejectedError,
    RetriesExhaustedError,
    RollstreamError,
    SamplingError,
    StreamError,
    StreamProtocolError,
    StreamServerError,
    StreamTruncatedError,
    TemplateError,
    TokenizerError,
)
from .concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
from .sampler import DeploymentSampler, RetryPolicy, SampledCompletion, SamplerMetrics, SamplerTimeouts
from .streams import StreamDecoder, StreamResult, parse_stream
from .tokenizer import ChatTokenizer

__version__: str = _core.__version__

__all__ = [
    "AdaptiveConcurrencyController",
    "ChatFormatError",
    "ChatTokenizer",
    "DeadlineExceededError",
    "DeploymentSampler",
    "EngineError",
    "EngineStartError",
    "FixedConcurrencyController",
    "RequestRejectedError",
    "RetriesExhaustedError",
    "RetryPolicy",
    "RollstreamError",
    "SampledCompletion",
    "SamplerMetrics",
    "SamplerTimeouts",
    "SamplingError",
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
