"""The Rust streaming client's limits, without an engine: every timeout is
validated (a ValueError naming it, never a Rust panic) and a server that
never ends an event meets the event-size cap."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rollstream import DeploymentSampler, SamplerTimeouts, _core
from rollstream._http import Transport


@pytest.mark.parametrize("value", [1e20, 1e300, float("inf"), float("nan"), -1.0, 0.0])
def test_client_timeouts_are_validated_not_panics(value: float) -> None:
    with pytest.raises(ValueError, match=r"connect_timeout="):
        _core.StreamClient(1, value)
    with pytest.raises(ValueError, match=r"pool_idle_timeout="):
        _core.StreamClient(1, 10.0, value)
    client = _core.StreamClient(1, 10.0)
    try:
        for name, args in [("idle_timeout", (value, 5.0)), ("total_timeout", (5.0, value))]:
            with pytest.raises(ValueError, match=name):
                client.submit("http://127.0.0.1:9/", [], b"{}", *args, lambda _: None)
    finally:
        client.close()


def test_sampler_timeouts_too_large_for_a_duration_raise_value_error() -> None:
    # SamplerTimeouts accepts any finite positive float; 1e20 s used to panic
    # in Duration::from_secs_f64 when the transport started.
    timeouts = SamplerTimeouts(connect=1e20)
    with pytest.raises(ValueError, match=r"connect_timeout=1e20"):
        DeploymentSampler("http://127.0.0.1:9", "m", timeout=timeouts)
    with pytest.raises(ValueError, match=r"connect_timeout=1e20"):
        Transport(connect_timeout=1e20)


@pytest.fixture
def endless_server() -> Iterator[str]:
    """A server that answers 200 and then sends one SSE line forever (until
    the client hangs up)."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ")
            chunk = b"x" * 65536
            try:
                while not stop.is_set():
                    conn.sendall(chunk)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    stop.set()
    sock.close()
    t.join(10)


def test_stream_client_caps_an_event_that_never_ends(endless_server: str) -> None:
    client = _core.StreamClient(1, 10.0, max_event_bytes=1 << 20)
    done = threading.Event()
    outcomes: list[Any] = []

    def callback(outcome: Any) -> None:
        outcomes.append(outcome)
        done.set()

    try:
        client.submit(endless_server, [], b"{}", 30.0, 60.0, callback)
        assert done.wait(30), "the client kept buffering an endless event"
    finally:
        client.close()
    (failure,) = outcomes
    assert isinstance(failure, _core.StreamFailure)
    assert failure.ok is False
    assert failure.kind == "decode"
    assert failure.truncated is False
    assert "max_event_bytes=1048576" in failure.message


@pytest.mark.parametrize("bad", [-0.001, 0.5, float("nan"), float("inf")])
def test_read_coalesce_out_of_range_is_a_value_error(bad: float) -> None:
    from rollstream._http import Transport

    with pytest.raises(ValueError, match="read_coalesce"):
        Transport(read_coalesce=bad)
