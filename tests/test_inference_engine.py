"""InferenceEngineClient and generators against two real vLLM servers (the
session's two-replica deployment): order across engines, sticky sessions,
weight updates in the middle of long generations in keep and abort mode,
batched completions, a multi-turn rollout whose ids are the engine's, a
killed engine mid-batch."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _engine_helpers import CHAT, model_dir_with, perturbed

from rollstream import ChatTokenizer, RequestRejectedError
from rollstream.deployment import DeploymentInfo, DeploymentManager, WeightSyncer
from rollstream.inference import (
    InferenceEngineClient,
    InferenceEngineInterface,
    MultiTurnGenerator,
    StepResult,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def _load(path: Path) -> dict[str, np.ndarray]:
    from rollstream.testing import need

    return dict(need("safetensors.numpy").load_file(str(path)))


class Policy:
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.weights


@pytest.fixture
def tok(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def live(deployment_manager: DeploymentManager, deployment: DeploymentInfo) -> DeploymentInfo:
    """The session deployment as it is now (earlier tests restart replicas:
    the session fixture's replica URLs may be stale)."""
    return deployment_manager.wait_for_ready(deployment.deployment_id, timeout_s=900)


@pytest.fixture
def client(deployment_manager: DeploymentManager, live: DeploymentInfo, tok: ChatTokenizer) -> Any:
    return InferenceEngineClient(live, tok, "tiny", deployment_manager=deployment_manager)


def _prompt(tok: ChatTokenizer, extra: int = 0) -> list[int]:
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(ids) + tok.encode(" again" * extra) if extra else list(ids)


def test_generate_keeps_input_order_across_both_engines(
    client: InferenceEngineClient, live: DeploymentInfo, tok: ChatTokenizer
) -> None:
    prompts = [tok.encode("count " * (i + 1)) for i in range(8)]

    async def go() -> Any:
        return await client.generate(
            {"prompt_token_ids": prompts, "sampling_params": {"max_tokens": 6, "logprobs": 0, "seed": 1}}
        )

    out = asyncio.run(go())
    completions = out["completions"]
    assert [c.prompt_tokens for c in completions] == prompts
    assert [len(r) for r in out["response_ids"]] == [c.completion_len for c in completions]
    assert out["response_logprobs"] is not None
    assert all(
        len(lp) == len(ids) for lp, ids in zip(out["response_logprobs"], out["response_ids"], strict=True)
    )
    assert {c.server_url for c in completions} == {r.url for r in live.replicas}
    assert all(c.weight_versions for c in completions), "the generate endpoint reports weight versions"
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(client.generate({"prompts": [CHAT], "prompt_token_ids": prompts}))
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(client.generate({}))


def test_sessions_stick_to_the_least_loaded_engine_until_finished(
    client: InferenceEngineClient, tok: ChatTokenizer
) -> None:
    prompt = _prompt(tok)

    async def go() -> tuple[set[str | None], set[str | None]]:
        a = {
            c.server_url
            for _ in range(3)
            for c in await client.sample_completions(prompt, 2, {"max_tokens": 3}, session_id="a")
        }
        b = {
            c.server_url
            for _ in range(3)
            for c in await client.sample_completions(prompt, 2, {"max_tokens": 3}, session_id="b")
        }
        return a, b

    a, b = asyncio.run(go())
    assert len(a) == 1
    assert len(b) == 1
    assert a != b, "the second session goes to the engine with fewer sessions"
    assert client.session_engine("a") == next(iter(a))
    assert client.finish_session("a")
    assert client.session_engine("a") is None
    assert client.finish_session("b")


def test_batched_completion_mixed_prompt_types_in_order_with_usage(
    client: InferenceEngineClient, tok: ChatTokenizer
) -> None:
    text = "The weights are"
    ids = tok.encode("Once upon a time")

    async def go() -> Any:
        return await client.completion(
            {"model": "tiny", "prompt": [text, ids, text], "n": 2, "max_tokens": 5, "logprobs": 1, "seed": 4}
        )

    out = asyncio.run(go())
    assert out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == list(range(6))
    expected_prompts = [tok.encode(text)] * 2 + [ids] * 2 + [tok.encode(text)] * 2
    assert [c["prompt_token_ids"] for c in out["choices"]] == expected_prompts
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == 2 * len(tok.encode(text)) + len(ids)
    for c in out["choices"]:
        assert c["text"] == tok.decode(c["token_ids"], skip_special_tokens=True)
        assert len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"])
    # One failing sub-request fails the call, with the engine's own message.
    with pytest.raises(RequestRejectedError) as caught:
        asyncio.run(client.completion({"prompt": [text, ids], "max_tokens": 5, "repetition_penalty": -1.0}))
    assert caught.value.status == 400
    assert "repetition_penalty" in str(caught.value)
    with pytest.raises(LookupError, match="not served"):
        asyncio.run(client.completion({"model": "other", "prompt": text}))


def test_chat_completion_is_openai_shaped_with_the_engines_ids(client: InferenceEngineClient) -> None:
    out = asyncio.run(
        client.chat_completion(
            {"messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "session_id": "chat-1"}
        )
    )
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == pytest.approx(choice["token_logprobs"])
    assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])
    client.finish_session("chat-1")


