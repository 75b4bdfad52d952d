"""The ``rollstream`` command line.

``rollstream deploy create|list|get|hotload|scale|scale-to-zero|delete`` drive
the same :class:`~rollstream.deployment.DeploymentManager` as the Python API.
A deployment belongs to the process that runs its replicas: ``create`` runs
in the foreground (Ctrl-C stops the replicas; the deployment is kept and
``create`` again restarts it at its weights), or with ``--detach`` in a
background process that ends when the deployment is deleted or scaled to
zero. Every other command works from any shell.

``rollstream serve`` puts an OpenAI-compatible endpoint
(:class:`~rollstream.inference.OpenAIServer`) in front of engines given by
URL (``--engine``) or of a deployment's replicas (``--deployment``), until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _manager(args: argparse.Namespace) -> Any:
    from .deployment import DeploymentManager

    options: dict[str, Any] = {}
    if getattr(args, "ray_address", None):
        options["address"] = args.ray_address
    return DeploymentManager(
        getattr(args, "backend", "local"),
        state_dir=args.state_dir,
        backend_options=options,
        api_key=os.environ.get("ROLLSTREAM_API_KEY"),
    )


def _row(info: Any) -> str:
    ready = sum(r.state == "READY" for r in info.replicas)
    return (
        f"{info.deployment_id:<20} {info.state:<15} {ready}/{len(info.replicas):<3} "
        f"{info.current_snapshot_identity or '(base)':<24} {info.backend or '':<6} {info.base_model}"
    )


def _print_info(info: Any, as_json: bool) -> None:
    if as_json:
        d = dataclasses.asdict(info)
        d.pop("config", None)
        print(json.dumps(d, indent=1, default=str))
        return
    print(f"deployment   {info.deployment_id} ({info.state})")
    print(f"model        {info.inference_model}  (base: {info.base_model})")
    print(f"weights      {info.current_snapshot_identity or '(base model)'}")
    print(f"bucket       {info.hot_load_bucket_url}")
    print(f"owner pid    {info.owner_pid}")
    for r in info.replicas:
        err = f"  last error: {r.last_error.splitlines()[-1][:120]}" if r.last_error else ""
        print(f"  replica {r.index}: {r.state:<9} {r.url or '-':<28} restarts={r.restarts}{err}")


class _Progress:
    """One status line, rewritten in place on a terminal, one line per change elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.t0 = time.monotonic()

    def show(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif text != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = text

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _replicas_line(info: Any) -> str:
    return f"{info.state}: " + ", ".join(f"replica {r.index} {r.state}" for r in info.replicas)


def _wait_ready(mgr: Any, dep: str, timeout: float) -> Any:
    progress = _Progress()
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = mgr.get(dep)
            if info is None:
                raise SystemExit(f"deployment {dep!r} disappeared")
            progress.show(_replicas_line(info))
            if info.state == "READY":
                return info
            if info.state in ("FAILED", "STOPPED", "DELETING"):
                errors = "; ".join(
                    f"replica {r.index}: {r.last_error}" for r in info.replicas if r.last_error
                )
                raise SystemExit(f"deployment {dep!r} is {info.state}: {errors or info.last_error}")
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"deployment {dep!r} not ready after {timeout:.0f} s ({_replicas_line(info)})"
                )
            time.sleep(0.5)
    finally:
        progress.done()


def _config(args: argparse.Namespace) -> Any:
    from .deployment import DeploymentConfig

    return DeploymentConfig(
        deployment_id=args.deployment_id,
        base_model=str(Path(args.base_model).expanduser().resolve())
        if Path(args.base_model).expanduser().exists()
        else args.base_model,
        min_replica_count=args.replicas,
        max_replica_count=args.replicas,
        deployment_shape=args.shape,
        extra_args=list(args.extra_arg or []) or None,
        hot_load_bucket_url=args.bucket,
    )


