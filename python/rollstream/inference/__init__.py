"""Many vLLM servers as one engine, and rollouts on top (SkyRL's API).

- :class:`InferenceEngineClient`: SkyRL's ``InferenceEngineInterface`` over
  engine URLs, a DeploymentManager deployment, or engine objects; routing in
  rollstream's Rust router (no router process), failover, pause/resume in
  keep or abort mode with continuation, weight updates on every engine,
  staleness-paced admissions.
- :class:`SingleTurnGenerator`, :class:`MultiTurnGenerator`: SkyRL's
  ``GeneratorInterface``; multi-turn is token-in/token-out.
- :class:`OpenAIServer` (``rollstream serve``): an OpenAI-compatible endpoint
  in front of the client for agent harnesses, recording every turn's ids;
  :func:`fetch_session` reads them from another process.
"""

from ._client import InferenceEngineClient
from ._generators import Environment, MultiTurnGenerator, SingleTurnGenerator, StepResult, Trajectory
from ._openai import parse_tool_calls
from ._server import OpenAIServer, ServerThread, Turn, fetch_session
from ._types import (
    ConversationType,
    GeneratorInput,
    GeneratorInterface,
    GeneratorOutput,
    InferenceEngineInput,
    InferenceEngineInterface,
    InferenceEngineOutput,
)

__all__ = [
    "ConversationType",
    "Environment",
    "GeneratorInput",
    "GeneratorInterface",
    "GeneratorOutput",
    "InferenceEngineClient",
    "InferenceEngineInput",
    "InferenceEngineInterface",
    "InferenceEngineOutput",
    "MultiTurnGenerator",
    "OpenAIServer",
    "ServerThread",
    "SingleTurnGenerator",
    "StepResult",
    "Trajectory",
    "Turn",
    "fetch_session",
    "parse_tool_calls",
]
