"""The OpenAI-compatible endpoint against the session's real vLLM engine,
with the real ``InferenceEngineClient`` behind it, driven by the ``openai``
package as an agent harness drives it: every turn is recorded with the ids
and logprobs the engine produced (checked against the engine asked
directly), streaming and not, per ``X-Session-ID``; and ``rollstream serve``
from the command line."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _require import require

from rollstream import ChatTokenizer
from rollstream.inference import InferenceEngineClient
from rollstream.inference._server import OpenAIServer, ServerThread
from rollstream.testing import LocalVLLM

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


def openai_module() -> Any:
    return require("openai", "to drive the endpoint as agent harnesses do")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def served(vllm_server: LocalVLLM, tiny_model_dir: Path) -> Iterator[ServerThread]:
    client = InferenceEngineClient([vllm_server.url], str(tiny_model_dir), vllm_server.served_model_name)
    with OpenAIServer(client, close_client=True).serve_in_thread() as thread:
        yield thread


@pytest.fixture(scope="module")
def openai_client(served: ServerThread) -> Any:
    return openai_module().OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def engine_greedy(server: LocalVLLM, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """The engine's own greedy completion of ``prompt`` (ids, logprobs, text)."""
    body = {
        "model": server.served_model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": 0,
        "return_token_ids": True,
    }
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return dict(r.json()["choices"][0])


def test_chat_turn_records_the_engines_tokens_and_logprobs(
    served: ServerThread, openai_client: Any, vllm_server: LocalVLLM, tokenizer: ChatTokenizer
) -> None:
    out = openai_client.chat.completions.create(
        model=vllm_server.served_model_name,
        messages=CHAT,
        max_tokens=16,
        temperature=0.0,
        logprobs=True,
        extra_headers={"X-Session-ID": "chat-greedy"},
    )
    (turn,) = served.server.session_turns("chat-greedy")
    choice = out.to_dict()["choices"][0]
    # The record is what the harness was sent...
    assert turn.endpoint == "chat.completions"
    assert turn.response_ids.tolist() == choice["token_ids"]
    assert turn.finish_reason == out.choices[0].finish_reason
    assert out.usage.completion_tokens == len(turn.response_ids) > 0
    assert turn.prompt_ids.tolist() == out.to_dict()["prompt_token_ids"]
    # ...the chat the harness sent, rendered by the model's template...
    assert turn.prompt_ids.tolist() == tokenizer.apply_chat_template(CHAT)
    # ...and what the engine itself produces for that prompt.
    ref = engine_greedy(vllm_server, turn.prompt_ids.tolist(), 16)
    assert turn.response_ids.tolist() == ref["token_ids"]
    assert out.choices[0].message.content == ref["text"]
    assert turn.logprobs is not None
    np.testing.assert_allclose(turn.logprobs, ref["logprobs"]["token_logprobs"], atol=1e-3)
    assert [lp.logprob for lp in out.choices[0].logprobs.content] == pytest.approx(
        turn.logprobs.tolist(), abs=1e-6
    )
    assert turn.weight_versions, "the generate endpoint reports the weights of every token"
    assert turn.weight_versions[0].start == 0
    assert turn.weight_versions[-1].end == len(turn.response_ids)


def test_unknown_fields_reach_the_engine(
    served: ServerThread, openai_client: Any, vllm_server: LocalVLLM
) -> None:
    plain = openai_client.completions.create(
        model=vllm_server.served_model_name,
        prompt="The sea is",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        extra_headers={"X-Session-ID": "unknown-fields"},
    )
    # allowed_token_ids is vLLM's, not OpenAI's: only the engine can make every token 42.
    only = openai_client.completions.create(
        model=vllm_server.served_model_name,
        prompt="The sea is",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        extra_body={"allowed_token_ids": [42]},
        extra_headers={"X-Session-ID": "unknown-fields"},
    )
    free, forced = served.server.session_turns("unknown-fields")
    assert set(free.response_ids.tolist()) != {42}
    assert forced.response_ids.tolist() == [42] * 8
    assert only.to_dict()["choices"][0]["token_ids"] == [42] * 8
    assert plain.choices[0].text != only.choices[0].text


