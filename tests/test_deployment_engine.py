"""The DeploymentManager against real vLLM servers: a two-replica deployment
of the tiny model (the session's ``deployment``), sampled as one, hot-loaded
as one, verified on every replica, surviving a killed replica."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _engine_helpers import CHAT, model_dir_with, perturbed, recompute_error, sample_from

import rollstream
from rollstream import ChatTokenizer, DeploymentSampler
from rollstream._exceptions import HotloadError
from rollstream.deployment import DeploymentInfo, DeploymentManager, WeightSyncer
from rollstream.snapshots import SnapshotStore

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def _load(path: Path) -> dict[str, np.ndarray]:
    from rollstream.testing import need

    return dict(need("safetensors.numpy").load_file(str(path)))


class Trainer:
    """Holds the 'policy' weights a WeightSyncer saves (numpy, like a trainer's CPU copy)."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.weights


@pytest.fixture
def base(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    return _load(tiny_model_dir / "model.safetensors")


@pytest.fixture
def trainer(
    deployment_manager: DeploymentManager, deployment: DeploymentInfo, tiny_model_dir: Path, base: Any
) -> Any:
    """A WeightSyncer on the session deployment; afterwards the deployment
    serves the base weights again (a full snapshot of them)."""
    policy = Trainer(dict(base))
    syncer = WeightSyncer(
        policy, deploy_mgr=deployment_manager, deployment_id="tiny", base_model=str(tiny_model_dir)
    )
    yield policy, syncer
    deployment_manager.fault_hook = None
    deployment_manager.wait_for_ready("tiny", timeout_s=900)
    policy.weights = dict(base)
    syncer.save_and_hotload(f"restore-{uuid.uuid4().hex[:8]}", checkpoint_type="base")


def _versions(info: DeploymentInfo) -> list[str | None]:
    return [httpx.get(r.url + "/weight_info").json().get("weight_version") for r in info.replicas if r.url]


def test_cookbook_sampler_spreads_over_both_replicas(
    deployment_manager: DeploymentManager, deployment: DeploymentInfo, tiny_model_dir: Path
) -> None:
    assert deployment.state == "READY"
    assert [r.state for r in deployment.replicas] == ["READY", "READY"]
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    # The Fireworks cookbook shape: the manager's inference URL and the
    # deployment's model; the sampler resolves the replicas itself.
    sampler = DeploymentSampler(
        inference_url=deployment_manager.inference_url, model=str(deployment.inference_model), tokenizer=tok
    )

    async def go() -> Any:
        async with sampler:
            return await sampler.sample_with_tokens(CHAT, n=8, max_tokens=8, logprobs=True)

    completions = asyncio.run(go())
    assert len(completions) == 8
    assert all(c.completion_len == 8 and len(c.inference_logprobs or []) == 8 for c in completions)
    served_by = {c.server_url for c in completions}
    assert served_by == {r.url for r in deployment.replicas}, served_by


def _stream_generate(
    url: str, model: str, max_tokens: int, out: dict[str, Any], started: threading.Event
) -> None:
    body = {
        "model": model,
        "token_ids": [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198],
        "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": 3},
        "stream": True,
    }
    chunks = []
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/inference/v1/generate", json=body) as r:
        for i, part in enumerate(r.iter_raw()):
            chunks.append(part)
            if i == 20:
                started.set()
    started.set()
    out[url] = rollstream.parse_stream(b"".join(chunks))


def test_delta_hotload_is_exact_on_every_replica_and_spares_requests_in_flight(
    deployment_manager: DeploymentManager,
    deployment: DeploymentInfo,
    trainer: Any,
    base: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    mgr = deployment_manager
    policy, syncer = trainer
    assert syncer.save_and_hotload("d-step-0", checkpoint_type="base") == "d-step-0"
    policy.weights = perturbed(base, 1)

    # Long generations on both replicas, started after staging (nothing is
    # paused yet) and still running when the replicas pause.
    streams: dict[str, Any] = {}
    threads: list[threading.Thread] = []

    def start_requests(point: str, replica: Any, path: str) -> None:
        if point != "staged" or threads:
            return
        events = []
        for r in deployment.replicas:
            started = threading.Event()
            t = threading.Thread(target=_stream_generate, args=(r.url, "tiny", 1500, streams, started))
            t.start()
            threads.append(t)
            events.append(started)
        assert all(e.wait(120) for e in events), "the long requests never started"

    mgr.fault_hook = start_requests
    assert syncer.save_and_hotload("d-step-1") == "d-step-1"
    mgr.fault_hook = None
    assert syncer.last_snapshot is not None
    assert syncer.last_snapshot.kind == "delta"
    for t in threads:
        t.join(600)
    info = mgr.get("tiny")
    assert info is not None
    assert info.current_snapshot_identity == "d-step-1"
    assert _versions(info) == ["d-step-1", "d-step-1"]
    assert {r.snapshot_identity for r in info.replicas} == {"d-step-1"}

    # Every request in flight completed, whole, across the weight change.
    assert len(streams) == 2
    for url, result in streams.items():
        (choice,) = result.choices
        assert len(choice.token_ids) == 1500, url
        spans = [(v.version, v.start, v.end) for v in choice.weight_versions]
        assert [s[0] for s in spans] == ["d-step-0", "d-step-1"], spans
        assert spans[0][1] == 0
        assert spans[-1][2] == 1500
        assert spans[0][2] == spans[1][1]

    # Each replica serves the new checkpoint exactly (transformers, float32).
    store = SnapshotStore(str(info.hot_load_bucket_url))
    hf_new = model_dir_with(tmp_path, tiny_model_dir, store.materialize("d-step-1"))
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    for r in info.replicas:
        samples = sample_from(str(r.url), "tiny", tok)
        assert {c.weight_version for c in samples} == {"d-step-1"}
        err = recompute_error(samples, hf_new)
        assert err < 1e-4, f"replica {r.index} differs from the new checkpoint by {err}"
    t = mgr.hotload_timings("tiny")
    assert t["stage_s"] > 0
    assert t["paused_window_s"] >= t["reload_s"]
    print(f"\nhot-load timings (two replicas, delta): {t}")


def test_corrupt_delta_is_refused_before_any_pause(
    deployment_manager: DeploymentManager, deployment: DeploymentInfo, trainer: Any, base: Any
) -> None:
    mgr = deployment_manager
    policy, syncer = trainer
    syncer.save_and_hotload("c-step-0", checkpoint_type="base")
    policy.weights = perturbed(base, 2)
    assert syncer.save_only("c-step-1") == "c-step-1"
    info = syncer.last_snapshot
    assert info is not None
    assert info.kind == "delta"
    delta = info.path / info.files[0]
    raw = bytearray(delta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    delta.write_bytes(bytes(raw))
    with pytest.raises(HotloadError) as caught:
        mgr.hotload_and_wait(
            "tiny", "", "c-step-1", incremental_snapshot_metadata=info.incremental_snapshot_metadata
        )
    assert caught.value.stage == "stage", caught.value
    assert "nothing was paused" in str(caught.value)
    assert "pause_s" not in mgr.hotload_timings("tiny")
    current = mgr.get("tiny")
    assert current is not None
    assert _versions(current) == ["c-step-0", "c-step-0"]


def test_out_of_order_delta_is_refused(
    deployment_manager: DeploymentManager, deployment: DeploymentInfo, trainer: Any, base: Any
) -> None:
    mgr = deployment_manager
    _, syncer = trainer
    syncer.save_and_hotload("o-step-0", checkpoint_type="base")
    store = syncer.chain.store
    store.save_delta("o-step-1", "o-step-0", perturbed(base, 3))
    skipped = store.save_delta("o-step-2", "o-step-1", perturbed(base, 4))
    with pytest.raises(HotloadError, match=r"o-step-1.*serves.*o-step-0") as caught:
        mgr.hotload_and_wait(
            "tiny", "", "o-step-2", incremental_snapshot_metadata=skipped.incremental_snapshot_metadata
        )
    assert caught.value.stage == "stage"
    current = mgr.get("tiny")
    assert current is not None
    assert _versions(current) == ["o-step-0", "o-step-0"]


def test_a_failed_reload_on_one_replica_rolls_the_other_back(
    deployment_manager: DeploymentManager,
    deployment: DeploymentInfo,
    trainer: Any,
    base: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    mgr = deployment_manager
    policy, syncer = trainer
    syncer.save_and_hotload("f-step-0", checkpoint_type="base")
    policy.weights = perturbed(base, 5)
    victim = sorted(r.index for r in deployment.replicas)[-1]

    def corrupt_one(point: str, replica: Any, path: str) -> None:
        # A real failure on one replica only: its staged copy is replaced by a
        # truncated file after the checks passed (the other keeps its link).
        if point == "reloading" and replica.index == victim:
            f = Path(path) / "model.safetensors"
            data = f.read_bytes()
            f.unlink()
            f.write_bytes(data[: len(data) // 2])

    mgr.fault_hook = corrupt_one
    with pytest.raises(HotloadError) as caught:
        syncer.save_and_hotload("f-step-1")
    mgr.fault_hook = None
    assert caught.value.stage == "reload"
    victim_url = next(r.url for r in mgr.get("tiny").replicas if r.index == victim)  # type: ignore[union-attr]
    assert caught.value.replica == victim_url
    assert syncer.base_identity == "f-step-0", "the chain still points at what is served"

    info = mgr.get("tiny")
    assert info is not None
    assert [r.state for r in info.replicas] == ["READY", "READY"]
    assert _versions(info) == ["f-step-0", "f-step-0"]
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    hf_old = model_dir_with(tmp_path, tiny_model_dir, syncer.chain.store.materialize("f-step-0"))
    for r in info.replicas:
        err = recompute_error(sample_from(str(r.url), "tiny", tok), hf_old)
        assert err < 1e-4, f"replica {r.index} is not back on the old weights ({err})"


def test_a_killed_replica_is_detected_restarted_and_resynced_before_it_serves(
    deployment_manager: DeploymentManager,
    deployment: DeploymentInfo,
    trainer: Any,
    base: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from rollstream._supervise import group_members

    mgr = deployment_manager
    policy, syncer = trainer
    policy.weights = perturbed(base, 6)
    syncer.save_and_hotload("k-step-0", checkpoint_type="base")
    info = mgr.get("tiny")
    assert info is not None
    victim = info.replicas[0]
    assert victim.pid is not None
    old_url = victim.url
    pool = mgr.pool("tiny")

    os.killpg(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while next((ld.state for ld in pool.loads() if ld.url == old_url), "gone") == "active":
        assert time.monotonic() - t0 < 15, "the dead replica stayed in rotation"
        time.sleep(0.1)
    detected = time.monotonic() - t0
    assert not group_members(victim.pid), "the killed replica's processes are gone"
    # While it restarts, every request goes to the survivor.
    survivor = info.replicas[1].url
    for _ in range(8):
        route = pool.route_now()
        assert route is not None
        assert route.url == survivor
        pool.release(route)

    info = mgr.wait_for_ready("tiny", timeout_s=900)
    restarted = info.replicas[0]
    assert restarted.restarts == 1
    assert restarted.url != old_url
    assert restarted.snapshot_identity == "k-step-0"
    assert _versions(info) == ["k-step-0", "k-step-0"]
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    hf = model_dir_with(tmp_path, tiny_model_dir, syncer.chain.store.materialize("k-step-0"))
    err = recompute_error(sample_from(str(restarted.url), "tiny", tok), hf)
    assert err < 1e-4
    print(f"\nkilled replica out of rotation after {detected:.2f} s")


def test_scaling_up_joins_at_the_current_weights_and_down_drains(
    deployment_manager: DeploymentManager, deployment: DeploymentInfo, trainer: Any, base: Any
) -> None:
    mgr = deployment_manager
    policy, syncer = trainer
    policy.weights = perturbed(base, 7)
    syncer.save_and_hotload("s-step-0", checkpoint_type="base")
    before = {r.url for r in mgr.get("tiny").replicas}  # type: ignore[union-attr]
    mgr.update("tiny", min_replica_count=3)
    info = mgr.wait_for_ready("tiny", timeout_s=900)
    assert len(info.replicas) == 3
    assert before <= {r.url for r in info.replicas}, "healthy replicas were not restarted"
    assert _versions(info) == ["s-step-0"] * 3
    mgr.update("tiny", body={"minReplicaCount": 2}, update_mask="min_replica_count")
    info = mgr.wait_for_ready("tiny", timeout_s=900)
    assert len(info.replicas) == 2
    assert {r.url for r in info.replicas} == before
