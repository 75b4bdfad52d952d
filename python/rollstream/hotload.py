"""Hot-loading a checkpoint into running vLLM servers.

:class:`ServerControl` speaks one server's control endpoints (vLLM's dev mode
plus rollstream's worker extension); :func:`hotload` runs the verified
sequence on one server: check, pause, reload (+ LM-head re-tie, with an
immediate fall-back to the previous weights if the load fails), reset the
prefix cache, set the weight version, verify what is served, resume. The
DeploymentManager runs the same steps on every replica of a deployment as one
transaction. The engine facts behind each step are in ``docs/ENGINE.md``
(sections 3-6).

Whatever happens, including ``KeyboardInterrupt`` and task cancellation, a
server paused here is resumed before the call returns or raises.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from ._exceptions import HotloadError
from .snapshots import safetensors_headers

__all__ = ["ServerControl", "hotload", "tensor_mismatch"]


def tensor_mismatch(
    weights: Path,
    headers: dict[str, tuple[str, tuple[int, ...]]],
    served: dict[str, tuple[str, tuple[int, ...]]],
) -> str | None:
    """Why ``weights`` (its :func:`safetensors_headers`) cannot replace the
    served checkpoint, or None when names, dtypes and shapes all agree. Used
    on the client and, through the worker extension, on the server's host."""
    if headers == served:
        return None
    diff = sorted(set(headers.items()) ^ set(served.items()))[:3]
    return (
        f"{weights} does not match the served checkpoint's tensors (names, dtypes, shapes); "
        f"first differences: {diff}"
    )