def test_streaming_answers_equal_the_whole_ones(
    served: ServerThread, openai_client: Any, vllm_server: LocalVLLM
) -> None:
    model = vllm_server.served_model_name
    whole = openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0.0)
    chunks = list(
        openai_client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=12,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-ID": "streamed"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    prompt = "Once upon a time"
    whole_text = openai_client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.0)
    streamed = openai_client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        stream=True,
        extra_headers={"X-Session-ID": "streamed"},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole_text.choices[0].text

    chat_turn, completion_turn = served.server.session_turns("streamed")
    assert chat_turn.endpoint == "chat.completions"
    assert len(chat_turn.response_ids) == whole.usage.completion_tokens
    assert completion_turn.endpoint == "completions"
    ref = engine_greedy(vllm_server, completion_turn.prompt_ids.tolist(), 12)
    assert completion_turn.response_ids.tolist() == ref["token_ids"]


def test_two_turns_with_one_session_header_are_one_record(
    served: ServerThread, openai_client: Any, vllm_server: LocalVLLM
) -> None:
    model = vllm_server.served_model_name
    session = {"X-Session-ID": "agent-episode-1"}
    first = openai_client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0.0, extra_headers=session
    )
    chat = [
        *CHAT,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Now a shorter one."},
    ]
    second = openai_client.chat.completions.create(
        model=model, messages=chat, max_tokens=8, temperature=0.0, extra_headers=session
    )
    openai_client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=4, extra_headers={"X-Session-ID": "another-episode"}
    )
    turns = served.server.pop_session("agent-episode-1")
    assert [t.response_ids.tolist() for t in turns] == [
        first.to_dict()["choices"][0]["token_ids"],
        second.to_dict()["choices"][0]["token_ids"],
    ]
    assert len(turns[1].prompt_ids) > len(turns[0].prompt_ids)
    assert served.server.session_turns("agent-episode-1") == []
    assert len(served.server.session_turns("another-episode")) == 1


def run_serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``rollstream serve ARGS --port 0`` and the API root URL it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollstream.cli", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready:
        proc.kill()
        raise AssertionError("rollstream serve printed no URL within 120 s")
    api = proc.stdout.readline().strip()
    if not api:
        proc.wait(30)
        raise AssertionError(f"rollstream serve exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc, api


def interrupt(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C: the process must end cleanly and soon; its stderr."""
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    assert proc.wait(60) == 0
    assert time.monotonic() - t0 < 30
    assert proc.stderr is not None
    return proc.stderr.read()


def test_rollstream_serve_from_the_command_line(vllm_server: LocalVLLM) -> None:
    openai = openai_module()
    # No --model, no --tokenizer: both come from the engine's /v1/models.
    proc, api = run_serve(["--engine", vllm_server.url], {"ROLLSTREAM_SERVE_API_KEY": "cli-key"})
    try:
        assert api.startswith("http://127.0.0.1:")
        assert api.endswith("/v1")
        assert httpx.get(api + "/models", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=api, api_key="cli-key", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == [vllm_server.served_model_name]
        out = client.chat.completions.create(model=vllm_server.served_model_name, messages=CHAT, max_tokens=4)
        assert out.usage.completion_tokens > 0
        assert "Ctrl-C stops" in interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rollstream_serve_in_front_of_a_deployment(deployment_manager: Any, deployment: Any) -> None:
    openai = openai_module()
    args = ["--deployment", deployment.deployment_id, "--state-dir", str(deployment_manager.state_dir)]
    proc, api = run_serve(args, {})
    try:
        client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == [deployment.inference_model]
        for _ in range(2):
            out = client.chat.completions.create(
                model=deployment.inference_model,
                messages=CHAT,
                max_tokens=4,
                extra_headers={"X-Session-ID": "over-a-deployment"},
            )
            assert out.to_dict()["choices"][0]["token_ids"]
        assert f"deployment {deployment.deployment_id!r}" in interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
