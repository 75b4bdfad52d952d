"""Checksums, delta codecs (with the reference package as a real peer), the
snapshot store and the trainer-side chain."""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollstream import snapshots
from rollstream._exceptions import ChecksumMismatchError, SnapshotCorruptError, TensorMismatchError
from rollstream.snapshots import SnapshotChain, SnapshotStore

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def checkpoint(seed: int, *, step: float = 0.0, sparse: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(300, 64, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g),
        "model.norm.weight": torch.ones(64),
        "bf16.weight": torch.randn(256, 32, generator=g).to(torch.bfloat16),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    if step == 0.0:
        return base
    g2 = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            keep = torch.rand(v.shape, generator=g2) >= sparse
            upd = v.float() + step * torch.randn(v.shape, generator=g2)
            out[k] = torch.where(keep, v.float(), upd).to(v.dtype)
        else:
            out[k] = v + seed
    return out


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bool else a[k], b[k]), k


# -- checksums --------------------------------------------------------------------------


def test_adler32_equals_zlib_on_every_input_kind() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=9_000_003, dtype=np.uint8)  # exercises the parallel path
    assert snapshots.adler32(data) == zlib.adler32(data.tobytes())
    assert snapshots.adler32(b"Wikipedia") == zlib.adler32(b"Wikipedia")
    assert snapshots.adler32(b"", 12345) == 12345
    assert snapshots.adler32(b"more", value=zlib.adler32(b"some")) == zlib.adler32(b"somemore")
    f32 = rng.standard_normal((33, 17)).astype(np.float32)
    assert snapshots.adler32(f32) == zlib.adler32(f32.tobytes())
    bf = torch.randn(100, 7).to(torch.bfloat16)
    assert snapshots.adler32(bf) == zlib.adler32(bf.view(torch.int16).numpy().tobytes())
    assert snapshots.adler32(memoryview(b"abc")) == zlib.adler32(b"abc")
    assert snapshots.xxh3_64(b"abc") == snapshots.xxh3_64(bytearray(b"abc")) != snapshots.xxh3_64(b"abd")
    with pytest.raises(TypeError, match="got str"):
        snapshots.adler32("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"move it to the CPU"):
        snapshots.adler32(torch.empty(1, device="meta"))


# -- codecs -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["arc_v2", "rsd1"])
@pytest.mark.parametrize("sparse", [1.0, 0.1])
def test_file_round_trip(tmp_path: Path, fmt: str, sparse: float) -> None:
    base = save(tmp_path / "base.safetensors", checkpoint(0))
    new_t = checkpoint(1, step=1e-3, sparse=sparse)
    new = save(tmp_path / "new.safetensors", new_t)
    stats = snapshots.encode_delta(base, new, tmp_path / "d", fmt)
    assert stats.tensors == 5
    assert stats.encoded_bytes < stats.raw_bytes
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    dstats = snapshots.decode_delta(base, tmp_path / "d", tmp_path / "out.safetensors")
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before, "the base is never modified"
    equal(safetensors_torch.load_file(str(tmp_path / "out.safetensors")), new_t)
    assert dstats.adler32 == stats.adler32
    assert stats.adler32["step"] == snapshots.adler32(new_t["step"])


@pytest.mark.parametrize("fmt", ["arc_v2", "rsd1"])
def test_in_memory_round_trip_numpy_and_torch(fmt: str) -> None:
    base, new = checkpoint(0), checkpoint(2, step=0.01)
    blob = snapshots.encode_delta_tensors(base, new, fmt)
    equal(snapshots.decode_delta_tensors(base, blob), new)
    nb = {k: v.numpy() for k, v in base.items() if v.dtype != torch.bfloat16}
    nn = {k: v.numpy() for k, v in new.items() if v.dtype != torch.bfloat16}
    out = snapshots.decode_delta_tensors(nb, snapshots.encode_delta_tensors(nb, nn, fmt))
    for k in nn:
        np.testing.assert_array_equal(out[k], nn[k])


def test_our_arc_v2_decodes_with_the_reference_and_theirs_with_ours(tmp_path: Path) -> None:
    fdc = pytest.importorskip("fireworks_delta_compression.compression")
    base_t, new_t = checkpoint(0), checkpoint(3, step=1e-2)
    base = save(tmp_path / "base.safetensors", base_t)
    new = save(tmp_path / "new.safetensors", new_t)
    snapshots.encode_delta(base, new, tmp_path / "ours.safetensors", "arc_v2")
    theirs_decoded = fdc.delta_decompress_dict_from_file(
        src=dict(base_t), diff_file=str(tmp_path / "ours.safetensors"), compression_format="arc_v2"
    )
    equal(theirs_decoded, new_t)
    fdc.delta_compress_files_to_file(
        src=str(base),
        dst=str(new),
        diff_file=str(tmp_path / "theirs.safetensors"),
        compression_format="arc_v2",
    )
    snapshots.decode_delta(base, tmp_path / "theirs.safetensors", tmp_path / "out.safetensors")
    equal(safetensors_torch.load_file(str(tmp_path / "out.safetensors")), new_t)


def test_mismatches_are_named(tmp_path: Path) -> None:
    base = checkpoint(0)
    renamed = dict(checkpoint(1, step=0.1))
    renamed["other"] = renamed.pop("model.norm.weight")
    with pytest.raises(TensorMismatchError) as info:
        snapshots.encode_delta_tensors(base, renamed)
    assert info.value.tensor == "other"
    reshaped = dict(checkpoint(1, step=0.1))
    reshaped["model.norm.weight"] = torch.ones(8, 8)
    with pytest.raises(TensorMismatchError, match=r"model\.norm\.weight"):
        snapshots.encode_delta_tensors(base, reshaped, "arc_v2")
    retyped = dict(checkpoint(1, step=0.1))
    retyped["model.norm.weight"] = retyped["model.norm.weight"].double()
    with pytest.raises(TensorMismatchError, match="F64"):
        snapshots.encode_delta_tensors(base, retyped)


@pytest.mark.parametrize("fmt", ["arc_v2", "rsd1"])
def test_corruption_truncation_and_wrong_base_write_nothing(tmp_path: Path, fmt: str) -> None:
    base = save(tmp_path / "base.safetensors", checkpoint(0))
    new = save(tmp_path / "new.safetensors", checkpoint(1, step=0.05))
    delta = tmp_path / "delta"
    snapshots.encode_delta(base, new, delta, fmt)
    good = delta.read_bytes()
    out = tmp_path / "out.safetensors"

    corrupt = bytearray(good)
    corrupt[len(corrupt) - 200] ^= 0x10
    delta.write_bytes(bytes(corrupt))
    with pytest.raises((ChecksumMismatchError, SnapshotCorruptError)) as info:
        snapshots.decode_delta(base, delta, out)
    assert info.value.tensor or info.value.path
    assert not out.exists()

    delta.write_bytes(good[: len(good) // 2])
    with pytest.raises((ChecksumMismatchError, SnapshotCorruptError)):
        snapshots.decode_delta(base, delta, out)
    assert not out.exists()

    delta.write_bytes(good)
    with pytest.raises(ChecksumMismatchError) as info:
        snapshots.decode_delta(new, delta, out)  # the wrong base
    assert info.value.tensor is not None
    assert not out.exists()
    assert list(tmp_path.glob(".*tmp")) == [], "no temporary files left behind"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5000),
    dtype=st.sampled_from(["float32", "float16", "int8", "int64", "uint8"]),
    density=st.floats(0.0, 1.0),
    fmt=st.sampled_from(["arc_v2", "rsd1"]),
    chunk=st.integers(1, 700),
    seed=st.integers(0, 2**31),
)
def test_any_update_round_trips(n: int, dtype: str, density: float, fmt: str, chunk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    base = {"t": raw.view(dtype)}
    mask = rng.random(raw.size) < density
    new_raw = np.where(mask, rng.integers(0, 256, size=raw.size, dtype=np.uint8), raw).astype(np.uint8)
    new = {"t": new_raw.view(dtype)}
    blob = snapshots.encode_delta_tensors(base, new, fmt, chunk_elems=chunk)
    out = snapshots.decode_delta_tensors(base, blob)
    np.testing.assert_array_equal(out["t"].view(np.uint8), new_raw)


# -- the store and the chain ---------------------------------------------------------------


def test_store_chain_materializes_and_verifies(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "bucket")
    v0 = checkpoint(0)
    store.save_full("v0", v0)
    steps = [checkpoint(i, step=1e-3 * i, sparse=0.3) for i in (1, 2, 3)]
    parent = "v0"
    for i, t in enumerate(steps, start=1):
        info = store.save_delta(f"v{i}", parent, t, format="rsd1" if i % 2 else "arc_v2")
        assert info.kind == "delta"
        assert info.incremental_snapshot_metadata == {
            "previous_snapshot_identity": parent,
            "compression_format": "rsd1" if i % 2 else "arc_v2",
            "checksum_format": "alder32",
        }
        parent = f"v{i}"
    assert [s.identity for s in store.chain("v3")] == ["v0", "v1", "v2", "v3"]
    out = store.materialize("v3")
    equal(safetensors_torch.load_file(str(out / "model.safetensors")), steps[-1])
    assert store.materialize("v3") == out
    assert store.identities() == ["v0", "v1", "v2", "v3"]


def test_corrupted_delta_never_materializes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.save_full("a", checkpoint(0))
    info = store.save_delta("b", "a", checkpoint(1, step=0.1))
    f = info.path / info.files[0]
    data = bytearray(f.read_bytes())
    data[-50] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises((ChecksumMismatchError, SnapshotCorruptError)):
        store.materialize("b")
    assert not (tmp_path / "materialized" / "b").exists()
    assert [p.name for p in (tmp_path / "materialized").iterdir()] == ["a"]


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 200, "a..b"])
def test_identities_are_path_safe(tmp_path: Path, bad: str) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(ValueError, match="invalid snapshot identity"):
        store.save_full(bad, checkpoint(0))


