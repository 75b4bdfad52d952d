"""Client-side tokenization: chat templates and tokenizer.json in Rust.

:class:`ChatTokenizer` renders a conversation with the model's chat template
and tokenizes it, producing exactly the ids of transformers'
``apply_chat_template(messages, tokenize=True)``, without calling
transformers, with the GIL released, and in parallel for batches.

Behaviour follows transformers 4.x and the ``tokenizers`` library reading
``tokenizer.json`` as written. (transformers 5 rebuilds Llama/SentencePiece
style tokenizers itself and differs from ``tokenizer.json`` for e.g.
Phi-3; byte-level BPE vocabularies such as Qwen, Llama 3 and DeepSeek agree
across versions.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from . import _core
from ._exceptions import TokenizerError

__all__ = ["ChatTokenizer", "Message"]

Message = Mapping[str, Any]

_SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_from_config(config: Mapping[str, Any], name: str = "default") -> str | None:
    tmpl = config.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    if isinstance(tmpl, list):
        by_name = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, Mapping)}
        found = by_name.get(name)
        return found if isinstance(found, str) else None
    return None


def _is_batch(conversation: Any) -> bool:
    """A list of conversations rather than one (as transformers tells them apart)."""
    if isinstance(conversation, (str, bytes, Mapping)) or not isinstance(conversation, Sequence):
        return False
    return len(conversation) > 0 and isinstance(conversation[0], (list, tuple))


class ChatTokenizer:
    """A tokenizer plus its chat template, backed by the Rust core.

    Build with :meth:`from_pretrained` (a model directory or a
    ``tokenizer.json``), :meth:`from_transformers` (convert a transformers
    tokenizer once) or :meth:`from_tokenizers`.

    ``special_tokens`` are the template variables transformers passes
    (``bos_token``, ``eos_token``, ...). ``extra_roles`` widens the accepted
    message roles (default: system, developer, user, assistant, tool,
    function, ipython). ``fixed_time`` (Unix seconds, UTC) pins what
    templates calling ``strftime_now`` see, for reproducible prompts.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, Any] | None = None,
        extra_roles: Sequence[str] = (),
        fixed_time: int | None = None,
    ) -> None:
        if not isinstance(tokenizer_json, str):
            raise TypeError(f"tokenizer_json must be the JSON text, got {type(tokenizer_json).__name__}")
        specials: dict[str, Any] = {}
        for key, value in (special_tokens or {}).items():
            if key == "additional_special_tokens":
                specials[key] = [t for t in (_token_text(v) for v in value or ()) if t is not None]
                continue
            text = _token_text(value)
            if text is not None:
                specials[key] = text
        self._specials = specials
        self._template = chat_template
        self._core = _core.ChatTokenizer(
            tokenizer_json, chat_template, specials, list(extra_roles), fixed_time
        )
        self._ids = {
            name: self._core.token_to_id(tok) for name, tok in specials.items() if isinstance(tok, str)
        }

    # -- construction -------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        chat_template: str | None = None,
        extra_roles: Sequence[str] = (),
        fixed_time: int | None = None,
    ) -> ChatTokenizer:
        """Load from a model directory (``tokenizer.json``,
        ``tokenizer_config.json``, optional ``chat_template.jinja``) or from a
        ``tokenizer.json`` file. Nothing is downloaded."""
        p = Path(path)
        if p.is_dir():
            tok_file, directory = p / "tokenizer.json", p
        else:
            tok_file, directory = p, p.parent
        if not tok_file.exists():
            raise TokenizerError(
                f"no tokenizer.json at {tok_file} (ChatTokenizer needs the fast-tokenizer file; "
                "convert a slow tokenizer with transformers and use ChatTokenizer.from_transformers)"
            )
        config: dict[str, Any] = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file} is not valid JSON: {e}") from e
        if chat_template is None:
            jinja = directory / "chat_template.jinja"
            chat_template = (
                jinja.read_text(encoding="utf-8") if jinja.exists() else _template_from_config(config)
            )
        specials = {k: config[k] for k in _SPECIAL_NAMES if config.get(k) is not None}
        if config.get("additional_special_tokens"):
            specials["additional_special_tokens"] = config["additional_special_tokens"]
        return cls(
            tok_file.read_text(encoding="utf-8"),
            chat_template=chat_template,
            special_tokens=specials,
            extra_roles=extra_roles,
            fixed_time=fixed_time,
        )

    @classmethod
    def from_transformers(
        cls,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        extra_roles: Sequence[str] = (),
        fixed_time: int | None = None,
    ) -> ChatTokenizer:
        """Convert a transformers tokenizer once (its backend ``tokenizer.json``,
        chat template and special tokens); it is not called per request."""
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise TokenizerError(
                f"{type(tokenizer).__name__} has no fast (tokenizers) backend; load it with use_fast=True"
            )
        specials: dict[str, Any] = {}
        for name in _SPECIAL_NAMES:
            value = getattr(tokenizer, name, None)
            if isinstance(value, str):
                specials[name] = value
        extra = getattr(tokenizer, "additional_special_tokens", None)
        if extra:
            specials["additional_special_tokens"] = [str(t) for t in extra]
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return cls(
            backend.to_str(),
            chat_template=template,
            special_tokens=specials,
            extra_roles=extra_roles,
            fixed_time=fixed_time,
        )

    @classmethod
    def from_tokenizers(
        cls,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, Any] | None = None,
        extra_roles: Sequence[str] = (),
        fixed_time: int | None = None,
    ) -> ChatTokenizer:
        """Wrap a ``tokenizers.Tokenizer`` (its JSON is read once)."""
        return cls(
            tokenizer.to_str(),
            chat_template=chat_template,
            special_tokens=special_tokens,
            extra_roles=extra_roles,
            fixed_time=fixed_time,
        )

    @classmethod
    def coerce(cls, tokenizer: Any) -> ChatTokenizer:
        """A ChatTokenizer from a ChatTokenizer, a path, a transformers
        tokenizer or a ``tokenizers.Tokenizer``."""
        if isinstance(tokenizer, ChatTokenizer):
            return tokenizer
        if isinstance(tokenizer, (str, os.PathLike)):
            return cls.from_pretrained(tokenizer)
        if hasattr(tokenizer, "backend_tokenizer") or hasattr(tokenizer, "apply_chat_template"):
            return cls.from_transformers(tokenizer)
        if hasattr(tokenizer, "to_str") and hasattr(tokenizer, "encode"):
            return cls.from_tokenizers(tokenizer)
        raise TypeError(
            f"cannot build a ChatTokenizer from {type(tokenizer).__name__}: pass a model path, "
            "a transformers tokenizer, a tokenizers.Tokenizer or a ChatTokenizer"
        )

    # -- properties ---------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def has_fast_path(self) -> bool:
        """Whether encoding uses one of rollstream's encoders (byte-level
        BPE or SentencePiece-style BPE) instead of the ``tokenizers`` crate."""
        return bool(self._core.has_fast_path)

    @property
    def encoder(self) -> str:
        """``"byte-level-bpe"``, ``"sentencepiece-bpe"`` or ``"tokenizers"``."""
        return str(self._core.encoder)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return int(self._core.vocab_size)

    @property
    def special_tokens(self) -> dict[str, Any]:
        return dict(self._specials)

    @property
    def eos_token(self) -> str | None:
        return cast("str | None", self._specials.get("eos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self._ids.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return cast("str | None", self._specials.get("bos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._ids.get("pad_token")

    def token_to_id(self, token: str) -> int | None:
        return self._core.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._core.id_to_token(token_id)

    # -- chat ---------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Sequence[Message] | Sequence[Sequence[Message]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """transformers' ``apply_chat_template``, keyword for keyword.

        ``tokenize=True`` (default): the token ids; with ``return_dict=True``
        a dict of ``input_ids`` and ``attention_mask``. ``tokenize=False``:
        the rendered text (``return_dict`` has no effect, as in transformers).
        ``add_generation_prompt``, ``continue_final_message``, ``tools`` and
        ``documents`` mean what they mean there; a list of conversations
        gives a list of results (``messages=`` is accepted for
        ``conversation``). Other keyword arguments are template variables.
        Unlike transformers, ``add_generation_prompt`` defaults to True
        (prompts here are for sampling); ``return_dict`` defaults to False
        as in transformers 4 (transformers 5 changed it to True). Padding, truncation, tensors,
        assistant masks and a per-call ``chat_template`` are not supported
        and raise ``TypeError`` rather than being passed to the template.
        """
        unsupported = {
            "chat_template": chat_template is not None,
            "padding": bool(padding),
            "truncation": bool(truncation),
            "max_length": max_length is not None,
            "return_tensors": return_tensors is not None,
            "return_assistant_tokens_mask": bool(return_assistant_tokens_mask),
            "tokenizer_kwargs": bool(tokenizer_kwargs),
        }
        if "messages" in template_kwargs:
            if conversation is not None:
                raise TypeError("pass the conversation once: positionally or as messages=, not both")
            conversation = template_kwargs.pop("messages")
        if conversation is None:
            raise TypeError("apply_chat_template() needs the conversation")
        bad = [name for name, given in unsupported.items() if given]
        if bad:
            raise TypeError(
                f"ChatTokenizer.apply_chat_template does not support {', '.join(bad)}: pass "
                "chat_template= when building the ChatTokenizer, and pad/truncate/convert the ids yourself"
            )
        if _is_batch(conversation):
            return [
                self.apply_chat_template(
                    conv,
                    tools=tools,
                    documents=documents,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tokenize=tokenize,
                    return_dict=return_dict,
                    **template_kwargs,
                )
                for conv in cast("Sequence[Sequence[Message]]", conversation)
            ]
        messages = cast("Sequence[Message]", conversation)
        if not tokenize:
            return self.render_chat_template(
                messages, add_generation_prompt, tools, documents, continue_final_message, **template_kwargs
            )
        ids = self._core.apply(
            messages, tools, documents, add_generation_prompt, continue_final_message, template_kwargs
        )
        if return_dict:
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        return ids

    def render_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The rendered text (transformers' ``tokenize=False``)."""
        return self._core.render(
            messages, tools, documents, add_generation_prompt, continue_final_message, template_kwargs
        )

    def encode_chats(
        self,
        conversations: Iterable[Sequence[Message]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[npt.NDArray[np.int64]]:
        """Token ids of many conversations, rendered and encoded on all cores
        (GIL released). The same ``tools``/kwargs apply to every one."""
        return cast(
            "list[npt.NDArray[np.int64]]",
            self._core.apply_batch(
                list(conversations),
                tools,
                documents,
                add_generation_prompt,
                continue_final_message,
                template_kwargs,
            ),
        )

    # -- text ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` applies the
        tokenizer's post-processor (e.g. a BOS), off by default because chat
        templates already carry their special tokens."""
        return self._core.encode(text, add_special_tokens)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[npt.NDArray[np.int64]]:
        """Token ids of many texts, on all cores."""
        return cast("list[npt.NDArray[np.int64]]", self._core.encode_batch(list(texts), add_special_tokens))

    def decode(
        self, ids: Sequence[int] | npt.NDArray[np.integer[Any]], skip_special_tokens: bool = False
    ) -> str:
        seq = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        return self._core.decode(seq, skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"ChatTokenizer(vocab_size={self.vocab_size}, encoder={self.encoder!r}, "
            f"template={'yes' if self._template else 'no'})"
        )
