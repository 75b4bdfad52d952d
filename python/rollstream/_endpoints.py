"""Request bodies per vLLM endpoint.

- ``completions``: ``POST /v1/completions`` (per-request queue metrics for
  AIMD with ``--enable-per-request-metrics``; echoed prompt logprobs);
- ``generate``: ``POST /inference/v1/generate`` (``--enable-scale-out``:
  weight versions, native sampling masks and routed experts while streaming).

Both stream, return token ids, and send every sampling parameter explicitly
so the server's ``generation_config`` defaults never leak into rollouts.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENDPOINTS", "Endpoint", "SampleParams", "encode", "sample_seed"]

_MASK63 = (1 << 63) - 1


def _mix63(x: int) -> int:
    """A bijection of [0, 2**63): xor-shifts and multiplications by odd
    constants, each invertible modulo 2**63 (splitmix64's finaliser)."""
    x &= _MASK63
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK63
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK63
    x ^= x >> 31
    return x


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a call with ``seed``.

    Distinct ``(seed, index)`` pairs give distinct seeds, so two calls with
    different seeds never share a sample (``seed + i`` made ``seed=0`` and
    ``seed=1`` share n-1 of them), and the same call is reproducible. For
    ``0 <= seed < 2**32`` and ``0 <= index < 2**31`` the map is injective
    (the pair is packed into 63 bits, then mixed by a bijection); other
    seeds are hashed (BLAKE2b) into the same range. Results lie in
    ``[0, 2**63)``, the range vLLM accepts.
    """
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {seed!r}") from None
    if 0 <= seed < 1 << 32 and 0 <= index < 1 << 31:
        return _mix63((seed << 31) | index)
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return _mix63(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class SampleParams:
    """One sample's request, independent of the endpoint."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    #: Logprobs of the sampled tokens.
    logprobs: bool = False
    #: Candidates per position (0: only the sampled token).
    top_logprobs: int = 0
    #: Logprobs of the prompt tokens too (echo).
    prompt_logprobs: bool = False
    #: vLLM's per-request prefix-cache salt (no prefix reuse across salts).
    cache_salt: str | None = None
    #: Other arguments, sent verbatim.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def sampling_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
        }
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class Endpoint:
    """How one vLLM endpoint wants its requests."""

    name: str
    path: str
    #: Whether prompt logprobs (echo) come back in a form rollstream decodes.
    supports_prompt_logprobs: bool

    def body(self, model: str, prompt: list[int], p: SampleParams) -> dict[str, Any]:
        raise NotImplementedError

    def with_mask_key(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        """``body`` asking rollstream's worker extension to capture the
        sampling mask under ``key``."""
        raise NotImplementedError


class _Completions(Endpoint):
    name = "completions"
    path = "/v1/completions"
    supports_prompt_logprobs = True

    def body(self, model: str, prompt: list[int], p: SampleParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            **p.sampling_fields(),
        }
        if p.logprobs or p.prompt_logprobs:
            body["logprobs"] = p.top_logprobs
            # Candidates as "token_id:N" strings: decoded to ids in Rust.
            body["return_tokens_as_token_ids"] = True
        if p.prompt_logprobs:
            body["echo"] = True
        if p.cache_salt is not None:
            body["cache_salt"] = p.cache_salt
        body.update(p.extra)
        return body

    def with_mask_key(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        return {**body, "vllm_xargs": {**body.get("vllm_xargs", {}), "rollstream_mask_id": key}}


class _Generate(Endpoint):
    name = "generate"
    path = "/inference/v1/generate"
    # vLLM streams prompt logprobs there in a form the decoder does not read yet.
    supports_prompt_logprobs = False
    _TOP_LEVEL = frozenset({"request_id", "cache_salt", "priority", "model"})

    def body(self, model: str, prompt: list[int], p: SampleParams) -> dict[str, Any]:
        sp = p.sampling_fields()
        if p.logprobs:
            sp["logprobs"] = p.top_logprobs
        body: dict[str, Any] = {
            "model": model,
            "token_ids": prompt,
            "sampling_params": sp,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.cache_salt is not None:
            body["cache_salt"] = p.cache_salt
        for k, v in p.extra.items():
            if k in self._TOP_LEVEL:
                body[k] = v
            else:
                sp[k] = v
        return body

    def with_mask_key(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        sp = dict(body["sampling_params"])
        sp["extra_args"] = {**(sp.get("extra_args") or {}), "rollstream_mask_id": key}
        return {**body, "sampling_params": sp}


ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (_Completions(), _Generate())}


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