class ServerControl:
    """The control plane of one vLLM server (``VLLM_SERVER_DEV_MODE=1``) and
    of rollstream's worker extension, as blocking calls. Every failure is a
    :class:`HotloadError` naming the ``stage`` and the server."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        hdrs = dict(headers or {})
        if api_key:
            hdrs["authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=hdrs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerControl({self.url!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _request(self, stage: str, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
        # Every control call is safe to repeat; one retry covers a kept-alive
        # connection the server closed after an error response.
        t = self.timeout if timeout is None else timeout
        for attempt in range(2):
            try:
                r = self._client.request(method, path, timeout=t, **kw)
                break
            except httpx.TransportError as e:
                if attempt:
                    raise HotloadError(
                        f"{stage}: {method} {self.url}{path} failed: {e!r}", stage=stage
                    ) from e
            except httpx.HTTPError as e:
                raise HotloadError(f"{stage}: {method} {self.url}{path} failed: {e!r}", stage=stage) from e
        if r.status_code >= 300:
            raise HotloadError(
                f"{stage}: {self.url}{path} answered HTTP {r.status_code}: {r.text[:2000]}", stage=stage
            )
        try:
            return r.json()
        except ValueError:
            return r.text

    def rpc(self, stage: str, method: str, *, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """``/collective_rpc``: one result per worker."""
        t = self.timeout if timeout is None else timeout
        body = {"method": method, "kwargs": kwargs, "timeout": t}
        out = self._request(stage, "POST", "/collective_rpc", timeout=t + 5.0, json=body)
        results = out.get("results") if isinstance(out, dict) else None
        if not isinstance(results, list) or not results:
            raise HotloadError(
                f"{stage}: {self.url} gave an unexpected collective_rpc answer {str(out)[:500]}", stage=stage
            )
        return results

    def _rpc_dicts(self, stage: str, method: str, **kwargs: Any) -> list[dict[str, Any]]:
        results = self.rpc(stage, method, **kwargs)
        if not all(isinstance(r, dict) for r in results):
            raise HotloadError(f"{stage}: {method} on {self.url} answered {str(results)[:500]}", stage=stage)
        return results

    # -- state ---------------------------------------------------------------------------------

    def health(self, timeout: float = 10.0) -> bool:
        """Whether ``/health`` answers 200 (the engine core is alive)."""
        try:
            return self._client.get("/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def liveness(self, timeout: float = 5.0) -> float:
        """Seconds a round trip through the engine core's loop takes
        (``/is_paused`` is answered between engine steps, so a wedged engine
        fails here while ``/health`` still answers). Not a worker RPC: that
        would keep vLLM's idle workers spinning on their shared-memory queue
        for a second after every probe."""
        t0 = time.perf_counter()
        self._request("liveness", "GET", "/is_paused", timeout=timeout)
        return time.perf_counter() - t0

    def weight_version(self) -> str | None:
        out = self._request("verify", "GET", "/weight_info", timeout=30.0)
        return out.get("weight_version") if isinstance(out, dict) else None

    def is_paused(self) -> bool:
        out = self._request("state", "GET", "/is_paused", timeout=30.0)
        return bool(out.get("is_paused")) if isinstance(out, dict) else False

    def extension_info(self) -> dict[str, Any] | None:
        """The model facts rollstream's worker extension reports, or None
        when the server runs without it."""
        try:
            results = self.rpc("check", "rollstream_model_info", timeout=60.0)
        except HotloadError:
            return None
        return results[0] if isinstance(results[0], dict) else None

    # -- the hot-load steps --------------------------------------------------------------------

    def check_checkpoint(self, path: str) -> str:
        """The server's own verdict on ``path`` (on its host); raises
        ``HotloadError(stage="check")`` when it refuses."""
        first = self._rpc_dicts("check", "rollstream_check_checkpoint", path=path)[0]
        if not first.get("ok"):
            raise HotloadError(
                f"{self.url} refused {path}: {first.get('reason')}; nothing was changed", stage="check"
            )
        return str(first.get("reason", ""))

    def pause(self, mode: str = "keep") -> None:
        self._request("pause", "POST", "/pause", params={"mode": mode})

    def resume(self) -> None:
        self._request("resume", "POST", "/resume", timeout=60.0)

    def resume_shielded(self, attempts: int = 3) -> None:
        """:meth:`resume`, repeated when a ``KeyboardInterrupt`` (or a
        transport error) interrupts it; a pending interrupt is re-raised once
        the server is resumed."""
        pending: BaseException | None = None
        for attempt in range(attempts):
            try:
                self.resume()
                break
            except KeyboardInterrupt as e:
                pending = e
            except HotloadError:
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.5)
        if pending is not None:
            raise pending

    def reload(
        self, path: str, *, fallback: str | None, retie: bool = True, plain: bool = False
    ) -> dict[str, Any]:
        """Reload the weights in ``path`` (and re-tie the LM head). If the
        load fails, the worker reloads ``fallback`` at once and the error
        names both. ``plain``: vLLM's own ``reload_weights`` (servers without
        rollstream's worker extension; no re-tie, no fall-back)."""
        if plain:
            self.rpc("reload", "reload_weights", weights_path=path)
            return {"ok": True, "plain": True}
        results = self._rpc_dicts("reload", "rollstream_reload", path=path, fallback=fallback, retie=retie)
        bad = [r for r in results if not r.get("ok")]
        if bad:
            r = bad[0]
            restored = (
                f"; the previous weights ({r['restored']}) were reloaded"
                if r.get("restored")
                else f"; restoring the previous weights also failed: {r.get('restore_error')}"
                if fallback
                else ""
            )
            raise HotloadError(
                f"reload of {path} on {self.url} failed: {r.get('error')}{restored}", stage="reload"
            )
        return results[0]

    def reset_prefix_cache(self) -> None:
        # reset_running_requests: running requests recompute their KV with the
        # new weights instead of continuing on stale KV (docs/ENGINE.md, 3).
        self._request(
            "reset_prefix_cache", "POST", "/reset_prefix_cache", params={"reset_running_requests": "true"}
        )

    def set_weight_version(self, version: str) -> None:
        self._request(
            "update_weight_version", "POST", "/update_weight_version", json={"new_version": version}
        )

    def checkpoint_hashes(self, path: str) -> dict[str, str]:
        """Per-tensor hashes of the checkpoint at ``path``, computed on the
        server's host (before a pause, so verifying under it is cheap)."""
        first = self._rpc_dicts("check", "rollstream_checkpoint_hashes", path=path)[0]
        if first.get("error") or not isinstance(first.get("hashes"), dict):
            raise HotloadError(
                f"check: hashing {path} on {self.url} failed: {first.get('error')}; nothing was changed",
                stage="check",
            )
        return dict(first["hashes"])

    def fingerprint(self, path: str, expected: Mapping[str, str] | None = None) -> dict[str, Any]:
        """What the server computes with, compared with the checkpoint at
        ``path`` on its host (``expected``: its :meth:`checkpoint_hashes`;
        see ``docs/ENGINE.md``, section 6)."""
        kwargs: dict[str, Any] = {"path": path}
        if expected is not None:
            kwargs["expected"] = dict(expected)
        results = self._rpc_dicts("verify", "rollstream_fingerprint", **kwargs)
        for r in results:
            if r.get("error"):
                raise HotloadError(f"verify: fingerprint on {self.url} failed: {r['error']}", stage="verify")
        digests = {r.get("digest") for r in results}
        first = dict(results[0])
        if len(digests) > 1:
            first["digest"] = "workers-disagree:" + ",".join(sorted(str(d) for d in digests))
        first["mismatched"] = sum(int(r.get("mismatched", 0)) for r in results)
        return first

    def health_note(self) -> str:
        """'' when the server answers ``/health`` for a few seconds, else a
        note that the engine died (vLLM's engine core can die on a failed
        reload, a few seconds later)."""
        for _ in range(3):
            try:
                r = self._client.get("/health", timeout=10.0)
            except httpx.HTTPError as e:
                return f"; the server no longer answers /health ({e!r}): restart it"
            if r.status_code != 200:
                return f"; the server's engine is dead (/health answered HTTP {r.status_code}): restart it"
            time.sleep(1.0)
        return ""


