"""Checksums, delta codecs (with the reference package as a real peer), the
snapshot store and the trainer-side chain.

Everything here runs on numpy and rollstream alone; the tests of torch
tensors (bfloat16 included) and of the reference package import them
where they are used (rollstream.testing.need). Files are written and read
back with the small reference safetensors codec below, not with rollstream,
so each round trip also checks the format."""

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
from rollstream.testing import need

Checkpoint = dict[str, np.ndarray]

# -- a reference safetensors codec (the format in 20 lines, independent of rollstream) ------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "U8": np.uint8}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def save(path: Path, tensors: Checkpoint) -> Path:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def load(path: Path) -> Checkpoint:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    return {
        name: np.frombuffer(data[m["data_offsets"][0] : m["data_offsets"][1]], _DTYPES[m["dtype"]]).reshape(
            m["shape"]
        )
        for name, m in header.items()
        if name != "__metadata__"
    }


def checkpoint(seed: int, *, step: float = 0.0, sparse: float = 1.0) -> Checkpoint:
    """A small model-like checkpoint; ``step`` > 0 updates a fraction
    ``sparse`` of every float tensor and shifts the integer one by ``seed``."""
    g = np.random.default_rng(0)
    base = {
        "model.embed_tokens.weight": g.standard_normal((300, 64), dtype=np.float32),
        "model.layers.0.mlp.up_proj.weight": g.standard_normal((128, 64), dtype=np.float32),
        "model.norm.weight": np.ones(64, np.float32),
        "half.weight": g.standard_normal((256, 32)).astype(np.float16),
        "step": np.array([7], dtype=np.int64),
    }
    if step == 0.0:
        return base
    g2 = np.random.default_rng(seed)
    out = {}
    for k, v in base.items():
        if v.dtype.kind == "f":
            keep = g2.random(v.shape) >= sparse
            upd = v.astype(np.float32) + step * g2.standard_normal(v.shape)
            out[k] = np.where(keep, v, upd).astype(v.dtype)
        else:
            out[k] = v + seed
    return out


def equal(a: Checkpoint, b: Checkpoint) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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
    assert snapshots.adler32(f32.T) == zlib.adler32(np.ascontiguousarray(f32.T).tobytes())
    assert snapshots.adler32(memoryview(b"abc")) == zlib.adler32(b"abc")
    assert snapshots.xxh3_64(b"abc") == snapshots.xxh3_64(bytearray(b"abc")) != snapshots.xxh3_64(b"abd")
    with pytest.raises(TypeError, match="got str"):
        snapshots.adler32("text")  # type: ignore[arg-type]


def test_adler32_of_torch_tensors_reads_their_raw_bytes() -> None:
    torch = need("torch")
    bf = torch.randn(100, 7).to(torch.bfloat16)
    assert snapshots.adler32(bf) == zlib.adler32(bf.view(torch.int16).numpy().tobytes())
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
    assert stats.tensors == len(new_t)
    assert stats.raw_bytes == sum(v.nbytes for v in new_t.values())
    assert stats.encoded_bytes == (tmp_path / "d").stat().st_size
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    dstats = snapshots.decode_delta(base, tmp_path / "d", tmp_path / "out.safetensors")
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before, "the base is never modified"
    equal(load(tmp_path / "out.safetensors"), new_t)
    assert dstats.adler32 == stats.adler32 == {k: zlib.adler32(v.tobytes()) for k, v in new_t.items()}


@pytest.mark.parametrize("fmt", ["arc_v2", "rsd1"])
def test_in_memory_round_trip(fmt: str) -> None:
    base, new = checkpoint(0), checkpoint(2, step=0.01)
    equal(snapshots.decode_delta_tensors(base, snapshots.encode_delta_tensors(base, new, fmt)), new)


