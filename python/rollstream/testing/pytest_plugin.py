"""pytest fixtures for tests that need a real engine.

Enable with ``pytest_plugins = ["rollstream.testing.pytest_plugin"]``.

- ``tiny_model_dir``: the tiny model, written once per session.
- ``vllm_server``: one real vLLM server per session, serving the tiny model
  with ``--max-num-seqs 8`` so that a few dozen concurrent requests queue for
  real (the congestion the concurrency tests need).
- ``deployment_manager`` / ``deployment``: a DeploymentManager with a state
  directory of its own and one two-replica deployment of the tiny model
  (``deployment_id="tiny"``), shared by the tests of a session. Tests that
  change its weights put the base weights back.

When vLLM is not installed the engine fixtures skip with the reason, except
under ``CI=true`` (or ``ROLLSTREAM_REQUIRE_ENGINE=1``), where they fail: CI
must never pass by skipping the engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._model import tiny_model
from ._need import strict
from ._server import LocalVLLM, engine_available

SESSION_MAX_NUM_SEQS = 8


def engine_required() -> bool:
    return strict()


def require_engine() -> None:
    """Skip (or, in CI, fail) when the engine is not installed."""
    ok, reason = engine_available(os.environ.get("ROLLSTREAM_VLLM_PYTHON"))
    if ok:
        return
    if engine_required():
        pytest.fail(f"the vLLM engine is required here (CI) but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("ROLLSTREAM_TINY_MODEL_DIR")
    path = Path(cache) if cache else tmp_path_factory.mktemp("tiny-model")
    return tiny_model(path)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVLLM]:
    require_engine()
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with LocalVLLM(tiny_model_dir, log_path=log, max_num_seqs=SESSION_MAX_NUM_SEQS) as server:
        yield server


@pytest.fixture(scope="session")
def deployment_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_engine()
    from ..deployment import DeploymentManager

    mgr = DeploymentManager(state_dir=tmp_path_factory.mktemp("deployments"), probe_interval=1.0)
    try:
        yield mgr
    finally:
        mgr.close()


@pytest.fixture(scope="session")
def deployment(deployment_manager: Any, tiny_model_dir: Path) -> Any:
    """A READY two-replica deployment of the tiny model (``"tiny"``)."""
    from ..deployment import DeploymentConfig

    config = DeploymentConfig(
        deployment_id="tiny",
        base_model=str(tiny_model_dir),
        min_replica_count=2,
        deployment_shape="cpu-small",
    )
    deployment_manager.create_or_get(config)
    return deployment_manager.wait_for_ready("tiny", timeout_s=900)
