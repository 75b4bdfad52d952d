"""InferenceEngineClient: many vLLM servers as one engine, for trainers and
agent harnesses (SkyRL's names and semantics).

The data path is rollstream's sampler: every request is a streaming request
decoded in Rust, routed client-side by the Rust router (sticky least-loaded
sessions, least-outstanding otherwise), so no router process sits between
the trainer and the engines. What the client adds:

- batches split across engines and recombined in input order (``generate``,
  ``completion`` with several prompts, ``n`` samples);
- failover: an engine that stops answering is taken out of rotation, probed
  until ``/health`` answers again, its sessions move and its requests are
  retried on the others; an error only when no engine is left;
- pause and weight updates: ``keep`` mode freezes running requests in place
  on every engine (confirmed on every engine before any weight changes) and
  holds new admissions in the client; ``abort`` mode makes the engines
  return what they had generated, and the sampler continues each request
  from its tokens so far (prompt + tokens, ``max_tokens`` reduced): no token
  lost or generated twice, logprobs aligned, the weight version of every
  token recorded, the text decoded from the ids;
- staleness: ``max_staleness`` paces admissions so that no rollout is
  consumed more than that many weight versions after it was admitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

import httpx

from .._exceptions import EngineUnavailableError, HotloadError
from .._http import LoopLocal, close_clients, ssl_context
from .._models import SampledCompletion
from ..concurrency import FixedConcurrencyController
from ..routing import EnginePool
from ..sampler import DeploymentSampler, RetryPolicy, SamplerTimeouts
from ..tokenizer import ChatTokenizer
from ._admission import FailoverPool, Staleness
from ._openai import (
    CHAT_OWN,
    COMPLETION_OWN,
    chat_response,
    completion_response,
    n_of,
    prompt_batch,
    request_body,
    sampling_params,
)
from ._types import InferenceEngineInput, InferenceEngineInterface, InferenceEngineOutput

__all__ = ["InferenceEngineClient"]

log = logging.getLogger("rollstream.inference")

PauseMode = Literal["keep", "abort"]


class InferenceEngineClient(InferenceEngineInterface):
    """Several vLLM servers behind SkyRL's engine interface.

    ``engines``: base URLs (``"http://host:8000"``), a
    :class:`~rollstream.deployment.DeploymentInfo` together with
    ``deployment_manager=`` (its replicas, resolved client-side, with the
    manager's verified hot-load for weight updates), an
    :class:`~rollstream.routing.EnginePool`, or objects implementing
    :class:`InferenceEngineInterface` (then every call is delegated to them,
    a batch split across them). ``tokenizer`` renders chats and decodes ids
    (a :class:`~rollstream.ChatTokenizer`, a model path, or a transformers
    tokenizer); ``model_name`` is the served model name.

    ``pause_mode`` is what :meth:`pause_generation` does by default
    (``"keep"``: running requests freeze in place; ``"abort"``: they come
    back and are continued after the resume). ``endpoint="generate"``
    (default) reports weight versions per token; ``"completions"`` reports
    per-request queue metrics. ``max_staleness`` with
    ``staleness_batch_size`` paces admissions (see :meth:`admit`).
    An engine that stops answering leaves rotation until its ``/health``
    answers (probed every ``probe_interval`` s); when every engine is down,
    requests fail with :class:`~rollstream.EngineUnavailableError` after
    ``down_timeout`` seconds (a deployment's requests wait for its manager
    to restart replicas).
    """

    def __init__(
        self,
        engines: Any,
        tokenizer: ChatTokenizer | Any = None,
        model_name: str | None = None,
        *,
        deployment_manager: Any = None,
        api_key: str | None = None,
        endpoint: Literal["generate", "completions"] = "generate",
        pause_mode: PauseMode = "keep",
        max_staleness: int | None = None,
        staleness_batch_size: int | None = None,
        concurrency_controller: Any = None,
        timeout: SamplerTimeouts | float | None = None,
        retry: RetryPolicy | None = None,
        probe_interval: float = 0.5,
        down_timeout: float | None = 30.0,
        tp_size: int = 1,
        pp_size: int = 1,
    ) -> None:
        if pause_mode not in ("keep", "abort"):
            raise ValueError(f"pause_mode must be 'keep' or 'abort', got {pause_mode!r}")
        self._delegates: list[InferenceEngineInterface] = []
        self._manager = deployment_manager
        self._deployment_id: str | None = None
        self._base_model: str | None = None
        pool = self._resolve(engines, deployment_manager)
        if self._delegates:
            self.model_name = model_name or ""
        elif not model_name:
            raise ValueError("model_name (the served model name) is required")
        else:
            self.model_name = model_name
        self.tokenizer: ChatTokenizer | None = (
            ChatTokenizer.coerce(tokenizer) if tokenizer is not None else None
        )
        self.pause_mode: PauseMode = pause_mode
        self._api_key = api_key
        self._tp, self._pp = _positive("tp_size", tp_size), _positive("pp_size", pp_size)
        self._pool: EnginePool | None = pool
        self._staleness: Staleness | None = None
        if max_staleness is not None:
            if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
                raise ValueError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
            if staleness_batch_size is None:
                raise ValueError("max_staleness needs staleness_batch_size (rollouts trained per version)")
            self._staleness = Staleness(
                max_staleness, _positive("staleness_batch_size", staleness_batch_size)
            )
        self._paused = False
        self._version_counter = 0
        # Control calls (pause, resume...): one client per event loop, built
        # once (building one costs tens of milliseconds: the resume path).
        self._http: LoopLocal[httpx.AsyncClient] = LoopLocal(
            lambda: httpx.AsyncClient(
                timeout=60.0, verify=ssl_context(), limits=httpx.Limits(max_keepalive_connections=0)
            )
        )
        self._samplers: dict[str, DeploymentSampler] = {}
        if pool is not None:
            # A deployment's manager restarts its replicas: wait for them.
            wait_down = None if self._deployment_id is not None else down_timeout
            self._failover = FailoverPool(pool, probe_interval, wait_down)
            common: dict[str, Any] = {
                "api_key": api_key,
                "tokenizer": self.tokenizer,
                "concurrency_controller": concurrency_controller
                if concurrency_controller is not None
                else FixedConcurrencyController(max(256, 64 * max(1, len(pool)))),
                "timeout": timeout,
                "retry": retry,
                "pool": self._failover,
            }
            self._sampler = DeploymentSampler(
                self._sampler_label(), self.model_name, endpoint=endpoint, **common
            )
            self._samplers[endpoint] = self._sampler
            self._common = common

    # -- engines ----------------------------------------------------------------------------

    def _resolve(self, engines: Any, manager: Any) -> EnginePool | None:
        if isinstance(engines, EnginePool):
            return engines
        if isinstance(engines, str):
            engines = [engines]
        if manager is not None or type(engines).__name__ == "DeploymentInfo":
            if manager is None:
                raise ValueError("a DeploymentInfo needs deployment_manager= (the manager that owns it)")
            deployment_id = getattr(engines, "deployment_id", engines)
            info = manager.get(deployment_id)
            if info is None:
                raise ValueError(f"deployment {deployment_id!r} does not exist under {manager!r}")
            from .._pool import pool_for

            self._deployment_id = info.deployment_id
            self._base_model = info.base_model
            pool = pool_for(manager.inference_url, info.inference_model)
            assert isinstance(pool, EnginePool)
            return pool
        if isinstance(engines, Sequence) and engines and all(isinstance(e, str) for e in engines):
            return EnginePool(engines, name="InferenceEngineClient")
        if (
            isinstance(engines, Sequence)
            and engines
            and all(isinstance(e, InferenceEngineInterface) for e in engines)
        ):
            self._delegates = list(engines)
            return None
        raise TypeError(
            "engines must be base URLs, a DeploymentInfo with deployment_manager=, an EnginePool, or "
            f"InferenceEngineInterface objects; got {engines!r}"
        )

    @property
    def engine_urls(self) -> list[str]:
        return self._pool.urls if self._pool is not None else []

    def add_engine(self, url: str) -> None:
        """Put an engine into rotation (at runtime; new sessions may go there)."""
        self._need_pool().add(url)

    def remove_engine(self, url: str) -> None:
        """Take an engine out; its sessions move on their next request."""
        self._need_pool().remove(url)

    def finish_session(self, session_id: str | int) -> bool:
        """Release a session's engine binding."""
        return self._need_pool().finish_session(str(session_id))

    def session_engine(self, session_id: str | int) -> str | None:
        return self._need_pool().session_engine(str(session_id))

    def _need_pool(self) -> EnginePool:
        if self._pool is None:
            raise TypeError("this client delegates to engine objects; it has no engine URLs")
        return self._pool

    @property
    def metrics(self) -> Any:
        """The sampler's counters (requests, samples, retries, continued tokens...)."""
        self._need_pool()
        return self._sampler.metrics

    def _sampler_label(self) -> str:
        # The samplers route through the pool; their URL only names them in reprs.
        urls = self._need_pool().urls
        return urls[0] if urls else "http://engines.invalid"

    def _sampler_for(self, endpoint: Literal["generate", "completions"]) -> DeploymentSampler:
        s = self._samplers.get(endpoint)
        if s is None:
            s = DeploymentSampler(self._sampler_label(), self.model_name, endpoint=endpoint, **self._common)
            self._samplers[endpoint] = s
        return s

    # -- SkyRL's interface -------------------------------------------------------------------

    async def generate(self, input_batch: InferenceEngineInput) -> InferenceEngineOutput:
        """One completion per prompt, outputs in input order. ``prompts``
        (chats) or ``prompt_token_ids``, exactly one."""
        prompts = input_batch.get("prompts")
        ids = input_batch.get("prompt_token_ids")
        if (prompts is None) == (ids is None):
            raise ValueError(
                "InferenceEngineInput needs exactly one of 'prompts' and 'prompt_token_ids' "
                f"(got {'both' if prompts is not None else 'neither'})"
            )
        if self._delegates:
            return await self._delegate_generate(input_batch)
        token_ids = self._render(prompts) if prompts is not None else [list(p) for p in ids or []]
        sessions = input_batch.get("session_ids") or [None] * len(token_ids)
        if len(sessions) != len(token_ids):
            raise ValueError(f"session_ids has {len(sessions)} entries for {len(token_ids)} prompts")
        params = dict(input_batch.get("sampling_params") or {})
        results = await asyncio.gather(
            *(self._one(p, 1, params, s) for p, s in zip(token_ids, sessions, strict=True))
        )
        return _output([c for r in results for c in r], self._want_logprobs(params))

    async def sample(
        self,
        prompt_token_ids: list[int],
        num_samples: int,
        sampling_params: dict[str, Any] | None = None,
        session_id: str | int | None = None,
    ) -> InferenceEngineOutput:
        """``num_samples`` independent completions of one prompt (spread over
        the engines unless ``session_id`` pins them to one)."""
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if self._delegates:
            return await self._delegates[0].sample(prompt_token_ids, num_samples, sampling_params, session_id)
        params = dict(sampling_params or {})
        completions = await self._one(list(prompt_token_ids), num_samples, params, session_id)
        return _output(completions, self._want_logprobs(params))

    async def sample_completions(
        self,
        prompt_token_ids: Sequence[int],
        num_samples: int = 1,
        sampling_params: Mapping[str, Any] | None = None,
        session_id: str | int | None = None,
        *,
        admitted: bool = False,
    ) -> list[SampledCompletion]:
        """Like :meth:`sample`, returning rollstream's full
        :class:`~rollstream.SampledCompletion` objects. ``admitted=True``:
        the caller already holds an admission (:meth:`admit`) for this
        rollout (the later turns of a multi-turn rollout)."""
        return await self._one(
            list(prompt_token_ids), num_samples, dict(sampling_params or {}), session_id, admitted=admitted
        )

    async def chat_completion(self, request_payload: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` for an OpenAI request body.

        The chat is rendered with the chat template client-side (``tools``
        and ``chat_template_kwargs`` included) and sampled as token ids, so
        every turn's ids are exactly the engine's. Beside OpenAI's fields the
        response carries ``prompt_token_ids`` and, per choice, ``token_ids``,
        ``token_logprobs`` and ``weight_versions``. Unknown fields go to vLLM
        verbatim; ``session_id`` keeps a conversation on one engine."""
        if self._delegates:
            return await self._delegates[0].chat_completion(request_payload)
        body = request_body(request_payload)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("chat_completion needs 'messages': a non-empty list of messages")
        self._check_model(body)
        tok = self._need_tokenizer("chat_completion")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"'chat_template_kwargs' must be an object, got {kwargs!r}")
        prompt = tok.apply_chat_template(
            messages, tools=body.get("tools"), add_generation_prompt=True, tokenize=True, **dict(kwargs)
        )
        params = sampling_params(body, CHAT_OWN, chat=True)
        completions = await self._one(prompt, n_of(body), params, body.get("session_id"))
        tools = bool(body.get("tools"))
        return chat_response(
            self.model_name, prompt, completions, self._token_text, self._want_logprobs(params), tools=tools
        )

    async def completion(self, request_payload: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI ``text_completion``. ``prompt`` is a string, token ids,
        or a batch of either: the batch is spread over the engines and the
        choices come back in order (index ``prompt * n + sample``), usage
        summed; one failed sub-request fails the call with the engine's
        message."""
        if self._delegates:
            return await self._delegates[0].completion(request_payload)
        body = request_body(request_payload)
        self._check_model(body)
        prompts = prompt_batch(body.get("prompt"))
        token_prompts = [
            p if isinstance(p, list) else self._need_tokenizer("a text prompt").encode(p) for p in prompts
        ]
        params = sampling_params(body, COMPLETION_OWN, chat=False)
        echo = bool(body.get("echo"))
        if echo:
            params["echo"] = True
            params.setdefault("logprobs", True)
        n = n_of(body)
        endpoint: Literal["generate", "completions"] = "completions" if echo else self._sampler.endpoint
        results = await asyncio.gather(
            *(self._one(p, n, params, body.get("session_id"), endpoint=endpoint) for p in token_prompts)
        )
        return completion_response(
            self.model_name,
            token_prompts,
            results,
            self._token_text,
            self._want_logprobs(params),
            echo=echo,
        )

    # -- the request path ---------------------------------------------------------------------

    async def _one(
        self,
        prompt: list[int],
        n: int,
        params: dict[str, Any],
        session: str | int | None,
        *,
        endpoint: Literal["generate", "completions"] | None = None,
        admitted: bool = False,
    ) -> list[SampledCompletion]:
        if self._staleness is not None and not admitted:
            await self._staleness.admit()
        sampler = self._sampler if endpoint is None else self._sampler_for(endpoint)
        kw = dict(params)
        max_tokens = kw.pop("max_tokens", None)
        if max_tokens is None:
            max_tokens = kw.pop("max_generate_length", 1024)
        temperature = kw.pop("temperature", 1.0)
        stop: list[Any] = []
        s = kw.pop("stop", None)
        if s is not None:
            stop.extend([s] if isinstance(s, str) else list(s))
        stop.extend(kw.pop("stop_token_ids", None) or [])
        lp = kw.pop("logprobs", None)
        if lp is not None and lp is not False:
            kw["logprobs"] = True
            if isinstance(lp, int) and not isinstance(lp, bool) and lp > 0:
                kw.setdefault("top_logprobs", lp)
        kw.pop("n", None)
        if session is not None:
            kw["session"] = str(session)
        out = await sampler.sample_with_prompt_tokens(
            prompt,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop or None,
            **kw,
        )
        tok = self.tokenizer
        if tok is None or sampler.endpoint != "generate":
            return out
        # The generate endpoint streams ids only: the text is decoded here,
        # as vLLM would (special tokens skipped).
        return [replace(c, text=tok.decode(c.completion_ids.tolist(), skip_special_tokens=True)) for c in out]

    @staticmethod
    def _want_logprobs(params: Mapping[str, Any]) -> bool:
        lp = params.get("logprobs")
        return lp is not None and lp is not False

    def _render(self, prompts: Sequence[Any]) -> list[list[int]]:
        tok = self._need_tokenizer("'prompts' (chats)")
        return [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]

    def _need_tokenizer(self, what: str) -> ChatTokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: InferenceEngineClient(..., tokenizer=...)")
        return self.tokenizer

    def _token_text(self, ids: list[int]) -> str:
        tok = self.tokenizer
        if tok is None:
            return ""
        return str(tok.decode(ids, skip_special_tokens=False))

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise LookupError(f"model {model!r} is not served here (this client serves {self.model_name!r})")

    async def _delegate_generate(self, batch: InferenceEngineInput) -> InferenceEngineOutput:
        key = "prompts" if batch.get("prompts") is not None else "prompt_token_ids"
        raw: Any = batch.get(key)
        items: list[Any] = list(raw or [])
        k = len(self._delegates)
        parts = [list(range(i, len(items), k)) for i in range(k)]
        tasks = [
            self._delegates[i].generate(
                {key: [items[j] for j in idx], "sampling_params": batch.get("sampling_params")}  # type: ignore[misc]
            )
            for i, idx in enumerate(parts)
            if idx
        ]
        outs = await asyncio.gather(*tasks)
        merged: dict[str, list[Any]] = {}
        order = [idx for idx in parts if idx]
        for idx, out in zip(order, outs, strict=True):
            for field, values in dict(out).items():
                if values is None:
                    continue
                slot = merged.setdefault(field, [None] * len(items))
                for j, v in zip(idx, cast(list[Any], values), strict=True):
                    slot[j] = v
        return merged  # type: ignore[return-value]

    # -- pause, resume, weights ----------------------------------------------------------------

    @property
    def is_paused(self) -> bool:
        return self._paused

    async def pause_generation(self, mode: PauseMode | None = None) -> None:
        """Hold new admissions and pause every engine. ``keep``: running
        requests freeze in place (``/pause?mode=keep``); ``abort``: they come
        back with their tokens so far and are continued after the resume.
        Returns once every engine confirms it is paused."""
        mode = mode or self.pause_mode
        if mode not in ("keep", "abort"):
            raise ValueError(f"mode must be 'keep' or 'abort', got {mode!r}")
        if self._delegates:
            await asyncio.gather(*(e.pause_generation() for e in self._delegates))
            self._paused = True
            return
        pool = self._need_pool()
        self._failover.held = True
        # Down engines stay down (their probe brings them back, paused).
        pool.pause([ld.url for ld in pool.loads() if ld.state == "active"])
        self._paused = True
        try:
            await self._on_all("POST", "/pause", params={"mode": mode})
            states = await self._on_all("GET", "/is_paused")
            not_paused = [u for u, s in states.items() if not (isinstance(s, dict) and s.get("is_paused"))]
            if not_paused:
                raise EngineUnavailableError(f"engines did not confirm the pause: {not_paused}")
        except BaseException:
            await self.resume_generation()
            raise

    async def resume_generation(self) -> None:
        """Resume every engine, then release the held admissions."""
        if self._delegates:
            await asyncio.gather(*(e.resume_generation() for e in self._delegates))
            self._paused = False
            return
        pool = self._need_pool()
        try:
            await self._on_all("POST", "/resume", tolerate=True)
        finally:
            self._paused = False
            self._failover.held = False
            pool.resume([ld.url for ld in pool.loads() if ld.state == "paused"])

    async def abort_generation(self) -> None:
        """Abort what every engine is running and queueing (``/pause?mode=abort``
        then ``/resume``): the client continues each aborted request from its
        tokens so far; nothing is lost."""
        if self._delegates:
            await asyncio.gather(*(e.abort_generation() for e in self._delegates))
            return
        if self._paused:
            await self._on_all("POST", "/pause", params={"mode": "abort"})
            return
        await self.pause_generation("abort")
        await self.resume_generation()

    async def reset_prefix_cache(self) -> None:
        if self._delegates:
            await asyncio.gather(*(e.reset_prefix_cache() for e in self._delegates))
            return
        await self._on_all("POST", "/reset_prefix_cache")

    async def sleep(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "sleep/wake_up: vLLM's CPU build ignores /sleep (and --enable-sleep-mode refuses to start); "
            "on GPU engines pause with pause_generation() and free memory with the engine's own /sleep"
        )

    async def wake_up(self, *args: Any, **kwargs: Any) -> None:
        await self.sleep()

    @property
    def weight_version(self) -> int:
        """Weight updates made through this client (the staleness clock)."""
        return self._version_counter

    async def update_weights(
        self,
        snapshot_dir: str | None = None,
        version: str | None = None,
        *,
        snapshot_identity: str | None = None,
        incremental_snapshot_metadata: Mapping[str, Any] | None = None,
        store_path: str | None = None,
        syncer: Any = None,
        name: str | None = None,
        checkpoint_type: str | None = None,
        mode: PauseMode | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Load new weights into every engine, verified.

        On a deployment: the manager's transactional hot-load
        (``snapshot_identity`` from its bucket or the store at
        ``store_path``, a delta with ``incremental_snapshot_metadata``).
        On engine URLs: ``snapshot_dir`` (a full checkpoint on the engines'
        host) under ``version``: admissions held and every engine paused and
        confirmed (``mode``, default the client's ``pause_mode``) before any
        weight changes, then each engine reloaded and verified in parallel;
        everything resumes on every path.

        With a :class:`~rollstream.deployment.WeightSyncer` (``syncer=``,
        ``name=``): the trainer's weights are saved as snapshot ``name``
        (a delta against the last loaded one unless ``checkpoint_type``
        says otherwise) and hot-loaded on every replica of its deployment.

        In ``abort`` mode the engines first return what they were generating
        (continued after the update, on the new weights); in ``keep`` mode
        running requests freeze and go on with the new weights. Either way
        each sample's ``weight_versions`` say which tokens came from which
        weights."""
        t0 = time.perf_counter()
        mode = mode or self.pause_mode
        if syncer is not None:
            if not name:
                raise ValueError("update_weights(syncer=...) needs name= (the snapshot's name)")
            paused = mode == "abort" and self._pool is not None
            if paused:
                await self.pause_generation("abort")
            try:
                identity = await asyncio.to_thread(syncer.save_and_hotload, name, checkpoint_type)
            finally:
                if paused:
                    await self.resume_generation()
            report: dict[str, Any] = {"version": identity}
        elif self._manager is not None and self._deployment_id is not None:
            if snapshot_identity is None:
                raise ValueError("a deployment's update_weights needs snapshot_identity=")
            await asyncio.to_thread(
                self._manager.hotload_and_wait,
                self._deployment_id,
                self._base_model,
                snapshot_identity,
                incremental_snapshot_metadata,
                timeout_seconds=int(timeout),
                path=store_path,
            )
            report = {"version": snapshot_identity}
        else:
            if snapshot_dir is None or not version:
                raise ValueError("update_weights on engine URLs needs snapshot_dir= and version=")
            from ..hotload import hotload

            await self.pause_generation(mode)
            try:
                urls = [ld.url for ld in self._need_pool().loads() if ld.state != "down"]
                outs = await asyncio.gather(
                    *(
                        asyncio.to_thread(
                            hotload, u, snapshot_dir, version, timeout=timeout, api_key=self._api_key
                        )
                        for u in urls
                    ),
                    return_exceptions=True,
                )
            finally:
                await self.resume_generation()
            failed = [(u, o) for u, o in zip(urls, outs, strict=True) if isinstance(o, BaseException)]
            if failed:
                raise HotloadError(
                    "; ".join(f"{u}: {o}" for u, o in failed)
                    + f" ({len(urls) - len(failed)} engines updated)",
                    stage=getattr(failed[0][1], "stage", None),
                )
            report = {"version": version, "engines": dict(zip(urls, outs, strict=True))}
            self._failover.expected_version = version
        self._version_counter += 1
        if self._staleness is not None:
            await self._staleness.advance(self._version_counter)
        report["seconds"] = time.perf_counter() - t0
        return report

    async def _on_all(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        tolerate: bool = False,
    ) -> dict[str, Any]:
        """One control call on every engine in rotation (not those taken
        out as down), concurrently; a failure names the engine
        (``tolerate``: failures are logged, not raised)."""
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        urls = [ld.url for ld in self._need_pool().loads() if ld.state != "down"]

        async def one(http: httpx.AsyncClient, url: str) -> Any:
            r = await http.request(method, url + path, params=params, headers=headers)
            if r.status_code >= 400:
                raise EngineUnavailableError(f"{method} {url}{path}: HTTP {r.status_code}: {r.text[:200]}")
            try:
                return r.json()
            except ValueError:
                return r.text

        http = self._http.get()
        outs = await asyncio.gather(*(one(http, u) for u in urls), return_exceptions=True)
        failed = [(u, o) for u, o in zip(urls, outs, strict=True) if isinstance(o, BaseException)]
        for u, o in failed:
            if tolerate:
                log.warning("%s %s on %s failed: %s", method, path, u, o)
        if failed and not tolerate:
            raise EngineUnavailableError("; ".join(f"{u}: {o}" for u, o in failed))
        return {u: o for u, o in zip(urls, outs, strict=True) if not isinstance(o, BaseException)}

    # -- lifetime ------------------------------------------------------------------------------

    async def teardown(self) -> None:
        """Close the client's connections (the engines keep running)."""
        for s in self._samplers.values():
            await s.aclose()
        for http in close_clients(self._http.take_all()):
            await http.aclose()
        for e in self._delegates:
            await e.teardown()

    async def __aenter__(self) -> InferenceEngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.teardown()

    @property
    def tp_size(self) -> int:
        return self._tp

    @property
    def pp_size(self) -> int:
        return self._pp

    @property
    def dp_size(self) -> int:
        """Engines (data-parallel replicas) behind the client."""
        return len(self._delegates) if self._delegates else len(self._need_pool())

    def __repr__(self) -> str:
        inner = self._delegates if self._delegates else self._pool
        return f"InferenceEngineClient(model={self.model_name!r}, engines={inner!r})"

    async def admit(self) -> int:
        """Wait for an admission under ``max_staleness`` (immediate without
        it); returns the weight version the rollout is admitted at. The
        client's own calls admit each request; a generator admits each
        trajectory once and passes ``admitted=True`` to
        :meth:`sample_completions` for its turns."""
        if self._staleness is None:
            return self._version_counter
        return await self._staleness.admit()


# -- helpers ---------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _output(completions: list[SampledCompletion], logprobs: bool) -> InferenceEngineOutput:
    out: InferenceEngineOutput = {
        "responses": [c.text for c in completions],
        "stop_reasons": [c.finish_reason for c in completions],
        "response_ids": [c.completion_ids.tolist() for c in completions],
        "response_logprobs": [c.completion_logprobs.tolist() for c in completions]  # type: ignore[union-attr]
        if logprobs and all(c.completion_logprobs is not None for c in completions)
        else None,
        "weight_versions": [c.weight_versions for c in completions],
        "sampling_masks": [c.sampling_mask for c in completions],
        "completions": completions,
    }
    return out
