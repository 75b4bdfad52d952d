"""Chat tokenization: transformers' apply_chat_template(tokenize=True) per
prompt vs rollstream's ChatTokenizer (per prompt, and encode_chats on all
cores), on 1000 varied conversations (median ~250 tokens, 70-2000), with the
Qwen vocabulary (byte-level BPE fast path) and Phi-3's SentencePiece-style
tokenizer (its own fast path); and one adversarial 100,000-letter word
against the `tokenizers` crate. Every implementation: best of the same
number of rounds (_timing.ROUNDS)."""

from __future__ import annotations

import random
import statistics
import string
from typing import Any

import pytest
from _corpus import VECTORS, conversations
from _timing import ROUNDS, best_of, pedantic_best

from rollstream import ChatTokenizer
from rollstream.testing import need

CASES = {
    "qwen3": ("tokenizers/qwen3/tokenizer.derived.json", "qwen3.jinja", {"eos_token": "<|im_end|>"}),
    "phi3": (
        "tokenizers/phi-3-mini-4k-instruct/tokenizer.json",
        "phi-3-mini-4k-instruct.jinja",
        {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chat_tokenization(name: str, benchmark: Any, report: Any) -> None:
    transformers = need("transformers")
    tokenizers = need("tokenizers")
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

    # Cold: the first pass of a fresh tokenizer (empty piece cache), one per round.
    fresh = [ChatTokenizer(tok_json, chat_template=template, special_tokens=specials) for _ in range(ROUNDS)]

    def cold_pass() -> None:
        tok = fresh.pop()
        for c in convs:
            tok.apply_chat_template(c)

    t_cold = best_of(cold_pass)
    ours = ChatTokenizer(tok_json, chat_template=template, special_tokens=specials)
    lens = [len(ours.apply_chat_template(c)) for c in convs]
    # Same ids as transformers on every prompt.
    sample = convs[::10]
    assert [ours.apply_chat_template(c) for c in sample] == [hf_ids(c) for c in sample]

    t_ours = pedantic_best(benchmark, lambda: [ours.apply_chat_template(c) for c in convs])
    t_batch = best_of(lambda: ours.encode_chats(convs))
    t_hf = best_of(lambda: [hf_ids(c) for c in convs])
    n, tokens = len(convs), sum(lens)
    path = f"encoder {ours.encoder}"
    report.add(
        f"chat tokenization, {name} ({path}), {n} prompts, median {statistics.median(lens):.0f} tokens "
        f"(min {min(lens)}, max {max(lens)}), best of {ROUNDS} rounds each:"
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


#: One pre-tokenizer piece of 100,000 letters: the merge loop's worst case
#: (a quadratic loop takes seconds here; byte-level BPE in `tokenizers` is
#: O(n log n)). Pseudo-random letters, so many different merges apply.
ADVERSARIAL = "".join(random.Random(0).choice(string.ascii_letters) for _ in range(100_000))


def test_adversarial_long_word(benchmark: Any, report: Any) -> None:
    tokenizers = need("tokenizers")
    tok_json = (VECTORS / CASES["qwen3"][0]).read_text()
    ours = ChatTokenizer(tok_json)
    ref = tokenizers.Tokenizer.from_str(tok_json)
    assert ours.encoder == "byte-level-bpe"
    expected = ref.encode(ADVERSARIAL, add_special_tokens=False).ids
    assert ours.encode(ADVERSARIAL) == expected

    t_ours = pedantic_best(benchmark, lambda: ours.encode(ADVERSARIAL))
    t_ref = best_of(lambda: ref.encode(ADVERSARIAL, add_special_tokens=False))
    report.add(
        f"adversarial piece: {len(ADVERSARIAL):,} letters -> {len(expected):,} tokens (qwen3 vocabulary), "
        f"best of {ROUNDS} rounds each:"
    )
    for label, t in [("tokenizers (Rust crate via Python)", t_ref), ("rollstream encode", t_ours)]:
        report.add(f"  {label:<40} {t * 1e3:9.1f} ms   {t / t_ref:8.2f}x the time of tokenizers")
