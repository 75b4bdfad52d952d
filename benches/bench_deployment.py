"""DeploymentManager on the real CPU engine: time from create_or_get to READY,
and the hot-load of a full and of a delta snapshot into one and two replicas,
split into its stages (stage, check, pause, reload, verify, resume), with the
window during which replicas are paused.

The reference is the engine's own cost: one ``reload_weights`` call of the
same checkpoint on a paused server. The goal: the paused window stays under
2x that call and does not grow with the snapshot's size, because staging
(materialising and verifying the delta chain) happens before the pause.
Every figure is the best of ROUNDS rounds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _timing import ROUNDS

from rollstream.deployment import DeploymentConfig, DeploymentManager
from rollstream.hotload import ServerControl
from rollstream.snapshots import SnapshotStore
from rollstream.testing import need, tiny_model

STAGES = ("stage_s", "check_s", "pause_s", "reload_s", "verify_s", "resume_s", "paused_window_s", "total_s")


def _perturbed(weights: dict[str, Any], seed: int, sparse: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in weights.items():
        step = (1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
        if sparse:
            step *= rng.random(v.shape) < 0.1
        out[k] = (v + step).astype(np.float32)
    return out


def _reload_weights_alone(url: str, path: str) -> float:
    """One reload of the checkpoint on a paused server (vLLM's reload_weights
    plus the LM-head re-tie a tied model needs): the engine's floor."""
    with ServerControl(url) as c:
        c.pause("keep")
        try:
            t = time.perf_counter()
            c.rpc("reload", "rollstream_reload", path=path, fallback=path)
            return time.perf_counter() - t
        finally:
            c.resume()


@pytest.mark.parametrize("replicas", [1, 2])
def test_deployment_ready_and_hotload_latency(replicas: int, tmp_path: Path, report: Any) -> None:
    from rollstream.testing.pytest_plugin import require_engine

    require_engine()
    model = tiny_model(tmp_path / "model")
    base = dict(need("safetensors.numpy").load_file(str(model / "model.safetensors")))
    mgr = DeploymentManager(state_dir=tmp_path / "state")
    try:
        t0 = time.perf_counter()
        mgr.create_or_get(
            DeploymentConfig(
                "bench", base_model=str(model), min_replica_count=replicas, deployment_shape="cpu-small"
            )
        )
        info = mgr.wait_for_ready("bench", timeout_s=1800)
        ready_s = time.perf_counter() - t0
        store = SnapshotStore(str(info.hot_load_bucket_url))
        rows: dict[str, dict[str, float]] = {}
        seq = 0
        for verify in ("before_resume", "after_resume"):
            mgr.verify_hotloads = verify
            for kind in ("full", "delta"):
                best: dict[str, float] = {}
                for _ in range(ROUNDS):
                    seq += 1
                    name = f"{kind}-{seq}"
                    prev = mgr.get("bench").current_snapshot_identity  # type: ignore[union-attr]
                    if kind == "full" or prev is None:
                        snap = store.save_full(name, _perturbed(base, seq, sparse=False))
                    else:
                        snap = store.save_delta(name, prev, _perturbed(base, seq, sparse=True))
                    mgr.hotload_and_wait(
                        "bench", "", name, incremental_snapshot_metadata=snap.incremental_snapshot_metadata
                    )
                    t = mgr.hotload_timings("bench")
                    if not best or t["paused_window_s"] < best["paused_window_s"]:
                        best = {**t, "bytes": float(snap.nbytes)}
                rows[f"{kind}, verify {verify.replace('_', ' ')}"] = best
        current = mgr.get("bench")
        assert current is not None
        path = str(store.materialize(str(current.current_snapshot_identity)))
        alone = min(_reload_weights_alone(str(current.replicas[0].url), path) for _ in range(ROUNDS))
    finally:
        mgr.close()

    report.add(
        f"deployment, {replicas} replica(s) of the tiny model (Qwen3 2x128, 151k vocab, 78 MB float32): "
        f"create_or_get -> READY {ready_s:.1f} s; one reload_weights alone {alone * 1e3:.0f} ms"
    )
    for label, t in rows.items():
        parts = " ".join(f"{k.removesuffix('_s')} {t.get(k, 0.0) * 1e3:.0f}" for k in STAGES)
        report.add(
            f"  hot-load {label} ({t['bytes'] / 1e6:.1f} MB): {parts} ms; paused window / reload_weights "
            f"= {t['paused_window_s'] / alone:.1f}x"
        )
