"""Where replicas run: local processes (the default) or Ray actors.

A backend launches one vLLM server per replica and hands back a
:class:`ReplicaHandle`; the manager does everything else (health, routing,
hot-loads) over HTTP, identically for both. Every server runs under
rollstream's supervisor (:mod:`rollstream._engine`), so it dies with the
process that launched it: the manager for the local backend, the replica's
actor for Ray (and Ray kills an owner's actors when the owner exits).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._engine import ServerProcess, free_port, vllm_command
from .._exceptions import DeploymentError, EngineStartError

__all__ = ["Backend", "LaunchSpec", "LocalBackend", "RayBackend", "ReplicaHandle", "make_backend"]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one replica's server."""

    deployment_id: str
    index: int
    model: str
    served_model_name: Sequence[str]
    args: Sequence[str]
    env: Mapping[str, str]
    log_path: str
    resources: Mapping[str, float] = field(default_factory=dict)
    host: str = "127.0.0.1"
    python: str | None = None
    #: Replicas of the deployment on this machine (the local backend splits
    #: the CPUs between CPU-engine replicas).
    replicas: int = 1


class ReplicaHandle(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def log_path(self) -> str: ...

    def alive(self) -> bool: ...
    def wait_healthy(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> float: ...
    def stage(self, bucket: str, identity: str) -> str: ...
    def log_tail(self, lines: int = 40) -> str: ...
    def stop(self, timeout: float = 30.0) -> None: ...


class Backend(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> ReplicaHandle: ...
    def close(self) -> None: ...


def _server_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def _command(spec: LaunchSpec, host: str, port: int) -> list[str]:
    python = spec.python or os.environ.get("ROLLSTREAM_VLLM_PYTHON") or sys.executable
    return vllm_command(
        python, spec.model, served_model_name=spec.served_model_name, host=host, port=port, args=spec.args
    )


def _stage_here(bucket: str, identity: str) -> str:
    from ..snapshots import SnapshotStore

    return str(SnapshotStore(bucket).materialize(identity))


class _LocalHandle:
    def __init__(self, process: ServerProcess, host: str) -> None:
        self._process = process
        self.url = process.url
        self.host = host
        self.log_path = str(process.log_path)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def pgid(self) -> int | None:
        return self._process.pgid

    def alive(self) -> bool:
        return self._process.running

    def wait_healthy(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> float:
        return self._process.wait_healthy(timeout, cancelled=cancelled)

    def stage(self, bucket: str, identity: str) -> str:
        return _stage_here(bucket, identity)

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def stop(self, timeout: float = 30.0) -> None:
        self._process.stop(timeout)


class LocalBackend:
    """Replicas as supervised processes of this machine, on loopback unless
    ``host`` says otherwise (dev-mode endpoints are unauthenticated:
    ``docs/ENGINE.md``, section 2)."""

    name = "local"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host

    def launch(self, spec: LaunchSpec) -> ReplicaHandle:
        port = free_port(self.host)
        url = f"http://{self.host}:{port}"
        env = _server_env(spec)
        if not spec.resources.get("GPU") and "VLLM_CPU_OMP_THREADS_BIND" not in spec.env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_share(spec.index, spec.replicas)
        process = ServerProcess(_command(spec, self.host, port), url=url, env=env, log_path=spec.log_path)
        process.start()
        return _LocalHandle(process, self.host)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalBackend(host={self.host!r})"


def cpu_share(index: int, replicas: int) -> str:
    """The CPUs (a ``VLLM_CPU_OMP_THREADS_BIND`` list) of replica ``index``
    of ``replicas`` CPU-engine replicas on this machine. vLLM's automatic
    binding pins every engine to the same cores: two replicas then take turns
    instead of running in parallel (each spins on the core the other needs)."""
    cpus = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    per = max(1, len(cpus) // max(1, replicas))
    start = (index * per) % len(cpus)
    return ",".join(str(c) for c in cpus[start : start + per])


class _ReplicaActor:
    """Runs on a Ray node: launches, supervises and stops one server there."""

    def __init__(self, spec: LaunchSpec, host: str) -> None:
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        self.host = host
        self.process = ServerProcess(
            _command(spec, host, port), url=self.url, env=_server_env(spec), log_path=spec.log_path
        )
        self.process.start()

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "host": self.host, "pid": self.process.pid, "node": socket.gethostname()}

    def alive(self) -> bool:
        return self.process.running

    def wait_healthy(self, timeout: float) -> float:
        return self.process.wait_healthy(timeout)

    def stage(self, bucket: str, identity: str) -> str:
        return _stage_here(bucket, identity)

    def log_tail(self, lines: int) -> str:
        return self.process.log_tail(lines)

    def stop(self, timeout: float) -> None:
        self.process.stop(timeout)


class _RayHandle:
    def __init__(self, ray: Any, actor: Any, pg: Any, info: Mapping[str, Any], log_path: str) -> None:
        self._ray = ray
        self._actor = actor
        self._pg = pg
        self.url = str(info["url"])
        self.host = str(info["host"])
        self.pid = info.get("pid")
        self.log_path = log_path

    def _call(self, method: str, *args: Any, timeout: float = 60.0) -> Any:
        ray = self._ray
        try:
            return ray.get(getattr(self._actor, method).remote(*args), timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise DeploymentError(
                f"replica actor of {self.url}: {method} timed out after {timeout:.0f} s"
            ) from e
        except ray.exceptions.RayActorError as e:
            raise DeploymentError(f"replica actor of {self.url} died: {e}") from e

    def alive(self) -> bool:
        try:
            return bool(self._call("alive", timeout=10.0))
        except DeploymentError:
            return False

    def wait_healthy(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> float:
        try:
            return float(self._call("wait_healthy", timeout, timeout=timeout + 30.0))
        except self._ray.exceptions.RayTaskError as e:
            raise EngineStartError(str(e.cause) if getattr(e, "cause", None) else str(e)) from e

    def stage(self, bucket: str, identity: str) -> str:
        return str(self._call("stage", bucket, identity, timeout=3600.0))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return str(self._call("log_tail", lines, timeout=10.0))
        except DeploymentError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        ray = self._ray
        # The actor may be gone already; it is killed below either way.
        with contextlib.suppress(Exception):
            ray.get(self._actor.stop.remote(timeout), timeout=timeout + 30.0)
        try:
            ray.kill(self._actor)
        finally:
            ray.util.remove_placement_group(self._pg)


class RayBackend:
    """Replicas as Ray actors, each in its own placement group with the
    shape's resources (``pip install 'rollstream[ray]'``).

    ``address``: an existing cluster (``"ray://..."``, ``"host:port"`` or
    ``"auto"``); None starts a local one. The manager's process is the
    actors' owner: they (and their servers) end when it exits.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        namespace: str = "rollstream",
        init_kwargs: Mapping[str, Any] | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise DeploymentError("the Ray backend needs Ray: pip install 'rollstream[ray]'") from e
        self._ray = ray
        self.address = address
        self.startup_timeout = startup_timeout
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": namespace, "include_dashboard": False}
            kwargs["log_to_driver"] = False
            kwargs.update(init_kwargs or {})
            ray.init(address=address, **kwargs)
        self._actor_cls = ray.remote(num_cpus=0)(_ReplicaActor)

    def launch(self, spec: LaunchSpec) -> ReplicaHandle:
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {k: float(v) for k, v in spec.resources.items() if v}
        pg = placement_group([bundle] if bundle else [{"CPU": 0.001}], strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=self.startup_timeout)
        except ray.exceptions.GetTimeoutError as e:
            ray.util.remove_placement_group(pg)
            raise DeploymentError(
                f"replica {spec.index} of {spec.deployment_id!r}: the cluster cannot place {bundle} "
                f"within {self.startup_timeout:.0f} s (available: {ray.available_resources()})"
            ) from e
        host = (
            "127.0.0.1" if spec.host == "127.0.0.1" and _single_node(ray) else ray.util.get_node_ip_address()
        )
        actor: Any = self._actor_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg),
            name=f"rollstream-{spec.deployment_id}-{spec.index}-{os.getpid()}",
        ).remote(spec, host)
        try:
            info = ray.get(actor.info.remote(), timeout=120.0)
        except Exception as e:
            ray.kill(actor)
            ray.util.remove_placement_group(pg)
            raise DeploymentError(
                f"replica {spec.index} of {spec.deployment_id!r}: actor failed to start: {e}"
            ) from e
        return _RayHandle(ray, actor, pg, info, spec.log_path)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"RayBackend(address={self.address!r})"


def _single_node(ray: Any) -> bool:
    try:
        return len([n for n in ray.nodes() if n.get("Alive")]) == 1
    except Exception:
        return False


def make_backend(backend: str | Backend, **kwargs: Any) -> Backend:
    if isinstance(backend, str):
        if backend == "local":
            return LocalBackend(**kwargs)
        if backend == "ray":
            return RayBackend(**kwargs)
        raise ValueError(f"backend must be 'local', 'ray' or a backend object, got {backend!r}")
    if not callable(getattr(backend, "launch", None)):
        raise TypeError(f"backend {backend!r} has no launch(spec) method")
    return backend


def _publish(dest: Path, fill: Callable[[Path], None]) -> Path:
    """``dest`` filled by ``fill(tmp)`` in a private directory and published
    by rename (an existing, complete ``dest`` is kept; a concurrent
    publisher's wins)."""
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / ".complete").write_text("")
        os.rename(tmp, dest)
    except OSError:
        if not (dest / ".complete").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def view_dir(base_model: str, weights_dir: Path, dest: Path) -> Path:
    """A model directory for starting a server directly at ``weights_dir``'s
    weights: symlinks to the base model's configuration and tokenizer files
    and to the weights' safetensors (nothing is copied)."""

    def fill(tmp: Path) -> None:
        for f in Path(base_model).iterdir():
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name != "model.safetensors.index.json"
            ):
                (tmp / f.name).symlink_to(f.resolve())
        for f in weights_dir.glob("*.safetensors"):
            (tmp / f.name).symlink_to(f.resolve())

    return _publish(dest, fill)


def link_dir(src: Path, dest: Path) -> Path:
    """``dest`` holding hard links to the ``*.safetensors`` of ``src`` (copies
    across filesystems), published by rename; an existing ``dest`` is kept."""

    def fill(tmp: Path) -> None:
        for f in Path(src).glob("*.safetensors"):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copyfile(f, tmp / f.name)

    return _publish(dest, fill)
