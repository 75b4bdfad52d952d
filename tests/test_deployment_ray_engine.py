"""The DeploymentManager's Ray backend against a real Ray head on 127.0.0.1
and a real vLLM server launched by a replica actor: lifecycle and a verified
hot-load, then nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _engine_helpers import model_dir_with, perturbed, recompute_error, sample_from

from rollstream import ChatTokenizer
from rollstream._engine import free_port
from rollstream._supervise import group_members
from rollstream.deployment import DeploymentConfig, DeploymentManager, WeightSyncer
from rollstream.testing import need

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ray head on 127.0.0.1 (two CPUs), stopped afterwards."""
    from rollstream.testing.pytest_plugin import require_engine

    require_engine()
    ray = need("ray")
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_cli, "the ray CLI is installed with the package"
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = subprocess.run(
        [
            ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, check=False)


def test_ray_backend_lifecycle_and_verified_hotload(
    ray_head: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    mgr = DeploymentManager("ray", state_dir=state, backend_options={"address": ray_head}, probe_interval=1.0)
    try:
        t0 = time.monotonic()
        mgr.create_or_get(
            DeploymentConfig("onray", base_model=str(tiny_model_dir), deployment_shape="cpu-small")
        )
        info = mgr.wait_for_ready("onray", timeout_s=900)
        print(f"\nRay replica READY after {time.monotonic() - t0:.1f} s")
        assert info.backend == "ray"
        (replica,) = info.replicas
        assert replica.state == "READY"
        assert replica.pid is not None
        assert group_members(replica.pid), "the server runs under the actor's supervisor"

        # A verified hot-load: a full snapshot, then a delta, both staged by
        # the replica's actor on its node before anything is paused.
        base = dict(need("safetensors.numpy").load_file(str(tiny_model_dir / "model.safetensors")))
        weights = {"w": perturbed(base, 21)}
        syncer = WeightSyncer(lambda: weights["w"], deploy_mgr=mgr, deployment_id="onray")
        syncer.save_and_hotload("r-0", checkpoint_type="base")
        weights["w"] = perturbed(base, 22)
        syncer.save_and_hotload("r-1")
        assert syncer.last_snapshot is not None
        assert syncer.last_snapshot.kind == "delta"
        url = str(replica.url)
        assert httpx.get(url + "/weight_info").json()["weight_version"] == "r-1"
        tok = ChatTokenizer.from_pretrained(tiny_model_dir)
        hf = model_dir_with(tmp_path, tiny_model_dir, syncer.chain.store.materialize("r-1"))
        assert recompute_error(sample_from(url, "onray", tok), hf) < 1e-4

        # Another process sees it.
        listed = subprocess.run(
            [sys.executable, "-m", "rollstream.cli", "deploy", "list", "--json", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        (row,) = json.loads(listed.stdout)
        assert row["deployment_id"] == "onray"
        assert row["state"] == "READY"
        assert row["current_snapshot_identity"] == "r-1"

        mgr.delete("onray")
        deadline = time.monotonic() + 60
        while group_members(replica.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not group_members(replica.pid), "the replica's engine processes outlived delete"
        assert mgr.get("onray") is None
    finally:
        mgr.close()
