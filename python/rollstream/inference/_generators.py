"""Generators on the client: single-turn and multi-turn rollouts, SkyRL's
``GeneratorInterface``.

Multi-turn is token-in/token-out: each turn's prompt is the previous turn's
ids plus the new messages rendered on their own (never a re-tokenisation of
the conversation text), so the ids the trainer gets are exactly the ids the
engine sampled, and the loss mask covers the model's own tokens only.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .._models import SampledCompletion
from ..masks import SamplingMask
from ..streams import WeightVersionSpan
from ..tokenizer import ChatTokenizer
from ._client import InferenceEngineClient
from ._types import ConversationType, GeneratorInput, GeneratorInterface, GeneratorOutput

__all__ = [
    "Environment",
    "MultiTurnGenerator",
    "SingleTurnGenerator",
    "StepResult",
    "Trajectory",
]


@dataclass(frozen=True)
class StepResult:
    """What an environment's ``step`` returns: new messages for the model
    (``role`` ``user`` or ``tool``; empty when done), a reward, done."""

    observations: list[dict[str, Any]]
    reward: float = 0.0
    done: bool = False


@runtime_checkable
class Environment(Protocol):
    """A user environment. ``step`` gets the model's turn (its text, or its
    token ids with ``MultiTurnGenerator(..., env_input="tokens")``) and
    returns a :class:`StepResult` or an ``(observations, reward, done)``
    tuple, synchronously or as an awaitable."""

    def step(self, action: Any) -> Any: ...


EnvFactory = Callable[[str | None, Mapping[str, Any]], Environment]
RewardFn = Callable[[ConversationType, str, Mapping[str, Any]], "float | Awaitable[float]"]


@dataclass
class Trajectory:
    """One rollout as it grows."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_rewards: list[float] = field(default_factory=list)
    reward: float = 0.0
    stop_reason: str = "unknown"
    versions: list[WeightVersionSpan] = field(default_factory=list)
    masks: list[SamplingMask] = field(default_factory=list)
    turns: list[SampledCompletion] = field(default_factory=list)

    def add_model_turn(self, c: SampledCompletion) -> None:
        start = len(self.response_ids)
        ids = c.completion_ids.tolist()
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        lps = c.completion_logprobs
        self.logprobs += lps.tolist() if lps is not None else [0.0] * len(ids)
        self.token_rewards += [0.0] * len(ids)
        self.versions += [
            WeightVersionSpan(s.version, s.start + start, s.end + start) for s in c.weight_versions
        ]
        if c.sampling_mask is not None:
            self.masks.append(c.sampling_mask)
        self.turns.append(c)
        self.stop_reason = c.finish_reason

    def add_observation(self, ids: list[int]) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.token_rewards += [0.0] * len(ids)

    def reward_at_last_model_token(self, reward: float) -> None:
        for i in range(len(self.loss_mask) - 1, -1, -1):
            if self.loss_mask[i]:
                self.token_rewards[i] += reward
                return


def _collect(trajectories: Sequence[Trajectory], per_token: bool, logprobs: bool) -> GeneratorOutput:
    out: GeneratorOutput = {
        "prompt_token_ids": [t.prompt_ids for t in trajectories],
        "response_ids": [t.response_ids for t in trajectories],
        "rewards": [t.token_rewards for t in trajectories] if per_token else [t.reward for t in trajectories],
        "loss_masks": [t.loss_mask for t in trajectories],
        "stop_reasons": [t.stop_reason for t in trajectories],
        "rollout_logprobs": [t.logprobs for t in trajectories] if logprobs else None,
        "weight_versions": [tuple(t.versions) for t in trajectories],
        "sampling_masks": [t.masks for t in trajectories] if any(t.masks for t in trajectories) else None,
        "num_turns": [len(t.turns) for t in trajectories],
        "completions": [list(t.turns) for t in trajectories],
        "rollout_metrics": {
            "generate/avg_num_tokens": sum(len(t.response_ids) for t in trajectories)
            / max(1, len(trajectories)),
            "generate/avg_num_turns": sum(len(t.turns) for t in trajectories) / max(1, len(trajectories)),
        },
    }
    return out


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


