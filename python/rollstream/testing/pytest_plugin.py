"""pytest fixtures for tests that need a real engine.

Enable with ``pytest_plugins = ["rollstream.testing.pytest_plugin"]``.

- ``tiny_model_dir``: the tiny model, written once per session.
- ``vllm_server``: one real vLLM server per session, serving the tiny model
  with ``--max-num-seqs 8`` so that a few dozen concurrent requests queue for
  real (the congestion the concurrency tests need).

When vLLM is not installed the engine fixtures skip with the reason, except
under ``CI=true`` (or ``ROLLSTREAM_REQUIRE_ENGINE=1``), where they fail: CI
must never pass by skipping the engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
