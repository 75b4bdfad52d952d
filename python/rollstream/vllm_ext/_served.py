"""What a vLLM worker actually serves, compared with a checkpoint.

After a hot-load the question is not "did reload_weights return" but "does
every forward pass now use the new tensors". vLLM's own ``/weight_checker``
hashes kernel-format parameters, and on the CPU build the linear layers keep
no parameter at all (they are packed into oneDNN/SGL handles and the weight is
replaced by an empty tensor), so neither can be compared with a checkpoint.

This module reads the weights through the compute path instead: a linear
layer's effective matrix is ``apply(I) - apply(0)`` (identity rows in chunks),
which is exact in float arithmetic (one product by 1.0, the rest by 0.0) and
sees whatever the kernel really multiplies by, including a stale packed copy
(docs/ENGINE.md, defect 5.1). Fused modules are split back into their
checkpoint tensors with the model's ``packed_modules_mapping`` and the
checkpoint's shapes; the LM head maps to ``model.embed_tokens.weight`` when the
model ties them. Each mapped tensor is compared exactly (``-0.0 == 0.0``) with
the checkpoint file on this host, and a digest of the canonical served bytes
lets replicas be compared with each other.

Runs inside vLLM worker processes only (torch, safetensors present).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Identity rows per probe: bounds the probe's memory to CHUNK x out_features.
CHUNK = 1024
#: Mismatches listed in a report (the count is always complete).
MAX_LISTED = 8


def _linear_matrix(module: Any, in_features: int) -> Any:
    """The [out, in] matrix the module's kernel multiplies by (bias removed)."""
    import torch

    method = module.quant_method
    dtype = _param_dtype(module)
    zero = torch.zeros(1, in_features, dtype=dtype)
    bias = method.apply(module, zero, getattr(module, "bias", None)) if _has_bias(module) else None
    cols = []
    for start in range(0, in_features, CHUNK):
        stop = min(start + CHUNK, in_features)
        eye = torch.zeros(stop - start, in_features, dtype=dtype)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        y = method.apply(module, eye, getattr(module, "bias", None))
        if bias is not None:
            y = y - bias
        cols.append(y)
    return torch.cat(cols, 0).t().contiguous()


def _has_bias(module: Any) -> bool:
    bias = getattr(module, "bias", None)
    return bias is not None and getattr(bias, "numel", lambda: 0)() > 0


