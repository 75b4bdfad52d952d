"""The stream decoder against a straightforward json.loads reference, plus
property tests (chunking, mutation, truncation) and the error contract."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rollstream
from rollstream import (
    StreamDecoder,
    StreamError,
    StreamProtocolError,
    StreamServerError,
    StreamTruncatedError,
    parse_stream,
)

DATA = Path(__file__).parent / "data" / "streams"
BODIES = {p.name: p.read_bytes() for p in sorted(DATA.glob("*.sse"))}


def reference(body: bytes) -> dict[str, Any]:
    """What a plain json.loads client extracts from the body."""
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"usage": None, "metrics": {}, "id": None}
    text = body.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n")
    for block in text.split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        ev = json.loads(block[len("data: ") :])
        out["id"] = out["id"] or ev.get("request_id") or ev.get("id")
        if ev.get("usage"):
            out["usage"] = ev["usage"]
        if ev.get("metrics"):
            out["metrics"] = {k: v for k, v in ev["metrics"].items() if isinstance(v, (int, float))}
        for ch in ev.get("choices") or []:
            c = choices.setdefault(
                ch["index"], {"ids": [], "lps": [], "top": [], "text": "", "finish": None, "prompt": None}
            )
            c["ids"] += ch.get("token_ids") or []
            if ch.get("prompt_token_ids") and c["prompt"] is None:
                c["prompt"] = ch["prompt_token_ids"]
            if ev.get("prompt_token_ids") and c["prompt"] is None:
                c["prompt"] = ev["prompt_token_ids"]
            c["text"] += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            if ch.get("finish_reason"):
                c["finish"] = ch["finish_reason"]
            lp = ch.get("logprobs")
            if lp and "token_logprobs" in lp:
                c["lps"] += lp["token_logprobs"]
                c["top"] += [dict(row or {}) for row in lp["top_logprobs"]]
            elif lp:
                for e in lp["content"]:
                    c["lps"].append(e["logprob"])
                    c["top"].append(
                        {
                            (t["token_id"] if "token_id" in t else t["token"]): t["logprob"]
                            for t in e["top_logprobs"]
                        }
                    )
    out["choices"] = choices
    return out


def f32(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float32)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_recorded_stream_equals_json_loads_reference(name: str) -> None:
    body = BODIES[name]
    ref = reference(body)
    res = parse_stream(body)
    assert res.request_id == ref["id"]
    assert [c.index for c in res.choices] == sorted(ref["choices"])
    for c in res.choices:
        r = ref["choices"][c.index]
        assert c.token_ids.dtype == np.int64
        assert c.token_ids.tolist() == r["ids"]
        assert c.logprobs is not None
        assert c.logprobs.dtype == np.float32
        np.testing.assert_array_equal(c.logprobs, f32(r["lps"]))
        assert c.finish_reason == r["finish"]
        assert c.text == r["text"]
        assert (c.prompt_token_ids.tolist() if c.prompt_token_ids is not None else None) == r["prompt"]
        assert c.top_logprobs is not None
        ours = c.top_logprobs.to_list()
        assert len(ours) == len(r["top"])
        for row_ours, row_ref in zip(ours, r["top"], strict=True):
            assert row_ours.keys() == row_ref.keys()
            for k in row_ref:
                assert np.float32(row_ours[k]) == np.float32(row_ref[k])
    if ref["usage"]:
        assert res.usage is not None
        assert res.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
        assert res.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert res.metrics == ref["metrics"]


def test_generate_endpoint_gives_integer_candidates_and_ranks() -> None:
    res = parse_stream(BODIES["v2_generate_n2.sse"])
    c = res.choices[0]
    assert c.ranks is not None
    assert len(c.ranks) == len(c.token_ids)
    assert c.top_logprobs is not None
    assert c.top_logprobs.token_ids is not None
    assert c.top_logprobs.tokens() is None
    assert c.weight_versions[0].version == "default"
    assert c.weight_versions[0].end == len(c.token_ids)


def test_clamp_and_null_are_faithful() -> None:
    body = (
        b'data: {"choices":[{"index":0,"text":"ab","token_ids":[1,2],'
        b'"logprobs":{"token_logprobs":[-9999.0,null],"top_logprobs":[{"a":-9999.0},null]}}]}\n\n'
        b'data: {"choices":[{"index":0,"text":"","finish_reason":"stop","stop_reason":"</s>"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    (c,) = parse_stream(body).choices
    assert c.logprobs is not None
    assert c.logprobs[0] == -9999.0
    assert math.isnan(c.logprobs[1])
    assert c.stop_reason == "</s>"
    assert c.top_logprobs is not None
    assert c.top_logprobs.to_list() == [{"a": -9999.0}, {}]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(BODIES)), cuts=st.lists(st.integers(0, 2_000_000), max_size=40))
def test_any_chunking_gives_the_same_result(name: str, cuts: list[int]) -> None:
    body = BODIES[name]
    whole = parse_stream(body)
    dec = StreamDecoder()
    prev = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        dec.feed(memoryview(body)[prev:cut])
        prev = cut
    dec.feed(body[prev:])
    res = dec.finish()
    assert [c.token_ids.tolist() for c in res.choices] == [c.token_ids.tolist() for c in whole.choices]
    for a, b in zip(res.choices, whole.choices, strict=True):
        assert a.logprobs is not None
        assert b.logprobs is not None
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.text == b.text
    assert res.events == whole.events


SMALL = BODIES["v2_completion_n1_metrics.sse"]


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(SMALL) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_any_mutation_gives_a_result_or_a_stream_error(edits: list[tuple[int, int]]) -> None:
    body = bytearray(SMALL)
    for at, byte in edits:
        body[at] = byte
    error: StreamError | None = None
    try:
        parse_stream(body)
    except StreamError as e:
        error = e
    if error is not None:
        assert 0 <= error.offset <= len(body)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(SMALL) - 1))
def test_truncated_bodies_raise_truncated_or_protocol_errors(cut: int) -> None:
    with pytest.raises((StreamTruncatedError, StreamProtocolError)):
        parse_stream(SMALL[:cut])


def test_body_without_done_is_truncated() -> None:
    body = SMALL.replace(b"data: [DONE]\n\n", b"")
    with pytest.raises(StreamTruncatedError, match=r"\[DONE\]"):
        parse_stream(body)


def test_server_error_event_raises_with_partial_result() -> None:
    body = (
        b'data: {"id":"cmpl-1","choices":[{"index":0,"text":"a","token_ids":[5]}]}\n\n'
        b'data: {"error":{"message":"engine died","type":"InternalServerError","param":null,"code":500}}\n\n'
        b"data: [DONE]\n\n"
    )
    with pytest.raises(StreamServerError, match="engine died") as info:
        parse_stream(body)
    err = info.value
    assert err.error_type == "InternalServerError"
    assert err.code == "500"
    assert err.result.choices[0].token_ids.tolist() == [5]
    res = parse_stream(body, raise_on_error=False)
    assert res.error is not None
    assert res.error.message == "engine died"


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        (b'{"choices":[{"index":0,"token_ids":["x"]}]}', "number"),
        (b'{"choices":[{"index":0,"token_ids":[-1]}]}', "out of range"),
        (b'{"choices":[{"index":0,"token_ids":[1e400]}]}', "integer"),
        (b'{"choices":[{"index":0,"token_ids":[1,2],"logprobs":{"token_logprobs":[-1.0]}}]}', "logprobs"),
        (b'{"choices":[{"text":"x"}]}', "index"),
        (b'{"choices":[{"index":0,"text":"\xff"}]}', "UTF-8"),
        (b'{"choices":[', "incomplete"),
        (b'{"choices":[]} trailing', "trailing"),
    ],
)
def test_malformed_events_raise_protocol_errors_with_offset(event: bytes, fragment: str) -> None:
    body = b"data: " + event + b"\n\ndata: [DONE]\n\n"
    with pytest.raises(StreamProtocolError) as info:
        parse_stream(body)
    assert fragment in str(info.value)
    assert 6 <= info.value.offset <= len(body)


def test_unknown_fields_are_ignored() -> None:
    event = b'{"future":{"x":[1,{"y":null}]},"choices":[{"index":0,"token_ids":[3],"new":1}]}'
    body = b"data: " + event + b"\n\ndata: [DONE]\n\n"
    assert parse_stream(body).choices[0].token_ids.tolist() == [3]


def test_feed_type_errors_and_reuse() -> None:
    dec = StreamDecoder()
    with pytest.raises(TypeError, match="str"):
        dec.feed("data: x")  # type: ignore[arg-type]
    dec.feed(bytearray(SMALL))
    assert dec.done
    assert dec.tokens == sum(len(c.token_ids) for c in parse_stream(SMALL).choices) > 0
    dec.finish()
    with pytest.raises(RuntimeError, match="finished"):
        dec.finish()


def test_errors_pickle_round_trip() -> None:
    import pickle

    e = StreamServerError("m", 3, "x", error_type="T", code="500")
    back = pickle.loads(pickle.dumps(e))
    assert (back.message, back.offset, back.error_type, back.code) == ("m", 3, "T", "500")
    t = pickle.loads(pickle.dumps(StreamTruncatedError("cut", 9)))
    assert isinstance(t, StreamTruncatedError)
    assert t.offset == 9


def test_public_names_resolve_and_errors_share_one_base() -> None:
    for name in rollstream.__all__:
        assert hasattr(rollstream, name), name
    errors = [getattr(rollstream, n) for n in rollstream.__all__ if n.endswith("Error")]
    assert errors
    for cls in errors:
        assert issubclass(cls, rollstream.RollstreamError), cls


def test_an_event_past_max_event_bytes_is_a_protocol_error() -> None:
    dec = StreamDecoder(max_event_bytes=4096)
    dec.feed(b"data: ")
    for _ in range(4):
        dec.feed(b"x" * 1000)
    with pytest.raises(StreamProtocolError, match="max_event_bytes=4096") as info:
        dec.feed(b"x" * 1000)
    assert info.value.offset == 0
    body = b'data: {"choices":[]}\n\ndata: ' + b"y" * 5000 + b"\n\ndata: [DONE]\n\n"
    with pytest.raises(StreamProtocolError, match="max_event_bytes=4096"):
        parse_stream(body, max_event_bytes=4096)
    assert parse_stream(body.replace(b"y" * 5000, b"{}")).events == 3


def test_routed_experts_with_a_non_ascii_dtype_are_a_protocol_error() -> None:
    # Found by the npy_parse fuzz target: the .npy reader sliced the dtype
    # string inside a multi-byte character and panicked.
    header = b"{'descr': '\xd9\x9a4', 'fortran_order': False, 'shape': (1,), }\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(4)
    event = json.dumps(
        {"choices": [{"index": 0, "token_ids": [1], "routed_experts": base64.b64encode(npy).decode()}]}
    )
    with pytest.raises(StreamProtocolError, match="routed_experts"):
        parse_stream(b"data: " + event.encode() + b"\n\ndata: [DONE]\n\n")