def test_concurrent_writers_cannot_corrupt_each_other(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    results: list[str] = []

    def write(i: int) -> None:
        try:
            store.save_full("same", checkpoint(i, step=float(i)) if i else checkpoint(0))
            results.append("ok")
        except FileExistsError:
            results.append("exists")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1
    assert results.count("exists") == 3
    store._verify(store.get("same"), store.get("same").path / "model.safetensors")
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["same"]


def test_chain_never_sends_a_delta_without_a_loaded_base(tmp_path: Path) -> None:
    chain = SnapshotChain(SnapshotStore(tmp_path))
    assert chain.save("s0", checkpoint(0)).kind == "full"
    # The base's hot-load failed: the reference SDK would now send a delta
    # with no incremental metadata. We send a full snapshot again.
    chain.mark_failed("s0")
    assert chain.save("s1", checkpoint(1, step=0.1)).kind == "full"
    chain.mark_loaded("s1")
    d = chain.save("s2", checkpoint(2, step=0.1))
    assert d.kind == "delta"
    assert d.parent == "s1"
    chain.mark_failed("s2")  # s1 stays the served snapshot
    assert chain.loaded_identity == "s1"
    assert chain.save("s3", checkpoint(3, step=0.1)).parent == "s1"
    fresh = SnapshotChain(SnapshotStore(tmp_path))
    assert fresh.save("s4", checkpoint(4, step=0.1), checkpoint_type="delta").kind == "full"


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_safetensors_headers_read_names_dtypes_shapes_and_reject_malformed(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    _raw_safetensors(
        good / "model.safetensors",
        b'{"__metadata__":{"x":"1"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}',
        bytes(24),
    )
    assert snapshots.safetensors_headers(good) == {"w": ("F32", (2, 3))}
    for name, header in [
        ("not-json", b"{nope"),
        ("not-object", b"[1,2]"),
        ("no-shape", b'{"w":{"dtype":"F32","data_offsets":[0,0]}}'),
        ("bad-shape", b'{"w":{"dtype":"F32","shape":["x"],"data_offsets":[0,0]}}'),
    ]:
        d = tmp_path / name
        d.mkdir()
        _raw_safetensors(d / "model.safetensors", header)
        with pytest.raises(SnapshotCorruptError, match=r"model\.safetensors") as info:
            snapshots.safetensors_headers(d)
        if name in ("no-shape", "bad-shape"):
            assert '"w"' in str(info.value), "the malformed tensor is named"


def test_safetensors_headers_check_offsets_and_names_and_keep_unknown_dtypes(tmp_path: Path) -> None:
    def header_of(header: bytes, data: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        _raw_safetensors(d / "model.safetensors", header, data)
        return snapshots.safetensors_headers(d)

    with pytest.raises(SnapshotCorruptError, match="data bytes"):
        header_of(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(4))
    with pytest.raises(SnapshotCorruptError, match="twice"):
        header_of(
            b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            bytes(2),
        )
    assert header_of(b'{"s":{"dtype":"F8_E8M0","shape":[4],"data_offsets":[0,4]}}', bytes(4)) == {
        "s": ("F8_E8M0", (4,))
    }


def _recraft_rsd1(blob: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """``blob`` (an rsd1 image) with its JSON header rewritten by ``edit``."""
    n = int.from_bytes(blob[8:16], "little")
    header = json.loads(blob[16 : 16 + n])
    edit(header)
    text = json.dumps(header).encode()
    return blob[:8] + len(text).to_bytes(8, "little") + text + blob[16 + n :]


def _numpy_pair() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    base = {
        "a": rng.standard_normal(3000).astype(np.float32),
        "b": rng.standard_normal(100).astype(np.float32),
    }
    return base, {k: v + np.float32(1) for k, v in base.items()}


@pytest.mark.parametrize("chunk_elems", [2**62, 2**64 - 1, 0])
def test_crafted_rsd1_chunk_sizes_raise_corrupt_not_panic(chunk_elems: int) -> None:
    base, new = _numpy_pair()
    blob = snapshots.encode_delta_tensors(base, new, chunk_elems=1000)
    bad = _recraft_rsd1(blob, lambda h: h.__setitem__("chunk_elems", chunk_elems))
    with pytest.raises(SnapshotCorruptError, match=f"chunk_elems={chunk_elems}"):
        snapshots.decode_delta_tensors(base, bad)


def test_rsd1_refuses_a_tensor_named_twice() -> None:
    base, new = _numpy_pair()
    blob = snapshots.encode_delta_tensors(base, new)
    dup = _recraft_rsd1(blob, lambda h: h["tensors"][1].__setitem__("name", h["tensors"][0]["name"]))
    with pytest.raises(SnapshotCorruptError, match="twice"):
        snapshots.decode_delta_tensors(base, dup)
    with pytest.raises(TensorMismatchError, match="twice"):
        snapshots.encode_delta_tensors(base, [("a", new["a"]), ("a", new["a"])])


def test_materializing_a_crafted_delta_raises_corrupt_naming_the_file(tmp_path: Path) -> None:
    base, new = _numpy_pair()
    store = SnapshotStore(tmp_path)
    store.save_full("a", base)
    info = store.save_delta("b", "a", new)
    delta = info.path / info.files[0]
    delta.write_bytes(_recraft_rsd1(delta.read_bytes(), lambda h: h.__setitem__("chunk_elems", 2**62)))
    with pytest.raises(SnapshotCorruptError) as err:
        store.materialize("b")
    assert err.value.path == str(delta)
    assert not (tmp_path / "materialized" / "b").exists()


def test_encoding_refuses_chunk_sizes_it_cannot_write() -> None:
    base, new = _numpy_pair()
    for bad in (2**62, 2**32, 0):
        with pytest.raises(ValueError, match=f"chunk_elems={bad}"):
            snapshots.encode_delta_tensors(base, new, chunk_elems=bad)
