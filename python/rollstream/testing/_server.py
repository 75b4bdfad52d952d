"""Start and stop a real vLLM server (the CPU build here, any build in
production) as a context manager, with the flags rollstream relies on."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .._engine import DEFAULT_FLAGS, ServerProcess, engine_available, free_port, vllm_command

__all__ = ["DEFAULT_FLAGS", "LocalVLLM", "engine_available", "free_port"]

_LIVE: weakref.WeakSet[LocalVLLM] = weakref.WeakSet()


class LocalVLLM:
    """A vLLM OpenAI-compatible server in a child process tree.

    >>> with LocalVLLM("/models/tiny") as server:
    ...     print(server.url)

    The server runs under a supervisor that kills the whole process tree when
    :meth:`stop` is called, when this process exits, and even when this
    process is killed outright, so no engine outlives its owner.
    ``snapshot_roots`` are the directories the worker extension may check
    checkpoints in (default: the model's directory and the temp directory).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        served_model_name: str = "tiny-qwen3",
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_num_seqs: int | None = None,
        max_logprobs: int = 20,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        kv_cache_gib: int = 1,
        startup_timeout: float = 600.0,
        python: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        dev_mode: bool = True,
        snapshot_roots: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.model = str(model)
        self.served_model_name = served_model_name
        self.host = host
        self.port = port or free_port(host)
        self.python = python or os.environ.get("ROLLSTREAM_VLLM_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        args = ["--dtype", dtype, "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs)]
        if max_num_seqs is not None:
            args += ["--max-num-seqs", str(max_num_seqs)]
        args += list(extra_args)
        cmd = vllm_command(
            self.python, self.model, served_model_name=served_model_name, host=host, port=self.port, args=args
        )
        self.args: list[str] = cmd[3:]
        self.env = dict(os.environ)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if dev_mode:
            self.env["VLLM_SERVER_DEV_MODE"] = "1"
        roots = snapshot_roots
        if roots is None:
            roots = (Path(self.model).parent, tempfile.gettempdir())
        self.env["ROLLSTREAM_SNAPSHOT_ROOTS"] = os.pathsep.join(str(Path(r).resolve()) for r in roots)
        self.env.update(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="rollstream-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._process = ServerProcess(cmd, url=self.url, env=self.env, log_path=self.log_path)
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def pid(self) -> int | None:
        """Process id of the supervisor (the process-group leader)."""
        return self._process.pid

    @property
    def pgid(self) -> int | None:
        """Process group of the last start (kept after stop, to check cleanup)."""
        return self._process.pgid

    def command(self) -> list[str]:
        return list(self._process.command)

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def start(self) -> LocalVLLM:
        self._process.start()
        _LIVE.add(self)
        try:
            self.startup_seconds = self._process.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process tree. Idempotent."""
        _LIVE.discard(self)
        self._process.stop(timeout)

    def __enter__(self) -> LocalVLLM:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalVLLM(model={self.model!r}, url={self.url!r}, {state})"


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()
