"""Operations on a deployment from a process that does not own it.

The owner (the process that runs a deployment's replicas) listens on a
loopback TCP port with a random token, both recorded in the deployment's
state file (mode 0600: whoever can read the state may control it). Another
process's DeploymentManager forwards mutations (hot-load, update,
scale-to-zero, delete) there, one JSON line each way. This is a control
channel only: samplers talk to the replicas directly.
"""

from __future__ import annotations

import json
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from .._exceptions import DeploymentError, HotloadError, RollstreamError

__all__ = ["ControlServer", "call"]

#: Requests and replies larger than this are refused.
MAX_LINE = 16 << 20


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return
        try:
            if len(line) > MAX_LINE:
                raise DeploymentError(f"control request larger than {MAX_LINE} bytes")
            req = json.loads(line)
            if not isinstance(req, dict) or not secrets.compare_digest(
                str(req.get("token", "")), self.server.token
            ):
                raise DeploymentError("control request refused: bad token")
            result = self.server.dispatch(str(req.get("op")), dict(req.get("args") or {}))
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception as e:
            reply = {
                "ok": False,
                "type": type(e).__name__,
                "message": str(e),
                "stage": getattr(e, "stage", None),
                "replica": getattr(e, "replica", None),
            }
        self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dispatch: Callable[[str, dict[str, Any]], Any]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dispatch = dispatch
        self.token = secrets.token_hex(16)


class ControlServer:
    """The owner's end: ``dispatch(op, args)`` runs in a server thread."""

    def __init__(self, dispatch: Callable[[str, dict[str, Any]], Any]) -> None:
        self._server = _Server(dispatch)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="rollstream-deploy-control", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> dict[str, Any]:
        return {"port": self._server.server_address[1], "token": self._server.token}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def call(address: dict[str, Any], op: str, args: dict[str, Any], timeout: float) -> Any:
    """Run ``op`` in the owner process; its exception is re-raised here with
    its type (HotloadError keeps stage and replica)."""
    try:
        with socket.create_connection(("127.0.0.1", int(address["port"])), timeout=timeout) as s:
            s.sendall(json.dumps({"token": address["token"], "op": op, "args": args}).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(MAX_LINE + 1)
    except (OSError, KeyError, ValueError) as e:
        raise DeploymentError(f"cannot reach the process that owns the deployment ({op}): {e}") from e
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise DeploymentError(f"the owning process gave an unreadable reply to {op}: {line[:200]!r}") from e
    if reply.get("ok"):
        return reply.get("result")
    message = str(reply.get("message"))
    kind = reply.get("type")
    if kind == "HotloadError":
        raise HotloadError(message, stage=reply.get("stage"), replica=reply.get("replica"))
    if kind in ("ValueError", "TypeError", "KeyError"):
        raise {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}[kind](message)
    if kind == "DeploymentError" or kind is None:
        raise DeploymentError(message)
    raise RollstreamError(f"{kind}: {message}")