@pytest.mark.parametrize("fmt", ["arc_v2", "rsd1"])
def test_in_memory_round_trip_of_torch_tensors_keeps_bfloat16(fmt: str) -> None:
    torch = need("torch")
    base = {k: torch.from_numpy(v) for k, v in checkpoint(0).items()}
    base["bf16.weight"] = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    new = {k: v + 1 if k != "bf16.weight" else (v.float() * 1.01).to(torch.bfloat16) for k, v in base.items()}
    out = snapshots.decode_delta_tensors(base, snapshots.encode_delta_tensors(base, new, fmt))
    assert out.keys() == new.keys()
    for k in new:
        assert out[k].dtype == new[k].dtype, k
        assert torch.equal(out[k], new[k]), k


def test_our_arc_v2_decodes_with_the_reference_and_theirs_with_ours(tmp_path: Path) -> None:
    torch = need("torch")
    fdc = need("fireworks_delta_compression.compression")
    base_np, new_np = checkpoint(0), checkpoint(3, step=1e-2)
    base = save(tmp_path / "base.safetensors", base_np)
    new = save(tmp_path / "new.safetensors", new_np)
    snapshots.encode_delta(base, new, tmp_path / "ours.safetensors", "arc_v2")
    theirs_decoded = fdc.delta_decompress_dict_from_file(
        src={k: torch.from_numpy(v) for k, v in base_np.items()},
        diff_file=str(tmp_path / "ours.safetensors"),
        compression_format="arc_v2",
    )
    equal({k: v.numpy() for k, v in theirs_decoded.items()}, new_np)
    fdc.delta_compress_files_to_file(
        src=str(base),
        dst=str(new),
        diff_file=str(tmp_path / "theirs.safetensors"),
        compression_format="arc_v2",
    )
    snapshots.decode_delta(base, tmp_path / "theirs.safetensors", tmp_path / "out.safetensors")
    equal(load(tmp_path / "out.safetensors"), new_np)


def test_mismatches_are_named(tmp_path: Path) -> None:
    base = checkpoint(0)
    renamed = dict(checkpoint(1, step=0.1))
    renamed["other"] = renamed.pop("model.norm.weight")
    with pytest.raises(TensorMismatchError) as info:
        snapshots.encode_delta_tensors(base, renamed)
    assert info.value.tensor == "other"
    reshaped = dict(checkpoint(1, step=0.1))
    reshaped["model.norm.weight"] = np.ones((8, 8), np.float32)
    with pytest.raises(TensorMismatchError, match=r"model\.norm\.weight"):
        snapshots.encode_delta_tensors(base, reshaped, "arc_v2")
    retyped = dict(checkpoint(1, step=0.1))
    retyped["model.norm.weight"] = retyped["model.norm.weight"].astype(np.float64)
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
        fmt = "rsd1" if i % 2 else "arc_v2"
        info = store.save_delta(f"v{i}", parent, t, format=fmt)
        assert info.kind == "delta"
        assert info.incremental_snapshot_metadata == {
            "previous_snapshot_identity": parent,
            "compression_format": fmt,
            "checksum_format": "alder32",
        }
        parent = f"v{i}"
    assert [s.identity for s in store.chain("v3")] == ["v0", "v1", "v2", "v3"]
    out = store.materialize("v3")
    equal(load(out / "model.safetensors"), steps[-1])
    assert store.materialize("v3") == out
    assert store.identities() == ["v0", "v1", "v2", "v3"]


