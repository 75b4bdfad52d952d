"""A tiny character-level Qwen3-architecture model: the demo's policy.

Its vocabulary is 41 tokens (three specials, ``a``-``z``, ``0``-``9``, space
and newline), so a trainer's full-vocabulary logits cost nothing on a laptop
CPU, while everything else is real: vLLM serves it, transformers loads it,
rollstream's ChatTokenizer renders its chat template, and its embeddings are
tied to the LM head (the case vLLM 0.32 hot-loads wrongly without
rollstream's fix). The chat template renders ``<|im_start|>`` + the last
message + a space, so a one-letter prompt is three tokens.

Weights are small random values (embedding std 0.02: almost uniform output
over the vocabulary), deterministic by seed.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import numpy as np

from ._model import added_token, qwen3_config, qwen3_weights, write_model_dir

__all__ = ["CHAR_TEMPLATE", "CharModelSpec", "char_model"]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list(string.ascii_lowercase + string.digits + " \n")
CHAR_TEMPLATE = (
    "{{- '<|im_start|>' + messages[-1]['content'] -}}{%- if add_generation_prompt -%}{{- ' ' -}}{%- endif -%}"
)
SPEC_VERSION = 2


class CharModelSpec:
    """Shapes of the character-level model."""

    hidden_size = 128
    intermediate_size = 384
    num_hidden_layers = 2
    num_attention_heads = 2
    num_key_value_heads = 1
    head_dim = 64
    vocab_size = len(SPECIALS) + len(CHARS)
    max_position_embeddings = 2048
    embedding_std = 0.02
    init_std = 0.02


def _tokenizer() -> dict[str, Any]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIALS)
        ],
        "normalizer": None,
        # One token per character.
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "[\\s\\S]"},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"},
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "added_tokens_decoder": {str(i): added_token(tok, True) for i, tok in enumerate(SPECIALS)},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": CharModelSpec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAR_TEMPLATE,
    }


def _config() -> dict[str, Any]:
    return qwen3_config(
        CharModelSpec,
        rope_theta=10000.0,
        initializer_range=CharModelSpec.init_std,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )


def _weights(seed: int) -> dict[str, np.ndarray]:
    s = CharModelSpec
    return qwen3_weights(
        s, seed, embedding_std=s.embedding_std, std=lambda fan_in: s.init_std, norm_jitter=0.0
    )


def char_model(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the character-level model to ``path`` (created if missing) and
    return it. Deterministic by ``seed``; an existing directory written by the
    same version and seed is reused."""
    files = lambda: {  # noqa: E731 - evaluated only when writing
        "config.json": _config(),
        "generation_config.json": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0},
        "tokenizer_config.json": _tokenizer_config(),
        "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "tokenizer.json": _tokenizer(),
    }
    stamp = {"model": "char", "spec": SPEC_VERSION, "seed": seed}
    return write_model_dir(path, stamp, files, lambda: _weights(seed))
