"""A sampling call's arguments, checked once.

Three kinds of keyword arguments reach ``sample_with_*``:

- rollstream's (``logprobs``, ``top_logprobs``, ``echo``, ``top_p``,
  ``top_k``, ``min_p``, ``seed``, ``sampling_mask``, ``session``);
- the Fireworks SDK's per-call arguments, honoured with its meaning and
  never sent to the server: ``prompt_cache_key`` (session affinity: the
  endpoint pool's ``session``), ``http_timeout`` (longest wait for the
  server within an attempt), ``additional_headers_snapshot`` (this call's
  headers instead of the sampler's), ``include_routing_matrix``,
  ``prompt_cache_max_len``, ``echo_last``, ``sampling_context``,
  ``timeout_diagnostic_context``, ``r3_ttl_seconds``;
- anything else, sent to vLLM verbatim (``ignore_eos``,
  ``repetition_penalty``, ...).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._endpoints import SampleParams, sample_seed
from ._exceptions import clean_context

__all__ = ["CallOptions"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_mapping(name: str, value: Any) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise TypeError(f"{name} must be a mapping (dict) or None, got {type(value).__name__}")


def _split_stop(stop: Sequence[str | int] | str | int | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stops = [stop] if isinstance(stop, (str, int)) else list(stop or ())
    strings = tuple(s for s in stops if isinstance(s, str))
    ids = tuple(int(s) for s in stops if _is_int(s))
    if len(strings) + len(ids) != len(stops):
        raise TypeError(f"stop entries must be str or int, got {stop!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"stop token ids must be >= 0, got {stop!r}")
    return strings, ids


@dataclass(frozen=True)
class CallOptions:
    max_tokens: int
    temperature: float
    max_seq_len: int | None
    top_p: float
    top_k: int
    min_p: float
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    echo: bool
    echo_last: int | None
    sampling_mask: bool
    session: str | None
    headers_snapshot: Mapping[str, str] | None
    http_timeout: float | None
    include_routing_matrix: bool
    prompt_cache_max_len: int | None
    context: Mapping[str, Any]
    diagnostic_context: Mapping[str, Any] | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        *,
        max_tokens: int,
        temperature: float,
        max_seq_len: int | None,
        stop: Sequence[str | int] | str | int | None,
        prompt_cache_key: str | None,
        additional_headers_snapshot: Mapping[str, str] | None,
        request_context: Mapping[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> CallOptions:
        kw = dict(kwargs)
        if not _is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        top_p = kw.pop("top_p", None)
        top_k = kw.pop("top_k", None)
        min_p = kw.pop("min_p", None)
        top_logprobs = kw.pop("top_logprobs", 0) or 0
        if not _is_int(top_logprobs) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an int >= 0, got {top_logprobs!r}")
        echo_last = kw.pop("echo_last", None)
        if echo_last is not None and (not _is_int(echo_last) or echo_last < 0):
            raise ValueError(f"echo_last must be a non-negative int, got {echo_last!r}")
        http_timeout = kw.pop("http_timeout", None)
        if http_timeout is not None and not (
            isinstance(http_timeout, (int, float))
            and not isinstance(http_timeout, bool)
            and math.isfinite(http_timeout)
            and http_timeout > 0
        ):
            raise ValueError(f"http_timeout={http_timeout!r} must be a positive number of seconds")
        cache_max = kw.pop("prompt_cache_max_len", None)
        if cache_max is not None and (not _is_int(cache_max) or cache_max < 0):
            raise ValueError(f"prompt_cache_max_len must be a non-negative int, got {cache_max!r}")
        r3_ttl = kw.pop("r3_ttl_seconds", None)
        if r3_ttl is not None and (not _is_int(r3_ttl) or r3_ttl <= 0):
            raise ValueError(f"r3_ttl_seconds must be a positive int, got {r3_ttl!r}")
        if "routing_matrix_format" in kw:
            raise ValueError(
                "routing_matrix_format is not supported: rollstream returns routing matrices inline "
                "(include_routing_matrix=True)"
            )
        seed = kw.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        session = kw.pop("session", None)
        if session is None:
            session = prompt_cache_key
        if session is not None and not isinstance(session, str):
            raise TypeError(f"prompt_cache_key/session must be a str, got {type(session).__name__}")
        sampling_context = _opt_mapping("sampling_context", kw.pop("sampling_context", None))
        context = {**clean_context(request_context), **clean_context(sampling_context)}
        stop_strings, stop_ids = _split_stop(stop)
        opts = cls(
            max_tokens=max_tokens,
            temperature=float(temperature),
            max_seq_len=max_seq_len,
            # Explicit: server-side generation_config defaults must not leak in.
            top_p=1.0 if top_p is None else float(top_p),
            top_k=0 if top_k is None else int(top_k),
            min_p=0.0 if min_p is None else float(min_p),
            stop=stop_strings,
            stop_token_ids=stop_ids,
            seed=seed,
            logprobs=bool(kw.pop("logprobs", False)),
            top_logprobs=top_logprobs,
            echo=bool(kw.pop("echo", False)),
            echo_last=echo_last,
            sampling_mask=bool(kw.pop("sampling_mask", False)),
            session=session,
            headers_snapshot=_opt_mapping("additional_headers_snapshot", additional_headers_snapshot),
            http_timeout=None if http_timeout is None else float(http_timeout),
            include_routing_matrix=bool(kw.pop("include_routing_matrix", False)),
            prompt_cache_max_len=cache_max,
            context=context,
            diagnostic_context=_opt_mapping(
                "timeout_diagnostic_context", kw.pop("timeout_diagnostic_context", None)
            ),
            extra=kw,
        )
        if opts.sampling_mask and (
            opts.temperature == 0 or (opts.top_k in (0, -1) and opts.top_p >= 1.0 and opts.min_p <= 0.0)
        ):
            raise ValueError(
                "sampling_mask=True needs truncated sampling (temperature > 0 with top_k or top_p): "
                "without truncation the support is the whole vocabulary and there is no mask to apply"
            )
        return opts

    @property
    def echo_wanted(self) -> bool:
        """Prompt logprobs are wanted (``echo=True`` or ``echo_last > 0``)."""
        return self.echo or bool(self.echo_last)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0 or self.echo_wanted

    def echo_count(self, prompt_len: int) -> int | None:
        if self.echo_last is not None:
            return min(self.echo_last, prompt_len)
        return prompt_len if self.echo else None

    @property
    def full_distribution(self) -> bool:
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k in (0, -1) and self.min_p <= 0.0

    def clamped(self, prompt_len: int) -> tuple[CallOptions, bool]:
        """With ``max_tokens`` clamped so prompt + completion fit ``max_seq_len``."""
        if self.max_seq_len is None or self.max_tokens <= self.max_seq_len - prompt_len:
            return self, False
        from dataclasses import replace

        return replace(self, max_tokens=self.max_seq_len - prompt_len), True

    def params(self, prompt_len: int, index: int) -> SampleParams:
        """The request of sample ``index``."""
        salt = None
        if self.prompt_cache_max_len is not None and self.prompt_cache_max_len < prompt_len:
            # vLLM cannot cap the reused prefix at N tokens: reuse none of it.
            salt = uuid.uuid4().hex
        return SampleParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            seed=None if self.seed is None else sample_seed(self.seed, index),
            logprobs=self.want_logprobs,
            top_logprobs=self.top_logprobs,
            prompt_logprobs=self.echo_wanted,
            cache_salt=salt,
            extra=self.extra,
        )