def _step_result(out: Any) -> StepResult:
    if isinstance(out, StepResult):
        return out
    if isinstance(out, tuple) and len(out) == 3:
        obs, reward, done = out
        if isinstance(obs, str):
            obs = [{"role": "user", "content": obs}]
        elif isinstance(obs, Mapping):
            obs = [dict(obs)]
        return StepResult(list(obs or []), float(reward), bool(done))
    raise TypeError(
        f"an environment's step() must return a StepResult or (observations, reward, done), got {out!r}"
    )


class SingleTurnGenerator(GeneratorInterface):
    """One model turn per prompt, scored by ``reward_fn(prompt, text,
    extras) -> float`` (sync or async). Each prompt is admitted under the
    client's staleness bound."""

    def __init__(self, client: InferenceEngineClient, reward_fn: RewardFn | None = None) -> None:
        self.client = client
        self.reward_fn = reward_fn

    async def generate(self, input_batch: GeneratorInput) -> GeneratorOutput:
        prompts = _prompts(input_batch)
        extras = input_batch.get("env_extras") or [{} for _ in prompts]
        params = dict(input_batch.get("sampling_params") or {})
        tok = _tokenizer(self.client)

        async def one(prompt: ConversationType, extra: Mapping[str, Any]) -> Trajectory:
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            await self.client.admit()
            (c,) = await self.client.sample_completions(ids, 1, params, admitted=True)
            t = Trajectory(prompt_ids=list(ids))
            t.add_model_turn(c)
            if self.reward_fn is not None:
                t.reward = float(await _maybe_await(self.reward_fn(prompt, c.text, extra)))
                t.reward_at_last_model_token(t.reward)
            return t

        trajectories = await asyncio.gather(*(one(p, e) for p, e in zip(prompts, extras, strict=True)))
        return _collect(trajectories, per_token=False, logprobs=bool(params.get("logprobs") is not None))


