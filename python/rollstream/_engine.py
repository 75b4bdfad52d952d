"""Launching vLLM servers as supervised process trees.

A server runs under :mod:`rollstream._supervise`: the supervisor leads a new
process group, starts the server inside it and kills the whole group when its
stdin (a pipe from the owning process) closes. The owner closing it, exiting,
or being killed outright (SIGKILL) therefore all stop every engine process
(vLLM forks an engine core and workers): nothing outlives its owner.

The flags every rollstream-launched server gets, and why, are in
``docs/ENGINE.md`` (section 2).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from ._exceptions import EngineStartError

__all__ = [
    "DEFAULT_FLAGS",
    "ServerProcess",
    "engine_available",
    "free_port",
    "vllm_command",
]

#: Flags every rollstream deployment gets (docs/ENGINE.md, section 2): exact,
#: processed logprobs of the distribution actually sampled from; server
#: defaults never leak into rollouts; per-request queue metrics for AIMD; the
#: token-in / token-out endpoint; rollstream's worker extension.
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


def vllm_command(
    python: str,
    model: str,
    *,
    served_model_name: str | Sequence[str],
    host: str,
    port: int,
    args: Sequence[str] = (),
) -> list[str]:
    """The command line of an OpenAI-compatible vLLM server with rollstream's
    flags. (The ``vllm`` console script fails for the CPU build: it looks up
    a distribution named ``vllm``; the module entry point always works.)
    Several served names make the server answer to each (the first is the
    one it reports)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        *names,
        "--host",
        host,
        "--port",
        str(port),
        *DEFAULT_FLAGS,
        *args,
    ]


class ServerProcess:
    """One supervised server process tree: start (non-blocking), wait until
    healthy, poll, stop. Safe to stop twice."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        url: str,
        env: Mapping[str, str],
        log_path: str | os.PathLike[str],
    ) -> None:
        self.command = list(command)
        self.url = url
        self.env = dict(env)
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        #: Process group of the last start (kept after stop, to check cleanup).
        self.pgid: int | None = None
        self.started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the supervisor (the process-group leader)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"server {self.url} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rollstream._supervise", "--", *self.command],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pgid = self._proc.pid
        self.started_at = time.monotonic()

    def wait_healthy(self, timeout: float, *, cancelled: Callable[[], bool] | None = None) -> float:
        """Block until ``/health`` answers 200; seconds since start. Raises
        :class:`EngineStartError` with the log's tail when the process exits
        or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
            while True:
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    code = proc.returncode if proc is not None else None
                    raise EngineStartError(
                        f"vLLM server {self.url} exited with code {code} before becoming healthy "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                if cancelled is not None and cancelled():
                    raise EngineStartError(f"start of vLLM server {self.url} was cancelled")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return time.monotonic() - (self.started_at or time.monotonic())
                if time.monotonic() > deadline:
                    raise EngineStartError(
                        f"vLLM server at {self.url} not healthy after {timeout:.0f} s "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process tree. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: the supervisor kills the group
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
