"""Hot-loading a delta snapshot into the real vLLM server, checked against a
transformers recomputation of the new checkpoint."""

from __future__ import annotations

import _thread
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _engine_helpers import model_dir_with, perturbed, recompute_error, sample_from

from rollstream import ChatTokenizer
from rollstream._exceptions import HotloadError
from rollstream.hotload import hotload
from rollstream.snapshots import SnapshotChain, SnapshotStore
from rollstream.testing import LocalVLLM, need

pytestmark = pytest.mark.engine


def max_logprob_error(server: LocalVLLM, tok: ChatTokenizer, model_dir: Path) -> tuple[float, str | None]:
    samples = sample_from(server.url, server.served_model_name, tok)
    return recompute_error(samples, model_dir), samples[0].weight_version


def test_delta_hotload_serves_the_new_weights(
    vllm_server: LocalVLLM, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st_numpy = need("safetensors.numpy")
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    original = st_numpy.load_file(str(tiny_model_dir / "model.safetensors"))
    store = SnapshotStore(tmp_path / "bucket")
    chain = SnapshotChain(store)
    chain.save("step-0", original)
    chain.mark_loaded("step-0")  # the server was started with these weights
    info = chain.save("step-1", perturbed(original, 1))
    assert info.kind == "delta"
    assert info.parent == "step-0"
    new_dir = store.materialize("step-1")
    hf_new = model_dir_with(tmp_path, tiny_model_dir, new_dir)
    try:
        # vLLM 0.32's defect, shown for real: reloading without re-tying leaves
        # the LM head on the old embeddings, and the served logprobs are wrong.
        hotload(vllm_server.url, new_dir, "step-1-stale-head", retie_embeddings=False, verify=False)
        stale_err, _ = max_logprob_error(vllm_server, tok, hf_new)
        assert stale_err > 1e-2, f"expected a visibly stale head, error {stale_err}"
        # The verification catches that class of defect without knowing about
        # it: the head's kernel is compared with the checkpoint, and the
        # server goes back to the weights it served before.
        with pytest.raises(HotloadError, match=r"embed_tokens.weight \(as lm_head\)") as caught:
            hotload(vllm_server.url, new_dir, "step-1-unverified", retie_embeddings=False)
        assert caught.value.stage == "verify"
        assert httpx.get(vllm_server.url + "/is_paused").json()["is_paused"] is False

        report = hotload(vllm_server.url, new_dir, "step-1")
        assert report["reload"]["retie"]["retied"] is True
        assert report["fingerprint"]["mismatched"] == 0
        # Every checkpoint tensor is compared, and the tied LM head once more.
        assert report["fingerprint"]["missing"] == []
        assert report["fingerprint"]["unmapped"] == []
        assert report["fingerprint"]["checked"] == len(original) + 1
        chain.mark_loaded("step-1")
        assert httpx.get(vllm_server.url + "/weight_info").json()["weight_version"] == "step-1"
        err, version = max_logprob_error(vllm_server, tok, hf_new)
        assert err < 1e-4, (
            f"served logprobs differ from the new checkpoint by {err} (stale error was {stale_err})"
        )
        assert version == "step-1"
    finally:
        hotload(vllm_server.url, store.materialize("step-0"), "step-0")
    restored, _ = max_logprob_error(vllm_server, tok, tiny_model_dir)
    assert restored < 1e-4


def test_hotload_failures_name_the_stage_and_resume(
    vllm_server: LocalVLLM, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(HotloadError) as info:
        hotload(vllm_server.url, tmp_path / "empty", "x")
    assert info.value.stage == "check"
    # A checkpoint that does not fit the model is refused before the server
    # is touched (vLLM's engine dies on such a reload).
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    need("safetensors.numpy").save_file(
        {"not.a.weight": np.zeros(3, np.float32)}, str(bogus / "model.safetensors")
    )
    with pytest.raises(HotloadError, match="does not match the served checkpoint") as info:
        hotload(vllm_server.url, bogus, "bogus", reference_dir=tiny_model_dir)
    assert info.value.stage == "check"
    # Without a local reference the server itself compares it with what it serves.
    with pytest.raises(HotloadError, match="does not match the served checkpoint") as info:
        hotload(vllm_server.url, bogus, "bogus")
    assert info.value.stage == "check"
    # A path that exists only in the client's imagination is refused by the
    # server's own check (its reload would kill the engine).
    with pytest.raises(HotloadError, match="not a directory on the server's host") as info:
        hotload(vllm_server.url, tmp_path / "nonexistent-rollstream-snapshot", "nope")
    assert info.value.stage == "check"
    # The server only looks at paths under its snapshot roots: it cannot be
    # used to probe the host's filesystem.
    outside = Path.home() / f".rollstream-test-outside-roots-{os.getpid()}"
    outside.mkdir()
    try:
        shutil.copy(tiny_model_dir / "model.safetensors", outside / "model.safetensors")
        with pytest.raises(HotloadError, match="outside this server's snapshot roots") as info:
            hotload(vllm_server.url, outside, "probe")
    finally:
        shutil.rmtree(outside)
    assert info.value.stage == "check"
    assert httpx.get(vllm_server.url + "/health").status_code == 200

    # A failure after the pause (the weight-version call fails): the server is
    # resumed, the error names the stage, and the engine stays healthy.
    real_request = httpx.Client.request

    def failing_request(self: httpx.Client, method: str, url: Any, **kw: Any) -> httpx.Response:
        if str(url).endswith("/update_weight_version"):
            raise httpx.ConnectError("injected failure")
        return real_request(self, method, url, **kw)

    monkeypatch.setattr(httpx.Client, "request", failing_request)
    with pytest.raises(HotloadError, match="injected failure") as info:
        hotload(vllm_server.url, tiny_model_dir, "same-weights")
    monkeypatch.undo()
    assert info.value.stage == "update_weight_version"
    assert "restart" not in str(info.value)
    assert httpx.get(vllm_server.url + "/is_paused").json()["is_paused"] is False, "never left paused"
    assert httpx.get(vllm_server.url + "/health").status_code == 200
    err, _ = max_logprob_error(vllm_server, ChatTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir)
    assert err < 1e-4, "the reloaded (identical) weights serve correctly"


def test_interrupted_reload_leaves_the_server_resumed(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    """Ctrl-C in the middle of a real reload: the server is resumed anyway."""
    interrupted = threading.Event()

    def interrupt_once_paused() -> None:
        with httpx.Client(base_url=vllm_server.url, timeout=10) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if c.get("/is_paused").json().get("is_paused"):
                    interrupted.set()
                    _thread.interrupt_main()
                    return
                time.sleep(0.002)

    watcher = threading.Thread(target=interrupt_once_paused, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        hotload(vllm_server.url, tiny_model_dir, "interrupted")
    watcher.join(5)
    assert interrupted.is_set(), "the server was never seen paused"
    assert httpx.get(vllm_server.url + "/is_paused").json()["is_paused"] is False
    assert httpx.get(vllm_server.url + "/health").status_code == 200
    report = hotload(vllm_server.url, tiny_model_dir, "after-interrupt")
    assert report["fingerprint"]["mismatched"] == 0
