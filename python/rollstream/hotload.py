"""Hot-loading a checkpoint into a running vLLM server: the verified
sequence (check, pause, reload, re-tie, reset prefix cache, set version,
resume), the facts it relies on in ``docs/ENGINE.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from ._exceptions import HotloadError
from .snapshots import safetensors_headers

__all__ = ["hotload", "tensor_mismatch"]


def _post(client: httpx.Client, stage: str, path: str, **kw: Any) -> Any:
    # Every control call of the sequence is safe to repeat; one retry covers a
    # kept-alive connection the server closed after an error response.
    for attempt in range(2):
        try:
            r = client.post(path, **kw)
            break
        except httpx.TransportError as e:
            if attempt:
                raise HotloadError(f"{stage}: request to {path} failed: {e!r}", stage=stage) from e
        except httpx.HTTPError as e:
            raise HotloadError(f"{stage}: request to {path} failed: {e!r}", stage=stage) from e
    if r.status_code >= 300:
        raise HotloadError(f"{stage}: {path} answered HTTP {r.status_code}: {r.text[:2000]}", stage=stage)
    try:
        return r.json()
    except ValueError:
        return r.text


def _rpc(client: httpx.Client, stage: str, method: str, timeout: float, **kwargs: Any) -> list[Any]:
    body = {"method": method, "kwargs": kwargs, "timeout": timeout}
    out = _post(client, stage, "/collective_rpc", json=body)
    results = out.get("results") if isinstance(out, dict) else None
    if not isinstance(results, list):
        raise HotloadError(f"{stage}: unexpected collective_rpc answer {str(out)[:500]}", stage=stage)
    return results


def _extension_info(client: httpx.Client, timeout: float) -> dict[str, Any] | None:
    """The model facts rollstream's worker extension reports, or None when
    the server runs without it."""
    try:
        results = _rpc(client, "check", "rollstream_model_info", timeout)
    except HotloadError:
        return None
    return results[0] if results and isinstance(results[0], dict) else None


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


def _health_note(client: httpx.Client) -> str:
    """'' when the server answers /health, else a note that the engine died
    (vLLM's engine core can die on a failed reload, a few seconds later)."""
    for _ in range(5):
        try:
            r = client.get("/health", timeout=10.0)
        except httpx.HTTPError as e:
            return f"; the server no longer answers /health ({e!r}): restart it"
        if r.status_code != 200:
            return f"; the server's engine is dead (/health answered HTTP {r.status_code}): restart it"
        time.sleep(1.0)
    return ""


def hotload(
    server_url: str,
    snapshot_dir: str | os.PathLike[str],
    version: str,
    *,
    timeout: float = 600.0,
    retie_embeddings: bool | None = None,
    reference_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Load the full checkpoint in ``snapshot_dir`` into a running vLLM server.

    The sequence verified on vLLM 0.32: pause (keep: requests freeze in
    place), ``reload_weights``, re-tie the LM head to the embeddings (see
    below), reset the prefix cache (preempting running requests so stale KV
    is recomputed), set the weight version, resume. The server is resumed
    whatever happens; a failure raises :class:`HotloadError` naming the stage.

    ``snapshot_dir`` is a path *on the server's host*. vLLM 0.32's engine
    dies on a ``reload_weights`` of a missing checkpoint or one that does not
    fit the model, so nothing is paused before it is checked: an unreachable
    or unhealthy server is refused; when the path also exists locally its
    safetensors headers are read (with ``reference_dir``, compared with the
    served checkpoint's tensor names, dtypes and shapes); and rollstream's
    worker extension checks the path on the server's own host against the
    checkpoint it serves. A failure after the pause resumes the server and,
    when the engine died anyway, says so (restart the server).

    vLLM 0.32 reloads a tied-embedding model's embeddings but leaves its LM
    head on the old weights, silently. ``retie_embeddings`` (default: when
    the model ties them) re-ties it through rollstream's worker extension;
    the server must run with
    ``--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension``
    (``LocalVLLM`` adds it). Without it the hot-load of a tied model is
    refused *before* touching the server.
    """
    weights = Path(snapshot_dir)
    if not version:
        raise ValueError("version must be a non-empty string")
    local = weights.is_dir()
    headers = _preflight(weights, Path(reference_dir) if reference_dir else None) if local else None
    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.perf_counter()
    with httpx.Client(base_url=server_url.rstrip("/"), timeout=timeout, headers=auth) as client:
        try:
            health = client.get("/health", timeout=min(timeout, 30.0))
        except httpx.HTTPError as e:
            raise HotloadError(
                f"server {server_url} is unreachable ({e!r}); nothing was changed", stage="check"
            ) from e
        if health.status_code != 200:
            raise HotloadError(
                f"server {server_url} is unhealthy (/health answered HTTP {health.status_code}); "
                "nothing was changed",
                stage="check",
            )
        info = _extension_info(client, timeout)
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
        if tied and info is None:
            raise HotloadError(
                "this model ties its LM head to the embeddings, and vLLM 0.32's reload_weights leaves the "
                "head stale; the server lacks rollstream's worker extension to re-tie it. Start vLLM with "
                "--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension (or pass "
                "retie_embeddings=False to accept a stale head). Nothing was changed",
                stage="check",
            )
        report: dict[str, Any] = {"version": version}
        target = str(weights.resolve()) if local else str(weights)
        if info is not None:
            # The server checks the path on its own host: a reload of a missing
            # or mismatched checkpoint kills vLLM 0.32's engine.
            verdict = _rpc(client, "check", "rollstream_check_checkpoint", timeout, path=target)
            first = verdict[0] if verdict and isinstance(verdict[0], dict) else {}
            if not first.get("ok"):
                raise HotloadError(
                    f"server refused {target}: {first.get('reason', verdict)}; nothing was changed",
                    stage="check",
                )
            report["check"] = first.get("reason")
        _post(client, "pause", "/pause", params={"mode": "keep"})
        try:
            _rpc(client, "reload", "reload_weights", timeout, weights_path=target)
            if tied:
                report["retie"] = _rpc(client, "retie", "rollstream_retie_embeddings", timeout)
            _post(
                client, "reset_prefix_cache", "/reset_prefix_cache", params={"reset_running_requests": "true"}
            )
            _post(client, "update_weight_version", "/update_weight_version", json={"new_version": version})
        except HotloadError as e:
            # Resume whatever happened, without hiding the original failure.
            try:
                _post(client, "resume", "/resume")
            except HotloadError as r:
                raise HotloadError(
                    f"{e}; resuming the server also failed: {r}{_health_note(client)}", stage=e.stage
                ) from e
            note = _health_note(client)
            if note:
                raise HotloadError(f"{e}{note}", stage=e.stage) from e
            raise
        _post(client, "resume", "/resume")
        served = client.get("/weight_info").json().get("weight_version")
        if served != version:
            raise HotloadError(f"server reports weight version {served!r}, not {version!r}", stage="verify")
    report["seconds"] = time.perf_counter() - t0
    return report
