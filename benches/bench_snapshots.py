"""Delta codecs and checksums: rollstream's arc_v2 and rsd1 vs the reference
fireworks-delta-compression (arc_v2, arc_v3) on synthetic transformer
checkpoints (~270-330 MB), for a dense Adam-like step and a sparse update
(10% of elements change); Adler-32 vs zlib.adler32 and a numpy copy (the
memory bound). Reference arc_v3 is slow and runs on a 64 MB subset; rsd1 is also reported
on that same subset, so ratios compare like with like. Every figure is the
best of the same number of rounds (_timing.ROUNDS)."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest
from _timing import ROUNDS, timed

from rollstream import snapshots
from rollstream.testing import need


def checkpoint(dtype: Any, layers: int, hidden: int = 1024, vocab: int = 32000) -> dict[str, Any]:
    torch = need("torch")
    g = torch.Generator().manual_seed(0)
    inter = hidden * 11 // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
    return {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}


def update(base: dict[str, Any], kind: str) -> dict[str, Any]:
    torch = need("torch")
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in base.items():
        # Adam-like: every element moves by about lr (1e-4) in a random direction.
        step = 1e-4 * torch.randn(v.shape, generator=g).clamp(-3, 3)
        if kind == "sparse":
            step = step * (torch.rand(v.shape, generator=g) < 0.1)
        out[k] = (v.float() + step).to(v.dtype)
    return out


def nbytes(d: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


def subset(d: dict[str, Any], limit: int) -> dict[str, Any]:
    out, total = {}, 0
    for k, v in d.items():
        if total >= limit:
            break
        out[k] = v
        total += v.numel() * v.element_size()
    return out


SCENARIOS = [
    ("dense f32", "float32", 4, "dense"),
    ("dense bf16", "bfloat16", 8, "dense"),
    ("sparse f32", "float32", 4, "sparse"),
    ("sparse bf16", "bfloat16", 8, "sparse"),
]


@pytest.mark.parametrize(("label", "dtype", "layers", "kind"), SCENARIOS)
def test_delta_codecs(label: str, dtype: str, layers: int, kind: str, report: Any) -> None:
    torch = need("torch")
    fdc = need("fireworks_delta_compression.compression")
    base = checkpoint(getattr(torch, dtype), layers)
    new = update(base, kind)
    size = nbytes(new)
    rows = []

    def ours(fmt: str) -> None:
        t_enc, blob = timed(lambda: snapshots.encode_delta_tensors(base, new, fmt))
        t_dec, out = timed(lambda: snapshots.decode_delta_tensors(base, blob))
        assert all(torch.equal(out[k], new[k]) for k in new)
        rows.append((f"rollstream {fmt}", size / t_enc, size / t_dec, size / len(blob), size))

    def reference(fmt: str, data_base: dict[str, Any], data_new: dict[str, Any]) -> None:
        n = nbytes(data_new)
        t_enc, (diffs, sums) = timed(lambda: fdc.delta_compress_dicts(data_base, data_new, fmt))
        enc_bytes = sum(d.numel() for d in diffs.values())

        def dec() -> dict[str, Any]:
            return {
                k: fdc.delta_decompress(
                    src=data_base[k], compressed_diff=diffs[k], checksum=sums[k], compression_format=fmt
                )
                for k in diffs
            }

        t_dec, out = timed(dec)
        assert all(torch.equal(out[k], data_new[k]) for k in data_new)
        rows.append(
            (
                f"reference {fmt}" + (" (64 MB subset)" if n < size else ""),
                n / t_enc,
                n / t_dec,
                n / enc_bytes,
                n,
            )
        )

    reference("arc_v2", base, new)
    sb, sn = subset(base, 64 << 20), subset(new, 64 << 20)
    reference("arc_v3", sb, sn)
    ours("arc_v2")
    ours("rsd1")
    sub_blob = snapshots.encode_delta_tensors(sb, sn, "rsd1")
    rows.append(("rollstream rsd1 (64 MB subset)", float("nan"), float("nan"), nbytes(sn) / len(sub_blob), 0))
    ref_v2 = rows[0]
    report.add(
        f"delta codecs, {label} ({size / 1e6:.0f} MB, {len(new)} tensors), best of {ROUNDS} rounds each:"
    )
    for name, enc, dec, ratio, _ in rows:
        speed = f"encode {enc / 1e6:7.1f} MB/s  decode {dec / 1e6:7.1f} MB/s" if enc == enc else " " * 40
        versus = f"  encode speed vs reference arc_v2 {enc / ref_v2[1]:5.1f}x" if enc == enc else ""
        report.add(f"  {name:<32} {speed}  ratio {ratio:6.2f}{versus}")


def test_adler32(report: Any) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=256 << 20, dtype=np.uint8)
    raw = data.tobytes()
    t_ours = timed(lambda: snapshots.adler32(data))[0]
    t_zlib = timed(lambda: zlib.adler32(raw))[0]
    dst = np.empty_like(data)
    t_copy = timed(lambda: np.copyto(dst, data))[0]
    assert snapshots.adler32(data) == zlib.adler32(raw)
    gb = data.nbytes / 1e9
    report.add(f"adler32 over {data.nbytes >> 20} MB, best of {ROUNDS} rounds each:")
    report.add(f"  rollstream adler32 {gb / t_ours:6.2f} GB/s   ({t_zlib / t_ours:5.1f}x zlib)")
    report.add(f"  zlib.adler32       {gb / t_zlib:6.2f} GB/s")
    report.add(
        f"  numpy copy         {gb / t_copy:6.2f} GB/s   (memory bound; ours at {t_copy / t_ours:.2f}x of it)"
    )