def verify_fingerprint(report: Mapping[str, Any], url: str, version: str) -> None:
    """Raise ``HotloadError(stage="verify")`` unless every mapped served
    tensor equals the checkpoint."""
    if report.get("mismatched"):
        listed = ", ".join(
            f"{m['tensor']} (max |diff| {m['max_abs_diff']})" for m in report.get("mismatches", [])
        )
        raise HotloadError(
            f"{url} does not serve {version}: {report['mismatched']} of {report.get('checked')} tensors "
            f"differ from the checkpoint: {listed}",
            stage="verify",
        )
    if not report.get("checked"):
        raise HotloadError(f"{url}: no served tensor could be compared with {version}", stage="verify")


def _preflight(weights: Path, reference: Path | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not any(weights.glob("*.safetensors")):
        raise HotloadError(f"{weights} holds no *.safetensors files", stage="check")
    headers = safetensors_headers(weights)
    if reference is not None:
        problem = tensor_mismatch(weights, headers, safetensors_headers(reference))
        if problem:
            raise HotloadError(
                f"{problem}. Reloading it could break the engine; nothing was changed", stage="check"
            )
    return headers


def hotload(
    server_url: str,
    snapshot_dir: str | os.PathLike[str],
    version: str,
    *,
    timeout: float = 600.0,
    retie_embeddings: bool | None = None,
    reference_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    verify: bool = True,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load the full checkpoint in ``snapshot_dir`` into a running vLLM server.

    The sequence verified on vLLM 0.32 (``docs/ENGINE.md``, section 3):
    pause (keep: requests freeze in place), reload, re-tie the LM head,
    reset the prefix cache (running requests recompute their KV), set the
    weight version, verify, resume. The server is resumed on every path,
    including interruption; a failure raises :class:`HotloadError` naming
    the stage.

    ``snapshot_dir`` is a path *on the server's host*. vLLM 0.32's engine
    dies on a reload of a missing checkpoint or one that does not fit the
    model, so nothing is paused before it is checked: an unreachable or
    unhealthy server is refused; when the path also exists locally its
    headers are read (with ``reference_dir``, compared with the served
    checkpoint's tensor names, dtypes and shapes); and rollstream's worker
    extension checks the path on the server's own host. If the load itself
    fails, the worker reloads ``fallback_dir`` (default: the checkpoint the
    server served before) while the server is still paused.

    ``verify`` compares, tensor by tensor, what the server computes with
    against the checkpoint (``docs/ENGINE.md``, section 6); on a mismatch the
    previous weights are reloaded and :class:`HotloadError` (stage
    ``"verify"``) lists the tensors. ``retie_embeddings=False`` skips the
    LM-head re-tie (vLLM 0.32 then serves a stale head for tied models,
    which ``verify`` reports). The server needs
    ``--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension``
    for the check, the re-tie and the verification (``LocalVLLM`` and the
    DeploymentManager add it); without it, a tied model is refused before
    anything is touched.
    """
    weights = Path(snapshot_dir)
    if not version:
        raise ValueError("version must be a non-empty string")
    local = weights.is_dir()
    headers = _preflight(weights, Path(reference_dir) if reference_dir else None) if local else None
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with ServerControl(server_url, api_key=api_key, timeout=timeout) as server:
        if not server.health(timeout=min(timeout, 30.0)):
            raise HotloadError(
                f"server {server_url} is unreachable or unhealthy (/health); nothing was changed",
                stage="check",
            )
        info = server.extension_info()
        tied = retie_embeddings
        if tied is None:
            if info is not None:
                tied = bool(info.get("tie_word_embeddings"))
            elif headers is not None:
                names = set(headers)
                tied = any(n.endswith("embed_tokens.weight") for n in names) and not any(
                    n.endswith("lm_head.weight") for n in names
                )
            else:
                tied = True  # unknown: assume the dangerous case
        if info is None and (tied or verify):
            raise HotloadError(
                "the server lacks rollstream's worker extension, needed to check the checkpoint on its "
                "host, re-tie a tied LM head (vLLM 0.32 leaves it stale) and verify what is served. "
                "Start vLLM with --worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension "
                "(or pass retie_embeddings=False, verify=False to accept the risk). Nothing was changed",
                stage="check",
            )
        report: dict[str, Any] = {"version": version}
        target = str(weights.resolve()) if local else str(weights)
        fallback = str(fallback_dir) if fallback_dir is not None else (info or {}).get("model_path")
        expected = None
        if info is not None:
            report["check"] = server.check_checkpoint(target)
            if verify:
                expected = server.checkpoint_hashes(target)
        timings["check_s"] = time.perf_counter() - t0
        failure: BaseException | None = None
        try:
            t = time.perf_counter()
            server.pause("keep")
            timings["pause_s"] = time.perf_counter() - t
            t = time.perf_counter()
            report["reload"] = server.reload(
                target, fallback=fallback, retie=retie_embeddings is not False, plain=info is None
            )
            timings["reload_s"] = time.perf_counter() - t
            t = time.perf_counter()
            server.reset_prefix_cache()
            if verify:
                fp = server.fingerprint(target, expected)
                report["fingerprint"] = fp
                try:
                    verify_fingerprint(fp, server_url, version)
                except HotloadError as e:
                    if fallback:
                        with contextlib.suppress(HotloadError):
                            server.reload(fallback, fallback=None)
                            server.reset_prefix_cache()
                        raise HotloadError(f"{e}; the previous weights were reloaded", stage="verify") from e
                    raise
            server.set_weight_version(version)
            timings["verify_s"] = time.perf_counter() - t
        except BaseException as e:
            failure = e
            raise
        finally:
            # Resume on every path (KeyboardInterrupt and cancellation included,
            # even one that lands between two statements), without hiding the
            # original failure. Resuming a server that is not paused is harmless.
            t = time.perf_counter()
            try:
                server.resume_shielded()
            except HotloadError as r:
                if failure is None:
                    raise
                raise HotloadError(
                    f"{failure}; resuming the server also failed: {r}{server.health_note()}",
                    stage=getattr(failure, "stage", None),
                ) from failure
            timings["resume_s"] = time.perf_counter() - t
            if isinstance(failure, HotloadError):
                note = server.health_note()
                if note:
                    raise HotloadError(f"{failure}{note}", stage=failure.stage) from failure
        served = server.weight_version()
        if served != version:
            raise HotloadError(f"server reports weight version {served!r}, not {version!r}", stage="verify")
    report["timings"] = timings
    report["seconds"] = time.perf_counter() - t0
    return report
