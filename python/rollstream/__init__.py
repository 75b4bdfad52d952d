"""rollstream: samples out of vLLM and weights back in, for RL trainers.

The hot paths (stream decoding, tokenization, masks, checksums, deltas) are
in a Rust core; this package is the API trainers call.
"""

from __future__ import annotations

from . import _core
from ._exceptions import (
    ChatFormatError,
    DeadlineExceededError,
    DeploymentSamplerTimeoutError,
    EngineError,
    EngineStartError,
    EngineUnavailableError,
    HotloadError,
    RequestRejectedError,
    RetriesExhaustedError,
    RollstreamError,
    SamplingError,
    SamplingMaskError,
    SamplingProtocolError,
    SamplingRequestError,
    SamplingTimeoutError,
    StreamError,
    StreamProtocolError,
    StreamServerError,
    StreamTruncatedError,
    TemplateError,
    TokenizerError,
    TransportClosedError,
)
from ._models import (
    SampledCompletion,
    SampledRequestResult,
    SampledServerAttempt,
    SamplerMetrics,
    ServerMetrics,
)
from ._pool import EndpointPool, Route, StaticPool
from .concurrency import (
    AdaptiveConcurrencyController,
    FixedConcurrencyController,
    SamplingConcurrencyController,
)
from .sampler import DeploymentSampler, RetryPolicy, SamplerTimeouts, sample_seed
from .streams import StreamDecoder, StreamResult, parse_stream
from .tokenizer import ChatTokenizer

__version__: str = _core.__version__

__all__ = [
    "AdaptiveConcurrencyController",
    "ChatFormatError",
    "ChatTokenizer",
    "DeadlineExceededError",
    "DeploymentSampler",
    "DeploymentSamplerTimeoutError",
    "EndpointPool",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "FixedConcurrencyController",
    "HotloadError",
    "RequestRejectedError",
    "RetriesExhaustedError",
    "RetryPolicy",
    "RollstreamError",
    "Route",
    "SampledCompletion",
    "SampledRequestResult",
    "SampledServerAttempt",
    "SamplerMetrics",
    "SamplerTimeouts",
    "SamplingConcurrencyController",
    "SamplingError",
    "SamplingMaskError",
    "SamplingProtocolError",
    "SamplingRequestError",
    "SamplingTimeoutError",
    "ServerMetrics",
    "StaticPool",
    "StreamDecoder",
    "StreamError",
    "StreamProtocolError",
    "StreamResult",
    "StreamServerError",
    "StreamTruncatedError",
    "TemplateError",
    "TokenizerError",
    "TransportClosedError",
    "__version__",
    "parse_stream",
    "sample_seed",
]