def test_outputs_carry_sampling_masks_when_asked(client: InferenceEngineClient, tok: ChatTokenizer) -> None:
    prompt = _prompt(tok)
    params = {"max_tokens": 6, "top_k": 5, "logprobs": 0, "sampling_mask": True, "seed": 2}
    out = asyncio.run(client.generate({"prompt_token_ids": [prompt, prompt], "sampling_params": params}))
    assert out["sampling_masks"] is not None
    for mask, ids in zip(out["sampling_masks"], out["response_ids"], strict=True):
        assert mask is not None
        assert mask.rows == len(ids)
        assert mask.contains(np.asarray(ids)).all()
        assert (np.diff(mask.offsets) <= 5).all(), "top-k=5 keeps at most 5 tokens per position"
    plain = asyncio.run(client.generate({"prompt_token_ids": [prompt], "sampling_params": {"max_tokens": 2}}))
    assert plain["sampling_masks"] == [None]


def test_pause_holds_admissions_and_resume_releases_them(
    client: InferenceEngineClient, tok: ChatTokenizer
) -> None:
    prompt = _prompt(tok)

    async def go() -> float:
        await client.pause_generation("keep")
        try:
            task = asyncio.create_task(client.sample_completions(prompt, 2, {"max_tokens": 4}))
            await asyncio.sleep(1.0)
            assert not task.done(), "a request went through while the client was paused"
        finally:
            t0 = time.perf_counter()
            await client.resume_generation()
        await task
        return time.perf_counter() - t0

    took = asyncio.run(go())
    assert took < 30
    assert not client.is_paused


