"""InferenceEngineClient without an engine: argument checking, request
mapping, tool-call parsing, the join of continued generations, and
staleness pacing (the engine tests are in test_inference_engine.py)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from rollstream import SampledCompletion
from rollstream._results import join_pieces
from rollstream.inference import InferenceEngineClient, parse_tool_calls
from rollstream.inference._openai import CHAT_OWN, COMPLETION_OWN, prompt_batch, sampling_params
from rollstream.masks import SamplingMask
from rollstream.streams import WeightVersionSpan

URLS = ["http://127.0.0.1:9", "http://127.0.0.1:10"]


def _piece(ids: list[int], prompt: list[int], version: str, lps: list[float]) -> SampledCompletion:
    return SampledCompletion(
        text="".join(chr(65 + i % 26) for i in ids),
        full_tokens=prompt + ids,
        prompt_len=len(prompt),
        finish_reason="abort",
        completion_len=len(ids),
        inference_logprobs=lps,
        sampling_logprobs=list(lps),
        completion_ids=np.asarray(ids, np.int64),
        completion_logprobs=np.asarray(lps, np.float32),
        weight_versions=(WeightVersionSpan(version, 0, len(ids)),),
        sampling_mask=SamplingMask.from_rows([[i, i + 1] for i in ids]),
    )


def test_join_pieces_concatenates_and_shifts_version_spans() -> None:
    prompt = [1, 2, 3]
    a = _piece([10, 11], prompt, "v1", [-0.5, -0.25])
    b = _piece([12], [*prompt, 10, 11], "v1", [-1.0])
    c = _piece([13, 14, 15], [*prompt, 10, 11, 12], "v2", [-2.0, -3.0, -4.0])
    c = SampledCompletion(**{**c.__dict__, "finish_reason": "length"})
    joined = join_pieces(prompt, [a, b, c], lambda ids: ",".join(map(str, ids)))
    assert joined.completion_ids.tolist() == [10, 11, 12, 13, 14, 15]
    assert joined.full_tokens == [1, 2, 3, 10, 11, 12, 13, 14, 15]
    assert joined.prompt_len == 3
    assert joined.completion_len == 6
    assert joined.finish_reason == "length"
    assert joined.text == "10,11,12,13,14,15"
    assert joined.inference_logprobs == [-0.5, -0.25, -1.0, -2.0, -3.0, -4.0]
    assert joined.completion_logprobs is not None
    assert joined.completion_logprobs.tolist() == [-0.5, -0.25, -1.0, -2.0, -3.0, -4.0]
    # Adjacent spans of one version merge; the next version starts where it ended.
    assert [(s.version, s.start, s.end) for s in joined.weight_versions] == [("v1", 0, 3), ("v2", 3, 6)]
    assert joined.weight_version == "mixed"
    assert joined.sampling_mask is not None
    assert joined.sampling_mask.rows == 6
    assert joined.sampling_mask.contains(joined.completion_ids).all()


def test_join_pieces_without_decoder_joins_texts() -> None:
    a = _piece([1], [0], "v", [-1.0])
    b = _piece([2], [0, 1], "v", [-1.0])
    assert join_pieces([0], [a, b]).text == a.text + b.text


def test_openai_bodies_map_to_sampling_params_and_pass_unknown_fields() -> None:
    p = sampling_params(
        {"messages": [], "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3, "ignore_eos": True},
        CHAT_OWN,
        chat=True,
    )
    assert p == {"max_tokens": 7, "logprobs": 3, "ignore_eos": True}
    p = sampling_params(
        {"prompt": "x", "logprobs": 2, "stop": ["\n"], "repetition_penalty": 1.1}, COMPLETION_OWN, chat=False
    )
    assert p == {"max_tokens": 1024, "logprobs": 2, "stop": ["\n"], "repetition_penalty": 1.1}
    with pytest.raises(ValueError, match="max_tokens"):
        sampling_params({"max_tokens": 0}, CHAT_OWN, chat=True)
    with pytest.raises(ValueError, match="logprobs"):
        sampling_params({"logprobs": True}, COMPLETION_OWN, chat=False)


def test_prompt_batches_of_every_openai_form() -> None:
    assert prompt_batch("a") == ["a"]
    assert prompt_batch([1, 2]) == [[1, 2]]
    assert prompt_batch(["a", [1, 2]]) == ["a", [1, 2]]
    for bad in (None, [], [[]], [1.5], ["a", None], [True, 1]):
        with pytest.raises(ValueError, match="prompt"):
            prompt_batch(bad)


def test_tool_calls_are_parsed_out_of_the_text() -> None:
    text = 'Let me look.\n<tool_call>\n{"name": "search", "arguments": {"q": "vllm"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["search"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"q": "vllm"}
    # Malformed blocks stay in the content, nothing invented.
    bad = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(bad) == (bad, [])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []


def test_constructor_and_input_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="model_name"):
        InferenceEngineClient(URLS)
    with pytest.raises(ValueError, match="pause_mode"):
        InferenceEngineClient(URLS, model_name="m", pause_mode="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="engines must be"):
        InferenceEngineClient([1, 2], model_name="m")
    with pytest.raises(ValueError, match="staleness_batch_size"):
        InferenceEngineClient(URLS, model_name="m", max_staleness=1)
    with pytest.raises(ValueError, match="http"):
        InferenceEngineClient(["localhost:8000"], model_name="m")
    client = InferenceEngineClient(URLS, model_name="m")
    assert client.dp_size == 2
    assert (client.tp_size, client.pp_size) == (1, 1)
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(client.generate({"prompts": [[]], "prompt_token_ids": [[1]]}))
    with pytest.raises(ValueError, match="tokenizer"):
        asyncio.run(client.generate({"prompts": [[{"role": "user", "content": "hi"}]]}))
    with pytest.raises(ValueError, match="session_ids"):
        asyncio.run(client.generate({"prompt_token_ids": [[1], [2]], "session_ids": ["a"]}))
    with pytest.raises(ValueError, match="num_samples"):
        asyncio.run(client.sample([1], 0))
    with pytest.raises(ValueError, match="stream"):
        asyncio.run(client.chat_completion({"messages": [{"role": "user", "content": "x"}], "stream": True}))
    with pytest.raises(NotImplementedError, match="sleep"):
        asyncio.run(client.sleep())
    with pytest.raises(ValueError, match="snapshot_dir"):
        asyncio.run(client.update_weights())


def test_engines_join_and_leave_at_runtime() -> None:
    client = InferenceEngineClient(URLS, model_name="m")
    client.add_engine("http://127.0.0.1:11")
    assert client.dp_size == 3
    client.remove_engine(URLS[0])
    assert client.engine_urls == [URLS[1], "http://127.0.0.1:11"]


def test_staleness_paces_admissions_and_never_drops_work() -> None:
    client = InferenceEngineClient(URLS, model_name="m", max_staleness=1, staleness_batch_size=2)

    async def go() -> list[int]:
        # Version 0 admits (0 + 1 + 1) * 2 = 4 rollouts; the fifth waits for an update.
        versions = [await client.admit() for _ in range(4)]
        fifth = asyncio.create_task(client.admit())
        await asyncio.sleep(0.05)
        assert not fifth.done()
        client._version_counter = 1
        assert client._staleness is not None
        await client._staleness.advance(1)
        versions.append(await asyncio.wait_for(fifth, 1.0))
        return versions

    assert asyncio.run(go()) == [0, 0, 0, 0, 1]


def test_no_engine_left_is_a_typed_error_not_a_hang() -> None:
    import socket

    from rollstream import EngineUnavailableError, SamplingRequestError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = InferenceEngineClient([dead], model_name="m", down_timeout=0.5)

    async def go() -> None:
        try:
            await asyncio.wait_for(client.sample([1, 2, 3], 1, {"max_tokens": 2}), 60)
        finally:
            await client.teardown()

    # A sampling failure (the SDK's type, so `except SamplingRequestError`
    # keeps working) caused by the typed infrastructure error.
    with pytest.raises(SamplingRequestError, match="no engine left") as caught:
        asyncio.run(go())
    assert isinstance(caught.value.__cause__, EngineUnavailableError)
    assert [ld.state for ld in client._need_pool().loads()] == ["down"]
