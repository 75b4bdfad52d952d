"""The main job, short: GRPO on a local deployment learns, with the trainer's
masked logprobs equal to the engine's at every step (hot-loads included) and
every sample from the snapshot the trainer saved last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_grpo_demo_learns_with_zero_mismatch(tmp_path: Path) -> None:
    from rollstream.testing import need
    from rollstream.testing.pytest_plugin import require_engine

    require_engine()
    need("torch")
    need("transformers")
    from rollstream.examples.grpo import GRPOConfig, run

    records = run(GRPOConfig(steps=6, run_dir=str(tmp_path / "run"), quiet=True))
    assert [r.step for r in records] == list(range(6))
    for r in records:
        # Exact with the masks (float32), including the step after each hot-load...
        assert r.max_diff_masked < 1e-4, r
        # ...and far off without them: the negative control.
        assert r.max_diff_unmasked > 0.1, r
        assert r.versions_ok, (r.version, r.weight_versions)
        assert r.version == f"step-{r.step}"
        assert 0 < r.delta_bytes < r.full_bytes
    assert max(r.reward for r in records[-2:]) > records[0].reward + 0.02, [r.reward for r in records]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))