def _lp_under(model_dir: Path, full: list[int]) -> np.ndarray:
    from rollstream.testing import need

    torch, transformers = need("torch"), need("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    return np.asarray(lp.numpy())


@pytest.mark.parametrize("mode", ["keep", "abort"])
def test_weight_update_in_the_middle_of_long_generations(
    mode: str,
    deployment_manager: DeploymentManager,
    live: DeploymentInfo,
    tiny_model_dir: Path,
    tok: ChatTokenizer,
    tmp_path: Path,
) -> None:
    base = _load(tiny_model_dir / "model.safetensors")
    policy = Policy(dict(base))
    syncer = WeightSyncer(
        policy, deploy_mgr=deployment_manager, deployment_id="tiny", base_model=str(tiny_model_dir)
    )
    client = InferenceEngineClient(
        live,
        tok,
        "tiny",
        deployment_manager=deployment_manager,
        pause_mode=mode,  # type: ignore[arg-type]
    )
    old_id = f"{mode}-old-{uuid.uuid4().hex[:6]}"
    new_id = f"{mode}-new-{uuid.uuid4().hex[:6]}"
    n_tokens = 1200
    try:
        syncer.save_and_hotload(old_id, checkpoint_type="base")
        policy.weights = perturbed(base, 11)
        prompt = _prompt(tok)

        async def go() -> Any:
            task = asyncio.create_task(
                client.sample_completions(
                    prompt,
                    4,
                    {
                        "max_tokens": n_tokens,
                        "ignore_eos": True,
                        "logprobs": 0,
                        "temperature": 1.0,
                        "seed": 5,
                    },
                )
            )
            await asyncio.sleep(1.5)  # the test waits for tokens to flow; the client never sleeps
            assert not task.done(), "the generations finished before the update: make them longer"
            await client.update_weights(syncer=syncer, name=new_id)
            return await task

        completions = asyncio.run(go())
    finally:
        policy.weights = dict(base)
        syncer.save_and_hotload(f"restore-{uuid.uuid4().hex[:8]}", checkpoint_type="base")

    store = syncer.chain.store
    hf_old = model_dir_with(tmp_path, tiny_model_dir, store.materialize(old_id))
    hf_new = model_dir_with(tmp_path, tiny_model_dir, store.materialize(new_id))
    assert len(completions) == 4
    for c in completions:
        # Exactly max_tokens, nothing lost or duplicated, and every token's weights known.
        assert c.completion_len == n_tokens
        assert len(c.completion_logprobs) == n_tokens
        spans = [(s.version, s.start, s.end) for s in c.weight_versions]
        assert [s[0] for s in spans] == [old_id, new_id], spans
        assert spans[0][1] == 0
        assert spans[-1][2] == n_tokens
        assert spans[0][2] == spans[1][1]
        assert c.full_tokens[: c.prompt_len] == prompt
        # Logprobs align: each token's logprob is that of the weights that produced it.
        ref_old = _lp_under(hf_old, c.full_tokens)[c.prompt_len - 1 :]
        ref_new = _lp_under(hf_new, c.full_tokens)[c.prompt_len - 1 :]
        cut = spans[0][2]
        served = np.asarray(c.completion_logprobs, np.float64)
        assert np.max(np.abs(served[:cut] - ref_old[:cut])) < 1e-4
        assert np.max(np.abs(served[cut:] - ref_new[cut:])) < 1e-4
        assert np.max(np.abs(served[cut:] - ref_old[cut:])) > 0.1, "negative control: the weights did change"
        if mode == "abort":
            assert c.attempts > 1, "an aborted generation is continued in a new attempt"
    if mode == "abort":
        assert client.metrics.continued_tokens > 0
    asyncio.run(client.teardown())


def test_multi_turn_rollout_ids_are_the_engines_ids_turn_by_turn(client: InferenceEngineClient) -> None:
    class Echo:
        def __init__(self) -> None:
            self.turns = 0

        async def step(self, action: str) -> StepResult:
            self.turns += 1
            if self.turns == 3:
                return StepResult([], reward=1.0, done=True)
            return StepResult([{"role": "user", "content": f"Say more ({self.turns})."}], reward=0.25)

    # The tiny model's random weights rarely end a turn: close cut turns and go on.
    gen = MultiTurnGenerator(client, lambda cls, extras: Echo(), max_turns=5, stop_on_truncation=False)
    out = asyncio.run(
        gen.generate(
            {
                "prompts": [CHAT, CHAT],
                "env_classes": None,
                "env_extras": None,
                "sampling_params": {"max_tokens": 8, "logprobs": 0},
            }
        )
    )
    assert out["num_turns"] == [3, 3]
    assert out["rewards"] == [1.5, 1.5]
    for i in range(2):
        ids = out["prompt_token_ids"][i] + out["response_ids"][i]
        mask = out["loss_masks"][i]
        lps = out["rollout_logprobs"][i]  # type: ignore[index]
        assert len(mask) == len(out["response_ids"][i]) == len(lps)
        # Every turn's prompt and sampled ids are a prefix of the trajectory:
        # nothing was re-tokenised between turns.
        p = len(out["prompt_token_ids"][i])
        model_positions = [j for j, m in enumerate(mask) if m]
        seen = 0
        for turn in out["completions"][i]:
            assert ids[: len(turn.full_tokens)] == turn.full_tokens
            positions = list(range(turn.prompt_len - p, turn.prompt_len - p + turn.completion_len))
            assert positions == model_positions[seen : seen + turn.completion_len]
            assert [lps[j] for j in positions] == pytest.approx(turn.completion_logprobs.tolist())
            seen += turn.completion_len
        assert seen == sum(mask)


def test_a_client_of_clients_splits_batches_in_order(
    client: InferenceEngineClient, live: DeploymentInfo, tok: ChatTokenizer
) -> None:
    engines = [InferenceEngineClient(str(r.url), tok, "tiny") for r in live.replicas]
    assert all(isinstance(e, InferenceEngineInterface) for e in engines)
    outer = InferenceEngineClient(engines, tok)
    prompts = [tok.encode("item " * (i + 1)) for i in range(5)]
    out = asyncio.run(outer.generate({"prompt_token_ids": prompts, "sampling_params": {"max_tokens": 3}}))
    assert [c.prompt_tokens for c in out["completions"]] == prompts
    assert outer.dp_size == 2
    asyncio.run(outer.teardown())


def test_a_killed_engine_mid_batch_completes_on_the_other(
    deployment_manager: DeploymentManager, live: DeploymentInfo, tok: ChatTokenizer
) -> None:
    info = live
    urls = [str(r.url) for r in info.replicas]
    # Engine URLs directly: the client's own failover, not the manager's.
    client = InferenceEngineClient(urls, tok, "tiny")
    victim = info.replicas[0]
    assert victim.pid is not None
    prompt = _prompt(tok)

    async def go() -> Any:
        task = asyncio.create_task(
            client.sample_completions(prompt, 8, {"max_tokens": 600, "ignore_eos": True, "logprobs": 0})
        )
        await asyncio.sleep(1.0)
        os.killpg(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        return await task

    try:
        completions = asyncio.run(go())
        assert len(completions) == 8
        assert all(c.completion_len == 600 for c in completions)
        assert all(len(c.completion_logprobs) == 600 for c in completions)
        assert {c.server_url for c in completions} == {urls[1]}
        assert next(ld.state for ld in client._need_pool().loads() if ld.url == urls[0]) == "down"
    finally:
        asyncio.run(client.teardown())
        deployment_manager.wait_for_ready("tiny", timeout_s=900)
