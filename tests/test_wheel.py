"""The client needs no torch: the release wheel, installed alone into a fresh
virtual environment, samples from the session's engine (scripts/check-wheel.sh
builds it with maturin, so this takes a few minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollstream.testing import LocalVLLM

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check-wheel.sh"


def test_wheel_samples_without_torch(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        ROLLSTREAM_TEST_SERVER=vllm_server.url,
        ROLLSTREAM_TEST_MODEL=vllm_server.served_model_name,
        ROLLSTREAM_TEST_TOKENIZER=str(tiny_model_dir),
    )
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "check-wheel: ok" in run.stdout, output[-6000:]