def _param_dtype(module: Any) -> Any:
    import torch

    for p in module.parameters(recurse=False):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _in_features(module: Any) -> int | None:
    for attr in ("input_size_per_partition", "embedding_dim", "input_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel() > 0:
        return int(weight.shape[1])
    return None


def served_tensors(
    model: Any, checkpoint: dict[str, tuple[str, tuple[int, ...]]], tie_word_embeddings: bool
) -> Iterator[tuple[str, Any]]:
    """``(checkpoint tensor name, served tensor)`` for every served tensor
    that maps one-to-one to a tensor of ``checkpoint`` (name -> (dtype,
    shape)); yields ``(module or parameter name, None)`` for served weights
    that do not map (reported, never silently skipped). A tied LM head is
    yielded as ``"<embedding name> (as lm_head)"``."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", None) or {})
    seen_params: set[int] = set()
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        kind = type(module).__name__
        if method is not None and hasattr(method, "apply") and "Embedding" not in type(method).__name__:
            weight = getattr(module, "weight", None)
            if weight is not None:
                seen_params.add(id(weight))
            in_features = _in_features(module)
            if in_features is None:
                yield name, None
                continue
            matrix = _linear_matrix(module, in_features)
            yield from _split(name, matrix, packed, checkpoint)
            bias = getattr(module, "bias", None)
            if bias is not None and bias.numel() > 0:
                seen_params.add(id(bias))
                yield from _split(name, bias.detach(), packed, checkpoint, suffix="bias")
            continue
        if kind == "ParallelLMHead":
            weight = module.weight
            seen_params.add(id(weight))
            target: str | None = f"{name}.weight"
            if target not in checkpoint and tie_word_embeddings:
                target = _embedding_name(checkpoint)
            in_features = _in_features(module)
            if target is None or target not in checkpoint or in_features is None:
                yield name, None
                continue
            # The head's kernel is probed even when tied: vLLM 0.32 keeps a
            # stale head after a reload of a tied model (defect 5.1).
            matrix = _linear_matrix(module, in_features)
            yield f"{target} (as {name})", matrix[: checkpoint[target][1][0]]
            continue
        if kind == "VocabParallelEmbedding":
            weight = module.weight
            seen_params.add(id(weight))
            target = f"{name}.weight"
            if target not in checkpoint:
                yield target, None
                continue
            yield target, weight.detach()[: checkpoint[target][1][0]]
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen_params:
                continue
            seen_params.add(id(param))
            full = f"{name}.{pname}" if name else pname
            yield full, (param.detach() if full in checkpoint else None)


def _embedding_name(checkpoint: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    names = [n for n in checkpoint if n.endswith("embed_tokens.weight")]
    return names[0] if len(names) == 1 else None


def _split(
    name: str,
    tensor: Any,
    packed: dict[str, list[str]],
    checkpoint: dict[str, tuple[str, tuple[int, ...]]],
    suffix: str = "weight",
) -> Iterator[tuple[str, Any]]:
    direct = f"{name}.{suffix}"
    if direct in checkpoint:
        yield direct, tensor
        return
    prefix, _, leaf = name.rpartition(".")
    parts = packed.get(leaf)
    if not parts:
        yield direct, None
        return
    names = [f"{prefix}.{p}.{suffix}" if prefix else f"{p}.{suffix}" for p in parts]
    if not all(n in checkpoint for n in names):
        yield direct, None
        return
    sizes = [checkpoint[n][1][0] for n in names]
    if sum(sizes) != tensor.shape[0]:
        # Sharded (tensor parallel) or padded: the mapping is not one-to-one.
        yield direct, None
        return
    start = 0
    for n, size in zip(names, sizes, strict=True):
        yield n, tensor[start : start + size]
        start += size


def tensor_hash(t: Any) -> str:
    """XXH3-64 (hex) of a tensor's canonical bytes: contiguous, ``-0.0`` as
    ``+0.0`` (the probe cannot tell them apart), in its own dtype."""
    import torch

    t = t.detach().contiguous()
    if t.is_floating_point():
        t = t + 0
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype.itemsize == 1:
        t = t.view(torch.uint8)
    arr = t.cpu().reshape(-1).numpy()
    if _xxh3 is not None:
        return f"{_xxh3(arr):016x}"
    return hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest()


_xxh3: Callable[[Any], int] | None
try:  # rollstream's Rust core, when the engine's environment has it (~30 GB/s)
    from .._core import xxh3_64 as _xxh3
except ImportError:  # pragma: no cover - the engine without rollstream's wheel
    _xxh3 = None


def _files(weights_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for f in sorted(weights_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                files[key] = f
    return files


def checkpoint_hashes(weights_dir: Path) -> dict[str, str]:
    """``{tensor name: tensor_hash}`` of every tensor in ``weights_dir``:
    computed before a hot-load pauses anything, so that verifying under the
    pause only has to hash what is served."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in _files(weights_dir).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for name in names:
                out[name] = tensor_hash(fh.get_tensor(name))
    return out


def compare(
    model: Any,
    weights_dir: Path,
    headers: dict[str, tuple[str, tuple[int, ...]]],
    tie_word_embeddings: bool,
    expected: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compare what ``model`` serves with the checkpoint in ``weights_dir``
    (whose :func:`checkpoint_hashes` are ``expected``, computed here when
    None).

    Returns ``{"digest", "checked", "mismatched", "mismatches", "unmapped",
    "missing"}``: ``digest`` hashes every mapped served tensor (equal on
    replicas that serve the same weights), ``mismatches`` lists up to
    MAX_LISTED ``{"tensor", "max_abs_diff"}`` (read from the file, only on
    failure), ``unmapped`` names served weights with no one-to-one
    checkpoint tensor and ``missing`` checkpoint tensors nothing served maps
    to."""
    from safetensors import safe_open

    if expected is None:
        expected = checkpoint_hashes(weights_dir)
    hashes: list[tuple[str, str]] = []
    bad: list[tuple[str, Any]] = []
    unmapped: list[str] = []
    mapped: set[str] = set()
    # One served tensor at a time: never a second copy of the model in memory.
    for name, served in served_tensors(model, headers, tie_word_embeddings):
        tensor_name = name.split(" (as ", 1)[0]
        if served is None or tensor_name not in expected:
            unmapped.append(name)
            continue
        dtype, shape = headers[tensor_name]
        mapped.add(tensor_name)
        served_t = served.to(_TORCH_DTYPE.get(dtype, served.dtype)) if dtype in _TORCH_DTYPE else served
        h = tensor_hash(served_t) if tuple(served_t.shape) == tuple(shape) else "shape"
        hashes.append((name, h))
        if h != expected[tensor_name] and len(bad) < MAX_LISTED:
            bad.append((name, served_t))
    mismatched = sum(h != expected[n.split(" (as ", 1)[0]] for n, h in hashes)
    mismatches: list[dict[str, Any]] = []
    if bad:
        files = _files(weights_dir)
        for name, served_t in bad:
            tensor_name = name.split(" (as ", 1)[0]
            with safe_open(str(files[tensor_name]), framework="pt") as fh:
                ref = fh.get_tensor(tensor_name)
            same_shape = tuple(served_t.shape) == tuple(ref.shape)
            diff = float((served_t.float() - ref.float()).abs().max()) if same_shape else None
            mismatches.append(
                {
                    "tensor": name,
                    "max_abs_diff": diff,
                    "served_shape": list(served_t.shape),
                    "checkpoint_shape": list(ref.shape),
                }
            )
    digest = hashlib.sha256()
    for name, h in sorted(hashes):
        digest.update(f"{name}\0{h}\n".encode())
    return {
        "digest": digest.hexdigest()[:32],
        "checked": len(hashes),
        "mismatched": mismatched,
        "mismatches": mismatches,
        "unmapped": sorted(unmapped),
        "missing": sorted(set(headers) - mapped),
    }


_TORCH_DTYPE: dict[str, Any] = {}


def _init_dtypes() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    _TORCH_DTYPE.update(
        {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    )


_init_dtypes()
