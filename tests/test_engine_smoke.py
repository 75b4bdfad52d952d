"""The real engine in the loop: stream from a live vLLM server and check what
came back against a non-streamed request and against what was sent."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import rollstream
from rollstream.testing import LocalVLLM

pytestmark = pytest.mark.engine

PROMPT = [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]
MAX_TOKENS = 24


def _body(server: LocalVLLM, stream: bool, **kw: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": server.served_model_name,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "return_token_ids": True,
        "logprobs": 2,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(kw)
    return body


def test_greedy_stream_matches_non_stream_and_echoes_prompt(vllm_server: LocalVLLM) -> None:
    with httpx.Client(base_url=vllm_server.url, timeout=60) as client:
        r = client.post("/v1/completions", json=_body(vllm_server, True), headers={"X-Request-Id": "smoke-1"})
        r.raise_for_status()
        streamed = rollstream.parse_stream(r.content)
        plain = client.post("/v1/completions", json=_body(vllm_server, False)).json()

    (choice,) = streamed.choices
    ref = plain["choices"][0]
    assert choice.token_ids.dtype == np.int64
    assert choice.token_ids.tolist() == ref["token_ids"]
    assert len(choice.token_ids) == MAX_TOKENS
    assert choice.prompt_token_ids is not None
    assert choice.prompt_token_ids.tolist() == PROMPT
    assert choice.finish_reason == ref["finish_reason"] == "length"
    assert choice.text == ref["text"]
    assert choice.logprobs is not None
    np.testing.assert_allclose(choice.logprobs, ref["logprobs"]["token_logprobs"], rtol=0, atol=1e-6)
    assert streamed.request_id == "cmpl-smoke-1"
    assert streamed.usage is not None
    assert streamed.usage.prompt_tokens == len(PROMPT)
    assert streamed.usage.completion_tokens == MAX_TOKENS
    assert "queue_time_ms" in streamed.metrics


def test_incremental_decoder_on_live_stream(vllm_server: LocalVLLM) -> None:
    dec = rollstream.StreamDecoder()
    with (
        httpx.Client(base_url=vllm_server.url, timeout=60) as client,
        client.stream(
            "POST", "/v1/completions", json=_body(vllm_server, True, n=2, temperature=1.0, seed=7)
        ) as r,
    ):
        r.raise_for_status()
        for part in r.iter_raw():
            dec.feed(part)
    result = dec.finish()
    assert [c.index for c in result.choices] == [0, 1]
    for c in result.choices:
        assert len(c.token_ids) == MAX_TOKENS
        assert c.logprobs is not None
        assert np.isfinite(c.logprobs).all()
        assert c.top_logprobs is not None
        assert len(c.top_logprobs) == MAX_TOKENS
        # The sampled token is always among its row's candidates (strings here).
        assert all(len(c.top_logprobs.row(t)) >= 1 for t in range(MAX_TOKENS))


def test_server_side_errors_before_streaming_are_http_errors(vllm_server: LocalVLLM) -> None:
    with httpx.Client(base_url=vllm_server.url, timeout=60) as client:
        r = client.post("/v1/completions", json=_body(vllm_server, True, max_tokens=10**6))
    assert r.status_code == 400
    assert "max_tokens" in r.json()["error"]["message"]