def cmd_create(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.detach:
        argv = [a for a in args.argv if a != "--detach"]
        log_dir = Path(args.state_dir or _default_state()) / "deployments" / config.deployment_id
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "owner.log", "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "rollstream.cli", *argv, "--quiet"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        mgr = _manager(args)
        deadline = time.monotonic() + 60
        while mgr.get(config.deployment_id) is None or mgr.get(config.deployment_id).owner_pid is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the background owner did not start; see {log_dir / 'owner.log'}")
            time.sleep(0.2)
        info = _wait_ready(mgr, config.deployment_id, args.timeout)
        _print_info(info, args.json)
        return 0

    mgr = _manager(args)
    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        mgr.create_or_get(config, force_recreate=args.force_recreate)
        info = _wait_ready(mgr, config.deployment_id, args.timeout) if not args.quiet else None
        if info is not None:
            _print_info(info, args.json)
            print("serving; Ctrl-C stops the replicas (the deployment is kept)", file=sys.stderr)
        while not stop["flag"]:
            time.sleep(0.5)
            current = mgr.get(config.deployment_id)
            if current is None or current.state == "SCALED_TO_ZERO":
                break
    except KeyboardInterrupt:
        pass
    finally:
        mgr.close()
    return 0


def _default_state() -> Path:
    from .deployment import default_state_dir

    return default_state_dir()


def cmd_list(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    infos = mgr.list()
    if args.json:
        print(
            json.dumps(
                [{k: v for k, v in dataclasses.asdict(i).items() if k != "config"} for i in infos],
                default=str,
            )
        )
        return 0
    print(f"{'DEPLOYMENT':<20} {'STATE':<15} {'READY':<5} {'WEIGHTS':<24} {'BACKEND':<6} BASE MODEL")
    for info in infos:
        print(_row(info))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    info = _manager(args).get(args.deployment_id)
    if info is None:
        print(f"no deployment {args.deployment_id!r}", file=sys.stderr)
        return 1
    _print_info(info, args.json)
    return 0


def cmd_hotload(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    meta = None
    if args.previous:
        meta = {
            "previous_snapshot_identity": args.previous,
            "compression_format": "rsd1",
            "checksum_format": "alder32",
        }
    mgr.hotload(args.deployment_id, "", args.snapshot, meta, path=args.bucket)
    progress = _Progress()
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            status = mgr.hotload_check_status(args.deployment_id)
            h = status["hotload"]
            progress.show(f"hot-load of {args.snapshot}: {h.get('stage')}")
            if h.get("stage") == "done" and h.get("target") == args.snapshot:
                break
            if h.get("stage") == "error":
                progress.done()
                print(f"hot-load failed at stage {h.get('failed_stage')}: {h.get('error')}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                raise SystemExit(f"hot-load not done after {args.timeout:.0f} s")
            time.sleep(0.2)
    finally:
        progress.done()
    timings = mgr.hotload_timings(args.deployment_id)
    print("loaded; " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(timings.items())))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    mgr.update(args.deployment_id, min_replica_count=args.replicas, max_replica_count=max(args.replicas, 1))
    if args.replicas:
        _print_info(_wait_ready(mgr, args.deployment_id, args.timeout), False)
    return 0


def cmd_scale_to_zero(args: argparse.Namespace) -> int:
    _manager(args).scale_to_zero(args.deployment_id)
    print(f"{args.deployment_id}: scaled to zero (config and weights kept)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _manager(args).delete(args.deployment_id)
    print(f"{args.deployment_id}: deleted")
    return 0


def _engine_model_card(url: str) -> dict[str, Any]:
    """The first model an engine serves, from its ``/v1/models``."""
    import httpx

    try:
        reply = httpx.get(url.rstrip("/") + "/v1/models", timeout=10.0)
        reply.raise_for_status()
        cards = reply.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise SystemExit(f"cannot list the models of {url}: {e}; pass --model and --tokenizer") from None
    if not cards or not isinstance(cards[0], dict):
        raise SystemExit(f"{url}/v1/models lists no model; pass --model and --tokenizer")
    return dict(cards[0])


class _ServeTarget:
    """What ``serve`` puts its endpoint in front of."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.manager: Any = None
        self.engines: Any
        model, tokenizer = args.model, args.tokenizer
        if args.deployment:
            self.manager = _manager(args)
            info = self.manager.get(args.deployment)
            if info is None:
                raise SystemExit(f"no deployment {args.deployment!r} in {self.manager.state_dir}")
            if not info.replica_urls:
                raise SystemExit(
                    f"deployment {args.deployment!r} has no READY replica ({_replicas_line(info)}); "
                    f"`rollstream deploy create {args.deployment} ...` starts it"
                )
            # The deployment itself, not its current URLs: the client follows
            # its replicas through restarts and hot-loads.
            self.engines = info
            first_url = info.replica_urls[0]
            self.described = f"deployment {args.deployment!r} ({len(info.replica_urls)} replica(s) ready)"
            model = model or info.inference_model
            if tokenizer is None and info.base_model and Path(info.base_model).is_dir():
                tokenizer = info.base_model
        else:
            self.engines = [u.rstrip("/") for u in args.engine]
            first_url = self.engines[0]
            self.described = f"{len(self.engines)} engine(s)"
        if model is None or tokenizer is None:
            card = _engine_model_card(first_url)
            model = model or card.get("id")
            root = card.get("root")
            if tokenizer is None and isinstance(root, str) and Path(root).is_dir():
                tokenizer = root
        if not model:
            raise SystemExit("no served model name: pass --model")
        if tokenizer is None:
            raise SystemExit(f"the engines' model {model!r} is not a local directory: pass --tokenizer PATH")
        self.model = str(model)
        self.tokenizer = str(tokenizer)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


async def _serve(args: argparse.Namespace, target: _ServeTarget) -> None:
    from .inference import InferenceEngineClient
    from .inference._server import DEFAULT_MAX_BODY_BYTES, OpenAIServer

    api_key = args.api_key or os.environ.get("ROLLSTREAM_SERVE_API_KEY") or None
    client = InferenceEngineClient(
        target.engines, target.tokenizer, target.model, deployment_manager=target.manager
    )
    try:
        server = OpenAIServer(
            client,
            host=args.host,
            port=args.port,
            api_key=api_key,
            allow_remote=args.allow_remote,
            max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
            close_client=True,
        )
    except BaseException:
        await client.teardown()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform
            loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        print(f"{server.url}/v1", flush=True)
        auth = ", bearer token required" if api_key else ""
        print(
            f"serving {target.model!r} from {target.described}{auth}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        await server.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    target = _ServeTarget(args)
    try:
        asyncio.run(_serve(args, target))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"rollstream: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        target.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream", description="rollstream: vLLM deployments for RL trainers")
    sub = p.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser("deploy", help="create, inspect, hot-load, scale and delete deployments")
    dsub = deploy.add_subparsers(dest="action", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=None, help="state directory (default: $ROLLSTREAM_STATE_DIR)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    c = dsub.add_parser("create", help="create (or restart) a deployment and run its replicas")
    c.add_argument("deployment_id")
    c.add_argument("--base-model", required=True, help="a local Hugging Face checkpoint directory")
    c.add_argument("--replicas", type=int, default=1)
    c.add_argument("--shape", default=None, help="deployment shape (cpu-small, gpu-8b-80gb, gpu-70b-tp8)")
    c.add_argument("--backend", choices=("local", "ray"), default="local")
    c.add_argument("--ray-address", default=None)
    c.add_argument("--bucket", default=None, help="snapshot store to hot-load from")
    c.add_argument("--extra-arg", action="append", help="an extra vLLM argument (repeatable)")
    c.add_argument("--force-recreate", action="store_true")
    c.add_argument("--detach", action="store_true", help="run the replicas in a background process")
    c.add_argument("--timeout", type=float, default=900.0)
    c.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    common(c)
    c.set_defaults(fn=cmd_create)

    ls = dsub.add_parser("list", help="every deployment in the state directory")
    common(ls)
    ls.set_defaults(fn=cmd_list)

    g = dsub.add_parser("get", help="one deployment and its replicas")
    g.add_argument("deployment_id")
    common(g)
    g.set_defaults(fn=cmd_get)

    h = dsub.add_parser("hotload", help="load a snapshot into every replica, verified")
    h.add_argument("deployment_id")
    h.add_argument("snapshot")
    h.add_argument("--previous", default=None, help="for a delta: the snapshot it was made against")
    h.add_argument("--bucket", default=None, help="snapshot store (default: the deployment's)")
    h.add_argument("--timeout", type=float, default=600.0)
    common(h)
    h.set_defaults(fn=cmd_hotload)

    s = dsub.add_parser("scale", help="set the number of replicas")
    s.add_argument("deployment_id")
    s.add_argument("replicas", type=int)
    s.add_argument("--timeout", type=float, default=900.0)
    common(s)
    s.set_defaults(fn=cmd_scale)

    z = dsub.add_parser("scale-to-zero", help="stop every replica, keep the config and weights")
    z.add_argument("deployment_id")
    common(z)
    z.set_defaults(fn=cmd_scale_to_zero)

    d = dsub.add_parser("delete", help="stop every replica and forget the deployment")
    d.add_argument("deployment_id")
    common(d)
    d.set_defaults(fn=cmd_delete)

    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions, /v1/models)",
        description="Serve OpenAI's API in front of vLLM engines; a session (the X-Session-ID header "
        "or the body's session_id) stays on one engine. Prints the API root URL on stdout; runs "
        "until Ctrl-C. Each turn's token ids, logprobs and weight versions are recorded per "
        "session: a trainer reads them at GET /rollstream/sessions/<id> and takes them with DELETE "
        "(rollstream.inference.fetch_session does both).",
    )
    target = sv.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", action="append", metavar="URL", help="a vLLM server (repeatable)")
    target.add_argument("--deployment", metavar="ID", help="the READY replicas of a deployment")
    sv.add_argument("--state-dir", default=None, help="state directory of --deployment")
    sv.add_argument("--model", default=None, help="served model name (default: the engines')")
    sv.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the engines' model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    sv.add_argument("--port", type=int, default=8100, help="port to listen on (0: any free port)")
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' (default: $ROLLSTREAM_SERVE_API_KEY)",
    )
    sv.add_argument(
        "--allow-remote", action="store_true", help="listen on a non-loopback host without an API key"
    )
    sv.add_argument("--max-body-bytes", type=int, default=None, help="request body cap (default: 16 MiB)")
    sv.set_defaults(fn=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    from ._exceptions import RollstreamError

    try:
        return int(args.fn(args))
    except (RollstreamError, ValueError, TypeError) as e:
        print(f"rollstream: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
