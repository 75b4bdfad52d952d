"""A deployment's life across processes, against real vLLM servers: created
by the ``rollstream`` CLI in a background owner process, inspected and
hot-loaded from this one, its owner killed with SIGKILL (nothing survives),
restarted here at the weights it served, scaled to zero and back, deleted
with requests in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _engine_helpers import CHAT, model_dir_with, perturbed, recompute_error, sample_from

from rollstream import ChatTokenizer, DeploymentSampler
from rollstream._exceptions import DeploymentError
from rollstream._supervise import group_members
from rollstream.deployment import DeploymentConfig, DeploymentManager
from rollstream.snapshots import SnapshotStore

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _gone(pgids: list[int], within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(group_members(p) for p in pgids):
            return True
        time.sleep(0.25)
    return False


def _version(url: str) -> str | None:
    return httpx.get(url + "/weight_info").json().get("weight_version")


def test_lifecycle_across_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rollstream.testing.pytest_plugin import require_engine

    require_engine()
    state = tmp_path / "state"
    common = ["--state-dir", str(state)]
    created = _cli(
        "deploy", "create", "life", "--base-model", str(tiny_model_dir), "--shape", "cpu-small",
        "--replicas", "1", "--detach", "--json", *common,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    info_json = json.loads(created.stdout)
    owner = int(info_json["owner_pid"])
    assert owner != os.getpid()
    assert "replica 0 READY" in created.stderr, "a progress display while waiting"

    mgr = DeploymentManager(state_dir=state, probe_interval=1.0)
    try:
        # get/list from another process than the owner.
        info = mgr.get("life")
        assert info is not None
        assert info.state == "READY"
        assert info.owner_pid == owner
        assert [i.deployment_id for i in mgr.list()] == ["life"]
        listed = _cli("deploy", "list", *common)
        assert "life" in listed.stdout
        assert "READY" in listed.stdout
        # Sampling from this process follows the owner's state file.
        tok = ChatTokenizer.from_pretrained(tiny_model_dir)
        sampler = DeploymentSampler(inference_url=mgr.inference_url, model="life", tokenizer=tok)
        samples = asyncio.run(sampler.sample_with_tokens(CHAT, n=2, max_tokens=4))
        assert {c.server_url for c in samples} == {info.replicas[0].url}
        sampler.close()

        # The stored configuration is not silently ignored.
        drifted = DeploymentConfig(
            "life", base_model=str(tiny_model_dir), deployment_shape="cpu-small", extra_args=["--seed", "7"]
        )
        with pytest.raises(DeploymentError, match="extra_args"):
            mgr.create_or_get(drifted)

        # A hot-load from this process is carried out by the owner; the CLI
        # hot-loads a delta on top of it.
        base = _weights(tiny_model_dir)
        store = SnapshotStore(str(info.hot_load_bucket_url))
        store.save_full("l-1", perturbed(base, 11))
        assert mgr.hotload_and_wait("life", "", "l-1")
        delta = store.save_delta("l-2", "l-1", perturbed(base, 12))
        assert delta.kind == "delta"
        out = _cli("deploy", "hotload", "life", "l-2", "--previous", "l-1", *common)
        assert out.returncode == 0, out.stderr
        assert "paused_window_s" in out.stdout
        url = str(mgr.get("life").replicas[0].url)  # type: ignore[union-attr]
        assert _version(url) == "l-2"

        # SIGKILL of the owner: every engine process goes with it.
        pgids = [r.pid for r in mgr.get("life").replicas if r.pid]  # type: ignore[union-attr]
        assert pgids
        os.kill(owner, signal.SIGKILL)
        assert _gone(pgids), "engine processes survived their owner's SIGKILL"
        stopped = mgr.get("life")
        assert stopped is not None
        assert stopped.state == "STOPPED"

        # Restarted here, at the weights it served (verified before READY).
        config = DeploymentConfig("life", base_model=str(tiny_model_dir), deployment_shape="cpu-small")
        mgr.create_or_get(config)
        info = mgr.wait_for_ready("life", timeout_s=900)
        assert info.owner_pid == os.getpid()
        assert info.current_snapshot_identity == "l-2"
        url = str(info.replicas[0].url)
        assert _version(url) == "l-2"
        hf = model_dir_with(tmp_path, tiny_model_dir, store.materialize("l-2"))
        assert recompute_error(sample_from(url, "life", tok), hf) < 1e-4

        # Scale to zero keeps config and weights; create_or_get brings it back.
        pgids = [r.pid for r in info.replicas if r.pid]
        mgr.scale_to_zero("life")
        assert mgr.get("life").state == "SCALED_TO_ZERO"  # type: ignore[union-attr]
        assert _gone(pgids)
        mgr.create_or_get(
            DeploymentConfig("life", base_model=str(tiny_model_dir), deployment_shape="cpu-small")
        )
        info = mgr.wait_for_ready("life", timeout_s=900)
        assert _version(str(info.replicas[0].url)) == "l-2"

        # Delete with requests in flight: each ends (the servers' graceful
        # shutdown may finish it, else the connection drops), none hangs, and
        # nothing is left behind.
        pgids = [r.pid for r in info.replicas if r.pid]
        outcomes: list[object] = []
        started = threading.Event()
        threads = [
            threading.Thread(target=_long_request, args=(str(info.replicas[0].url), started, outcomes))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        assert started.wait(60)
        mgr.delete("life")
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request in flight hangs"
        assert len(outcomes) == 3, outcomes
        assert _gone(pgids), "engine processes survived delete"
        assert mgr.get("life") is None
        assert _cli("deploy", "list", *common).stdout.count("life") == 0
    finally:
        mgr.close()


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from rollstream.testing import need

    return dict(need("safetensors.numpy").load_file(str(model_dir / "model.safetensors")))


def _long_request(url: str, started: threading.Event, outcomes: list[object]) -> None:
    body: dict[str, Any] = {
        "model": "life",
        "token_ids": [1, 2, 3],
        "sampling_params": {"max_tokens": 1800, "ignore_eos": True},
        "stream": True,
    }
    try:
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/inference/v1/generate", json=body) as r:
            for _ in r.iter_raw():
                started.set()
        outcomes.append("completed")
    except httpx.HTTPError as e:
        outcomes.append(e)
