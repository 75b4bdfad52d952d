"""Optional test dependencies: imported inside the tests that need them.

Elsewhere a missing one skips the test with the reason; under ``CI=true``
(or ``ROLLSTREAM_REQUIRE_ENGINE=1``) it fails, so CI never passes by skipping.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from rollstream.testing.pytest_plugin import engine_required


def require(module: str, why: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} is needed {why} but cannot be imported: {e}"
        if engine_required():
            pytest.fail(message + " (required under CI; `make build` installs it)")
        pytest.skip(message)


def reference_sdk() -> ModuleType:
    """The Fireworks training SDK (fireworks-ai 1.2.30), the reference of the
    compatibility tests."""
    return require("fireworks.training.sdk", "to compare with the Fireworks SDK")
