from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["rollstream.testing.pytest_plugin"]

DATA = Path(__file__).parent / "data"
STREAMS = sorted((DATA / "streams").glob("*.sse"))


@pytest.fixture(scope="session")
def stream_files() -> list[Path]:
    assert STREAMS, f"no recorded streams under {DATA / 'streams'}"
    return STREAMS
