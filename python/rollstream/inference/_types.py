"""SkyRL's generator API, by name: the engine interface with its input and
output dicts, and the generator interface with its batch dicts.

A trainer written against SkyRL's ``InferenceEngineInterface`` /
``GeneratorInterface`` reads these unchanged. rollstream's additions are
extra keys (``weight_versions``, ``sampling_masks``, ``completions``,
``rollout_logprobs``...) that SkyRL code ignores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from .._models import SampledCompletion
    from ..masks import SamplingMask
    from ..streams import WeightVersionSpan

__all__ = [
    "ConversationType",
    "GeneratorInput",
    "GeneratorInterface",
    "GeneratorOutput",
    "InferenceEngineInput",
    "InferenceEngineInterface",
    "InferenceEngineOutput",
]

#: A chat: ``[{"role": ..., "content": ...}, ...]``.
ConversationType = list[dict[str, Any]]


class InferenceEngineInput(TypedDict, total=False):
    """Exactly one of ``prompts`` (chats, rendered with the chat template)
    and ``prompt_token_ids``; ``session_ids`` keeps each prompt's session on
    one engine; ``sampling_params`` are vLLM's names (``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``,
    ``stop_token_ids``, ``logprobs`` (int or None), ``seed``...) plus
    rollstream's ``sampling_mask``; unknown keys go to vLLM verbatim."""

    prompts: list[ConversationType] | None
    prompt_token_ids: list[list[int]] | None
    sampling_params: dict[str, Any] | None
    session_ids: list[str | int | None] | None


class InferenceEngineOutput(TypedDict, total=False):
    """One entry per prompt (per sample for ``sample``), in input order."""

    responses: list[str]
    stop_reasons: list[str]
    response_ids: list[list[int]]
    #: Logprob of each response token, or None when none were asked for.
    response_logprobs: list[list[float]] | None
    # -- rollstream ----------------------------------------------------------
    #: Which weights produced which response tokens: ``(version, start, end)`` spans.
    weight_versions: list[tuple[WeightVersionSpan, ...]]
    #: The kept token ids of every sampled token (``sampling_mask=True``).
    sampling_masks: list[SamplingMask | None]
    #: The full samples (prompt ids, arrays, attempts, the engine that served them).
    completions: list[SampledCompletion]


class InferenceEngineInterface(ABC):
    """SkyRL's engine interface. :class:`~rollstream.inference.InferenceEngineClient`
    implements it over any number of vLLM servers; objects implementing it
    can also be given to the client as engines."""

    @abstractmethod
    async def generate(self, input_batch: InferenceEngineInput) -> InferenceEngineOutput: ...

    @abstractmethod
    async def sample(
        self,
        prompt_token_ids: list[int],
        num_samples: int,
        sampling_params: dict[str, Any] | None = None,
        session_id: str | int | None = None,
    ) -> InferenceEngineOutput: ...

    @abstractmethod
    async def chat_completion(self, request_payload: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    async def completion(self, request_payload: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    async def wake_up(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    async def sleep(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    async def teardown(self) -> None: ...

    @abstractmethod
    async def reset_prefix_cache(self) -> None: ...

    @abstractmethod
    async def pause_generation(self) -> None: ...

    @abstractmethod
    async def resume_generation(self) -> None: ...

    @abstractmethod
    async def abort_generation(self) -> None: ...

    @property
    @abstractmethod
    def tp_size(self) -> int: ...

    @property
    @abstractmethod
    def pp_size(self) -> int: ...

    @property
    @abstractmethod
    def dp_size(self) -> int: ...


class GeneratorInput(TypedDict, total=False):
    """A batch of tasks: a prompt (chat) each, the environment's class name
    and extras per task, the sampling parameters for every turn."""

    prompts: list[ConversationType]
    env_classes: list[str] | None
    env_extras: list[dict[str, Any]] | None
    sampling_params: dict[str, Any] | None


class GeneratorOutput(TypedDict, total=False):
    """What a trainer consumes, one entry per task, in input order.

    ``response_ids`` are every token after the prompt (model turns and the
    observations between them); ``loss_masks`` mark the model's own tokens
    (1) against observation tokens (0); ``rollout_logprobs`` are aligned with
    ``response_ids`` (0.0 on observation tokens); ``rewards`` are per
    trajectory (floats) or per token (lists aligned with ``response_ids``)."""

    prompt_token_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: list[float] | list[list[float]]
    loss_masks: list[list[int]]
    stop_reasons: list[str] | None
    rollout_metrics: dict[str, Any] | None
    rollout_logprobs: list[list[float]] | None
    # -- rollstream ----------------------------------------------------------
    #: Weight-version spans per trajectory, over ``response_ids`` positions.
    weight_versions: list[tuple[WeightVersionSpan, ...]]
    #: Per trajectory: one mask per model turn, in order (``sampling_mask=True``).
    sampling_masks: list[list[SamplingMask]] | None
    #: Engine turns (model calls) per trajectory.
    num_turns: list[int]
    #: Per trajectory: the engine's sample of each model turn, in order.
    completions: list[list[SampledCompletion]]


class GeneratorInterface(ABC):
    @abstractmethod
    async def generate(self, input_batch: GeneratorInput) -> GeneratorOutput:
        """Trajectories for the batch, in input order."""
