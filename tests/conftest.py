from __future__ import annotations

pytest_plugins = ["rollstream.testing.pytest_plugin"]
