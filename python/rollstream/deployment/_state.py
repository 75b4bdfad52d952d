"""Deployment state on disk: one JSON document per deployment, written
atomically (temporary file, fsync, rename), readable from any process.

Layout under the state directory::

    deployments/<id>/state.json    config, state, replicas, weights, owner
    deployments/<id>/lock          flock: one writer at a time
    deployments/<id>/logs/         one log file per replica start
    deployments/<id>/views/        model directories of loaded snapshots
    buckets/<id>/                  the default snapshot store (kept by delete:
                                   snapshots are the trainer's data)

The process that runs a deployment's replicas (its *owner*) is recorded with
its pid and the kernel's start time of that pid, so a reader can tell a live
owner from a dead one whose pid was reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._exceptions import DeploymentError

__all__ = ["StateStore", "default_state_dir", "owner_alive", "process_identity"]

FORMAT_VERSION = 1


def default_state_dir() -> Path:
    """``$ROLLSTREAM_STATE_DIR``, else ``$XDG_CACHE_HOME/rollstream``, else
    ``~/.cache/rollstream``."""
    env = os.environ.get("ROLLSTREAM_STATE_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rollstream"


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None
    when no such process runs (a zombie, killed but not yet reaped, counts as
    gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields and fields[0] in (b"Z", b"X"):
        return None
    # After the command: state(0) ppid(1) ... starttime is field 22 of stat, index 19 here.
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_identity(pid: int | None = None) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid)}


def owner_alive(owner: dict[str, Any] | None) -> bool:
    """Whether the recorded owner process still runs (same host only; an
    owner on another host counts as alive)."""
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    start = _start_time(owner["pid"])
    return start is not None and start == owner.get("start_time")


class StateStore:
    """The state documents under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        (self.root / "deployments").mkdir(parents=True, exist_ok=True)

    def dir(self, deployment_id: str) -> Path:
        return self.root / "deployments" / deployment_id

    def _path(self, deployment_id: str) -> Path:
        return self.dir(deployment_id) / "state.json"

    def ids(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / "deployments").glob("*/state.json"))

    def read(self, deployment_id: str) -> dict[str, Any] | None:
        path = self._path(deployment_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DeploymentError(f"state of deployment {deployment_id!r} is unreadable ({path}): {e}") from e
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise DeploymentError(f"state of deployment {deployment_id!r} is corrupt ({path}): {e}") from e
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise DeploymentError(
                f"state of deployment {deployment_id!r} ({path}) has an unknown format "
                f"{data.get('format_version') if isinstance(data, dict) else type(data).__name__!r}"
            )
        return data

    def write(self, deployment_id: str, data: dict[str, Any]) -> None:
        """Replace the document atomically (readers see the old or the new
        one, never a mix)."""
        d = self.dir(deployment_id)
        d.mkdir(parents=True, exist_ok=True)
        data = {**data, "format_version": FORMAT_VERSION}
        tmp = d / f".state-{uuid.uuid4().hex[:12]}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(deployment_id))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def lock(self, deployment_id: str) -> Iterator[None]:
        """An exclusive lock on the deployment across processes."""
        d = self.dir(deployment_id)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove(self, deployment_id: str) -> None:
        """Delete the deployment's state and logs (not its bucket)."""
        d = self.dir(deployment_id)
        if not d.exists():
            return
        trash = d.with_name(f".trash-{deployment_id}-{uuid.uuid4().hex[:8]}")
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)
