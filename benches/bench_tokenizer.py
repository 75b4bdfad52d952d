"""Chat tokenization: transformers' apply_chat_template(tokenize=True) per
prompt vs rollstream's ChatTokenizer (per prompt, and encode_chats on all
cores), on 1000 varied conversations (median ~250 tokens, 70-2000), with the
Qwen vocabulary (byte-level BPE fast path) and Phi-3's SentencePiece-style
tokenizer (the tokenizers-crate path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from _corpus import VECTORS, conversations

from rollstream import ChatTokenizer

CASES = {
    "qwen3": ("tokenizers/qwen3/tokenizer.derived.json", "qwen3.jinja", {"eos_token": "<|im_end|>"}),
    "phi3": (
        "tokenizers/phi-3-mini-4k-instruct/tokenizer.json",
        "phi-3-mini-4k-instruct.jinja",
        {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    ),
}


def _time(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name", sorted(CASES))
def test_chat_tokenization(name: str, benchmark: Any, report: Any) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok_file, template_file, specials = CASES[name]
    tok_json = (VECTORS / tok_file).read_text()
    template = (VECTORS / "templates" / template_file).read_text()
    convs = conversations(1000)
    if name == "phi3":  # Phi-3's template accepts only user/assistant turns.
        convs = [[m for m in c if m["role"] != "system"] for c in convs]

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tok_json), **specials
    )
    hf.chat_template = template

    def hf_ids(c: list[dict[str, Any]]) -> list[int]:
        out = hf.apply_chat_template(c, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    cold = ChatTokenizer(tok_json, chat_template=template, special_tokens=specials)
    t_cold = _time(lambda: [cold.apply_chat_template(c) for c in convs], repeat=1)
    ours = ChatTokenizer(tok_json, chat_template=template, special_tokens=specials)
    lens = [len(ours.apply_chat_template(c)) for c in convs]
    # Same ids as transformers on every prompt.
    sample = convs[::10]
    assert [ours.apply_chat_template(c) for c in sample] == [hf_ids(c) for c in sample]

    benchmark.pedantic(lambda: [ours.apply_chat_template(c) for c in convs], rounds=3, iterations=1)
    t_ours = float(benchmark.stats.stats.min)
    t_batch = _time(lambda: ours.encode_chats(convs))
    t_hf = _time(lambda: [hf_ids(c) for c in convs], repeat=1)
    n, tokens = len(convs), sum(lens)
    path = f"encoder {ours.encoder}"
    report.add(
        f"chat tokenization, {name} ({path}), {n} prompts, median {statistics.median(lens):.0f} tokens "
        f"(min {min(lens)}, max {max(lens)}):"
    )
    for label, t in [
        ("transformers apply_chat_template", t_hf),
        ("rollstream apply_chat_template (cold)", t_cold),
        ("rollstream apply_chat_template", t_ours),
        ("rollstream encode_chats (all cores)", t_batch),
    ]:
        report.add(
            f"  {label:<40} {t / n * 1e6:8.0f} us/prompt {tokens / t / 1e6:6.2f} M tok/s"
            f"  speed-up vs transformers {t_hf / t:5.1f}x"
        )