def test_torch_state_dicts_are_stored_and_materialized_bit_exact(tmp_path: Path) -> None:
    torch = need("torch")
    g = torch.Generator().manual_seed(0)
    v0 = {"w": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b": torch.randn(32, generator=g)}
    v1 = {k: (v.float() + 0.01).to(v.dtype) for k, v in v0.items()}
    store = SnapshotStore(tmp_path)
    store.save_full("v0", v0)
    store.save_delta("v1", "v0", v1)
    out = load_with_bf16(store.materialize("v1") / "model.safetensors")
    for k, v in v1.items():
        np.testing.assert_array_equal(
            out[k], v.view(torch.int16).numpy().view(np.uint16) if k == "w" else v.numpy()
        )


def load_with_bf16(path: Path) -> Checkpoint:
    """:func:`load`, with BF16 tensors as their uint16 bit patterns."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    dtypes = {**_DTYPES, "BF16": np.uint16}
    return {
        k: np.frombuffer(
            raw[8 + n + m["data_offsets"][0] : 8 + n + m["data_offsets"][1]], dtypes[m["dtype"]]
        ).reshape(m["shape"])
        for k, m in header.items()
        if k != "__metadata__"
    }


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
    written = [checkpoint(i, step=float(i)) if i else checkpoint(0) for i in range(4)]
    results: dict[int, str] = {}

    def write(i: int) -> None:
        try:
            store.save_full("same", written[i])
            results[i] = "ok"
        except FileExistsError:
            results[i] = "exists"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [i for i, r in results.items() if r == "ok"]
    assert sorted(results.values()) == ["exists"] * 3 + ["ok"]
    equal(load(store.get("same").file()), written[winner])
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


def _store_with_delta(tmp_path: Path) -> tuple[SnapshotStore, Path]:
    base, new = _numpy_pair()
    store = SnapshotStore(tmp_path / "bucket")
    store.save_full("a", base)
    info = store.save_delta("b", "a", new)
    return store, info.path / "manifest.json"


@pytest.mark.parametrize("name", ["../a/manifest.json", "/etc/passwd", "", ".", "x/../../y", "link"])
def test_manifest_files_are_confined_to_their_snapshot(tmp_path: Path, name: str) -> None:
    store, manifest = _store_with_delta(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not yours")
    (manifest.parent / "link").symlink_to(outside)
    m = json.loads(manifest.read_text())
    m["files"] = [name]
    manifest.write_text(json.dumps(m))
    with pytest.raises(SnapshotCorruptError, match="manifest of 'b'"):
        store.get("b")
    with pytest.raises(SnapshotCorruptError):
        store.materialize("b")
    assert outside.read_bytes() == b"not yours"
    assert not (tmp_path / "bucket" / "materialized" / "b").exists()


def test_a_symlink_inside_the_snapshot_is_fine(tmp_path: Path) -> None:
    store, manifest = _store_with_delta(tmp_path)
    (manifest.parent / "alias").symlink_to(manifest.parent / "delta.rsd")
    m = json.loads(manifest.read_text())
    m["files"] = ["alias"]
    manifest.write_text(json.dumps(m))
    assert store.get("b").file() == manifest.parent / "alias"
    assert (store.materialize("b") / "model.safetensors").exists()


def test_a_manifest_claiming_another_identity_is_corrupt(tmp_path: Path) -> None:
    store, manifest = _store_with_delta(tmp_path)
    m = json.loads(manifest.read_text())
    m["identity"] = "a"
    manifest.write_text(json.dumps(m))
    with pytest.raises(SnapshotCorruptError, match="claims identity 'a'"):
        store.get("b")


@pytest.mark.parametrize("bad", ["v1\n", "v1\r", "v1 ", "\nv1", "v1\x00"])
def test_identities_match_as_a_whole_string(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid snapshot identity"):
        snapshots.check_identity(bad)


def test_identities_lists_only_published_snapshots(tmp_path: Path) -> None:
    store, _ = _store_with_delta(tmp_path)
    snaps = tmp_path / "bucket" / "snapshots"
    for leftover in (".tmp-c-0123456789ab", ".trash-a-01234567"):
        (snaps / leftover).mkdir()
        (snaps / leftover / "manifest.json").write_text("{}")
    assert store.identities() == ["a", "b"]
    with store._staging("c") as staging:
        (staging / "manifest.json").write_text("{}")
        assert store.identities() == ["a", "b"], "a snapshot being written is not listed"
