"""Deterministic synthetic conversations for benchmarks: varied text
(prose, code, numbers, CJK, emoji, whitespace runs) with a length
distribution of roughly 100-2000 tokens and a median near 250."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vectors"


def _words() -> list[str]:
    convs = json.loads((VECTORS / "conversations.json").read_text())["conversations"]
    words: list[str] = []
    for c in convs:
        for m in c["messages"]:
            if isinstance(m.get("content"), str):
                words += m["content"].split()
    words += [
        "def",
        "return",
        "x",
        "==",
        "{",
        "}",
        "(",
        ")",
        "42",
        "3.14159",
        "数据",
        "😀",
        "naïve",
        "\n",
        "\n\n",
        "    ",
    ]
    return [w for w in words if w]


def conversations(n: int = 1000, seed: int = 0) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    words = _words()
    out = []
    for _ in range(n):
        # ~2.2 tokens per word here: 45-900 words gives ~100-2000 tokens,
        # skewed so the median is near 250.
        total = int(45 * (900 / 45) ** (rng.random() ** 1.75))
        turns = rng.choice([1, 1, 2, 3])
        msgs: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": "You are a careful assistant."})
        for t in range(turns * 2 - 1):
            k = max(3, total // (turns * 2 - 1))
            text = " ".join(rng.choice(words) for _ in range(k))
            msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": text})
        out.append(msgs)
    return out
