#!/usr/bin/env bash
# Check the promise "the client needs no torch": build the release wheel,
# install it into a fresh virtual environment with only the wheel's declared
# dependencies (no torch, no vLLM), and sample a few tokens from a running
# vLLM server through rollstream.DeploymentSampler with the model's tokenizer.
#
#   ROLLSTREAM_TEST_SERVER=http://127.0.0.1:8000 \
#   ROLLSTREAM_TEST_TOKENIZER=/path/to/model_dir \
#   [ROLLSTREAM_TEST_MODEL=served-name] [PYTHON=python3] scripts/check-wheel.sh
#
# PYTHON builds the wheel (it needs maturin) and is the base interpreter of
# the fresh environment. ROLLSTREAM_WHEEL, when set, is a wheel built
# beforehand to check instead of building one. ROLLSTREAM_BUILD_LOCK, when
# set, is a lock file the wheel build holds (flock), for machines that
# serialise Rust builds.
# Fails if torch or vLLM got installed, if the extension carries debug info,
# or if sampling does not return tokens. Prints "check-wheel: ok" at the end.
set -euo pipefail

: "${ROLLSTREAM_TEST_SERVER:?set ROLLSTREAM_TEST_SERVER to a vLLM server URL}"
: "${ROLLSTREAM_TEST_TOKENIZER:?set ROLLSTREAM_TEST_TOKENIZER to a directory with tokenizer.json}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/rollstream-check-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The checkout must not leak into the fresh environment.
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME

if [ -n "${ROLLSTREAM_WHEEL:-}" ]; then
  wheel="$ROLLSTREAM_WHEEL"
else
  echo "check-wheel: building the release wheel"
  build=("$PYTHON" -m maturin build --release --quiet --out "$work/dist")
  if [ -n "${ROLLSTREAM_BUILD_LOCK:-}" ]; then
    (cd "$here" && flock "$ROLLSTREAM_BUILD_LOCK" "${build[@]}")
  else
    (cd "$here" && "${build[@]}")
  fi
  wheel="$(ls "$work"/dist/rollstream-*.whl)"
fi
echo "check-wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

echo "check-wheel: installing it into a fresh environment"
"$PYTHON" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
"$venv_py" -m pip install --quiet --disable-pip-version-check "$wheel"

echo "check-wheel: sampling from $ROLLSTREAM_TEST_SERVER"
cd "$work"  # not the checkout: its python/ must not shadow the installed package
"$venv_py" - <<'PY'
import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import httpx

import rollstream
from rollstream import ChatTokenizer, DeploymentSampler

def fail(message: str) -> None:
    print(f"check-wheel: FAILED: {message}", file=sys.stderr)
    sys.exit(1)

venv = Path(sys.prefix).resolve()
if not Path(rollstream.__file__).resolve().is_relative_to(venv):
    fail(f"rollstream was imported from {rollstream.__file__}, not from the fresh environment {venv}")
for heavy in ("torch", "vllm", "transformers"):
    if importlib.util.find_spec(heavy) is not None:
        fail(f"{heavy} was installed with the wheel; the client must not need it")

def section_names(image: bytes) -> list[str]:
    """Section names of a little-endian ELF64 image (the Linux wheel's extension)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        fail("the extension is not an ELF64 shared object")
    shoff = int.from_bytes(image[0x28:0x30], "little")
    entsize, count, strndx = (int.from_bytes(image[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E))
    headers = [image[shoff + i * entsize : shoff + (i + 1) * entsize] for i in range(count)]
    strtab = headers[strndx]
    base = int.from_bytes(strtab[0x18:0x20], "little")
    names = []
    for h in headers:
        start = base + int.from_bytes(h[0:4], "little")
        names.append(image[start : image.index(b"\0", start)].decode())
    return names

ext = next(Path(rollstream.__file__).parent.glob("_core*.so"))
image = ext.read_bytes()
debug = [n for n in section_names(image) if n.startswith(".debug")]
if debug:
    fail(f"{ext.name} ({len(image) / 2**20:.1f} MiB) carries {debug}: the release profile must strip it")
print(f"check-wheel: {ext.name} is {len(image) / 2**20:.1f} MiB, no debug sections")

server = os.environ["ROLLSTREAM_TEST_SERVER"].rstrip("/")
model = os.environ.get("ROLLSTREAM_TEST_MODEL") or httpx.get(f"{server}/v1/models").json()["data"][0]["id"]
tokenizer = ChatTokenizer.from_pretrained(os.environ["ROLLSTREAM_TEST_TOKENIZER"])

async def sample() -> list:
    async with DeploymentSampler(server, model, tokenizer=tokenizer) as sampler:
        return await sampler.sample_with_tokens(
            [{"role": "user", "content": "Say something."}], n=2, max_tokens=8, logprobs=True, seed=1
        )

completions = asyncio.run(sample())
if len(completions) != 2:
    fail(f"asked for 2 samples, got {len(completions)}")
for c in completions:
    if c.completion_len == 0 or len(c.full_tokens) != c.prompt_len + c.completion_len:
        fail(f"bad completion {c!r}")
    if c.inference_logprobs is None or len(c.inference_logprobs) != c.completion_len:
        fail(f"logprobs do not line up with tokens in {c!r}")
print(f"check-wheel: sampled {[c.completion_len for c in completions]} tokens from {model!r}")
PY
echo "check-wheel: ok"
