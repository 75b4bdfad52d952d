"""Optional dependencies of tests and benchmarks, imported where they are
used: a test that needs only rollstream never skips because torch or
transformers is missing, and under ``CI=true`` a missing dependency fails
the run instead of hiding the tests that need it."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def strict() -> bool:
    """Whether skipping is forbidden: ``CI`` or ``ROLLSTREAM_REQUIRE_ENGINE``
    set to 1/true/yes. CI must never pass by skipping."""
    flag = os.environ.get("ROLLSTREAM_REQUIRE_ENGINE") or os.environ.get("CI") or ""
    return flag.lower() in ("1", "true", "yes")


def need(module: str) -> ModuleType:
    """Import and return ``module`` for the test calling this. When it cannot
    be imported the test skips with the reason, or, under :func:`strict`,
    fails."""
    import pytest  # only tests call this; rollstream.testing itself runs without pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"needs {module}, which cannot be imported ({e})"
        if strict():
            pytest.fail(f"{reason}; CI=true forbids skipping", pytrace=False)
        pytest.skip(reason)
