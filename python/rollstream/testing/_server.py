"""Start and stop a real vLLM server (the CPU build here, any build in
production) as a context manager, with the flags rollstream relies on."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from .._exceptions import EngineStartError

__all__ = ["LocalVLLM", "engine_available", "free_port"]

#: Flags every rollstream deployment gets (see docs/ENGINE.md, section 2): exact, processed
#: logprobs of the distribution actually sampled from; server defaults never
#: leak into rollouts; per-request queue metrics for AIMD; the token-in /
#: token-out endpoint; rollstream's worker extension (hot-load fixes).
DEFAULT_FLAGS: tuple[str, ...] = (
    "--generation-config",
    "vllm",
    "--logprobs-mode",
    "processed_logprobs",
    "--enable-per-request-metrics",
    "--enable-scale-out",
    "--worker-extension-cls",
    "rollstream.vllm_ext.RollstreamWorkerExtension",
)

_LIVE: weakref.WeakSet[LocalVLLM] = weakref.WeakSet()


def engine_available(python: str | None = None) -> tuple[bool, str]:
    """Whether vLLM can be imported by ``python`` (default: this interpreter),
    with a reason when it cannot."""
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        if importlib.util.find_spec("vllm") is None:
            return False, f"vllm is not installed in {sys.executable} (run scripts/install-engine.sh)"
        return True, ""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    r = subprocess.run([python, "-c", probe], capture_output=True, check=False)
    return (r.returncode == 0, "" if r.returncode == 0 else f"vllm is not installed in {python}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalVLLM:
    """A vLLM OpenAI-compatible server in a child process tree.

    >>> with LocalVLLM("/models/tiny") as server:
    ...     print(server.url)

    The server runs under a supervisor that kills the whole process tree when
    :meth:`stop` is called, when this process exits, and even when this
    process is killed outright, so no engine outlives its owner.
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
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.model = str(model)
        self.served_model_name = served_model_name
        self.host = host
        self.port = port or free_port(host)
        self.python = python or os.environ.get("ROLLSTREAM_VLLM_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        self.args: list[str] = [
            "--model",
            self.model,
            "--served-model-name",
            served_model_name,
            "--host",
            host,
            "--port",
            str(self.port),
            "--dtype",
            dtype,
            "--max-model-len",
            str(max_model_len),
            "--max-logprobs",
            str(max_logprobs),
            *DEFAULT_FLAGS,
        ]
        if max_num_seqs is not None:
            self.args += ["--max-num-seqs", str(max_num_seqs)]
        self.args += list(extra_args)
        self.env = dict(os.environ)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if dev_mode:
            self.env["VLLM_SERVER_DEV_MODE"] = "1"
        self.env.update(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="rollstream-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        #: Process group of the last start (kept after stop, to check cleanup).
        self.pgid: int | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the supervisor (the process-group leader)."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> LocalVLLM:
        if self._proc is not None:
            raise RuntimeError("server already started")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rollstream.testing._supervise", "--", *self.command()],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pgid = self._proc.pid
        _LIVE.add(self)
        t0 = time.monotonic()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
            while True:
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    code = proc.returncode if proc is not None else None
                    raise EngineStartError(
                        f"vLLM server exited with code {code} before becoming healthy "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise EngineStartError(
                        f"vLLM server at {self.url} not healthy after {self.startup_timeout:.0f} s "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process tree. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _LIVE.discard(self)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: the supervisor kills the group
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

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