class MultiTurnGenerator(GeneratorInterface):
    """Multi-turn rollouts against a user environment, token-in/token-out.

    ``env_factory(env_class, extras)`` makes one environment per task (the
    batch's ``env_classes`` / ``env_extras``). Each turn: the model samples
    from the trajectory's ids so far (one session per trajectory, so every
    turn reuses its engine's prefix cache), the environment steps on the
    model's text (or ids: ``env_input="tokens"``), its observation messages
    are rendered alone and appended, until ``done``, ``max_turns``, a
    truncated turn, or ``max_total_tokens``. ``tools`` are given to the chat
    template (the model sees them; the environment answers ``role: tool``).
    ``per_token_rewards``: rewards placed on the last token of the turn
    they answer instead of summed per trajectory. A turn cut by
    ``max_tokens`` ends the rollout unless ``stop_on_truncation=False``
    (then the turn is closed with the template's end-of-turn tokens, which
    are not the model's and are masked out)."""

    def __init__(
        self,
        client: InferenceEngineClient,
        env_factory: EnvFactory,
        *,
        max_turns: int = 8,
        max_total_tokens: int | None = None,
        env_input: Literal["text", "tokens"] = "text",
        tools: Sequence[Mapping[str, Any]] | None = None,
        per_token_rewards: bool = False,
        stop_on_truncation: bool = True,
    ) -> None:
        if env_input not in ("text", "tokens"):
            raise ValueError(f"env_input must be 'text' or 'tokens', got {env_input!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a positive int, got {max_turns!r}")
        self.client = client
        self.env_factory = env_factory
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.env_input = env_input
        self.tools = list(tools) if tools else None
        self.per_token_rewards = per_token_rewards
        self.stop_on_truncation = stop_on_truncation
        self._tok = _tokenizer(client)
        self._base, self._close = self._turn_boundary()

    def _turn_boundary(self) -> tuple[list[int], list[int]]:
        """The ids of a one-exchange chat and what follows the assistant's
        content in it (the end-of-turn token and any separator): observation
        ids are rendered as the difference between that chat with and
        without the new messages."""
        tok = self._tok
        marker = "rollstream"
        base_chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        base = tok.apply_chat_template(
            base_chat, tools=self.tools, add_generation_prompt=False, tokenize=True
        )
        m = tok.encode(marker)
        for i in range(len(base) - len(m), -1, -1):
            if base[i : i + len(m)] == m:
                return base, base[i + len(m) :]
        raise ValueError("the chat template does not render an assistant message's content verbatim")

    def observation_ids(
        self, observations: Sequence[Mapping[str, Any]], last_model_ids: Sequence[int]
    ) -> list[int]:
        """The ids that follow a model turn ending in ``last_model_ids``:
        the end of the assistant turn (those of its tokens the model did not
        produce) and the observation messages with the generation prompt."""
        tok = self._tok
        base_chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "rollstream"}]
        full = tok.apply_chat_template(
            [*base_chat, *observations], tools=self.tools, add_generation_prompt=True, tokenize=True
        )
        if full[: len(self._base)] != self._base:
            raise ValueError(
                "the chat template renders earlier messages differently once observations follow; "
                "multi-turn token-in/token-out needs a template whose history is stable"
            )
        close = self._close
        if close and last_model_ids and last_model_ids[-1] == close[0]:
            close = close[1:]
        return [*close, *full[len(self._base) :]]

    async def generate(self, input_batch: GeneratorInput) -> GeneratorOutput:
        prompts = _prompts(input_batch)
        given = input_batch.get("env_classes")
        classes: list[str | None] = list(given) if given else [None] * len(prompts)
        extras = input_batch.get("env_extras") or [{} for _ in prompts]
        if not (len(classes) == len(extras) == len(prompts)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(classes)} env_classes and {len(extras)} env_extras differ"
            )
        params = dict(input_batch.get("sampling_params") or {})
        trajectories = await asyncio.gather(
            *(self._rollout(p, c, e, params) for p, c, e in zip(prompts, classes, extras, strict=True))
        )
        return _collect(
            trajectories, per_token=self.per_token_rewards, logprobs=bool(params.get("logprobs") is not None)
        )

    async def _rollout(
        self,
        prompt: ConversationType,
        env_class: str | None,
        extras: Mapping[str, Any],
        params: dict[str, Any],
    ) -> Trajectory:
        env = self.env_factory(env_class, extras)
        ids = self._tok.apply_chat_template(
            prompt, tools=self.tools, add_generation_prompt=True, tokenize=True
        )
        t = Trajectory(prompt_ids=list(ids))
        session = f"traj-{uuid.uuid4().hex}"
        await self.client.admit()
        try:
            for _ in range(self.max_turns):
                turn_params = dict(params)
                if self.max_total_tokens is not None:
                    room = self.max_total_tokens - len(t.prompt_ids) - len(t.response_ids)
                    if room <= 0:
                        t.stop_reason = "length"
                        break
                    turn_params["max_tokens"] = min(int(turn_params.get("max_tokens", room)), room)
                (c,) = await self.client.sample_completions(
                    t.prompt_ids + t.response_ids, 1, turn_params, session_id=session, admitted=True
                )
                t.add_model_turn(c)
                action: Any = c.text if self.env_input == "text" else c.completion_ids.tolist()
                step = _step_result(await _maybe_await(env.step(action)))
                t.reward += step.reward
                t.reward_at_last_model_token(step.reward)
                truncated = c.finish_reason == "length" and self.stop_on_truncation
                if step.done or truncated or not step.observations:
                    break
                t.add_observation(self.observation_ids(step.observations, c.completion_ids.tolist()))
        finally:
            if self.client.engine_urls:
                self.client.finish_session(session)
            close = getattr(env, "close", None)
            if callable(close):
                await _maybe_await(close())
        return t


def _prompts(batch: GeneratorInput) -> list[ConversationType]:
    prompts = batch.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("GeneratorInput needs 'prompts': a non-empty list of chats")
    return prompts


def _tokenizer(client: InferenceEngineClient) -> ChatTokenizer:
    if client.tokenizer is None:
        raise ValueError("generators render chats: InferenceEngineClient(..., tokenizer=...)")
    return client.tokenizer
