"""Weight snapshots: checksums, delta codecs, a verified snapshot store and
the trainer's save chain. Loading a snapshot into a running server is
:mod:`rollstream.hotload`.

Codecs (Rust core, GIL released, all cores):

- ``arc_v2``: Fireworks' delta format (XOR + one zstd frame per tensor,
  ``alder32`` checksums); interoperable with ``fireworks-delta-compression``.
- ``rsd1``: rollstream's own format: chunked (parallel, bounded memory),
  bit-pattern differences in byte planes (unchanged exponent bytes compress
  away), sparse chunks as the gaps between changed elements + their planes,
  XXH3 per chunk (corruption and a wrong base are named by tensor and
  chunk), deterministic, no pickle.

Nothing is ever written where a result would live unless the whole result
verified: outputs are written to a temporary file or directory and renamed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import _core
from ._exceptions import ChecksumMismatchError, SnapshotCorruptError

__all__ = [
    "DeltaStats",
    "SnapshotChain",
    "SnapshotInfo",
    "SnapshotStore",
    "adler32",
    "confined",
    "decode_delta",
    "decode_delta_tensors",
    "encode_delta",
    "encode_delta_tensors",
    "safetensors_headers",
    "xxh3_64",
]

DeltaFormat = Literal["arc_v2", "rsd1"]
# Matched with fullmatch: `$` alone also matches before a trailing newline.
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_NUMPY_TO_ST: dict[np.dtype[Any], str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.float32): "F32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float64): "F64",
}
_ST_TO_NUMPY: dict[str, np.dtype[Any]] = {v: k for k, v in _NUMPY_TO_ST.items()}
# Types numpy lacks travel as same-width integers.
_ST_STORAGE: dict[str, np.dtype[Any]] = {
    "BF16": np.dtype(np.uint16),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
}
_TORCH_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "device")


def _tensor_parts(name: str, x: Any) -> tuple[str, str, list[int], np.ndarray]:
    """(name, safetensors dtype, shape, C-contiguous numpy array sharing memory when possible)."""
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {x.device}; move it to the CPU first")
        dtype = _TORCH_NAMES.get(str(x.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {x.dtype}")
        t = x.detach().contiguous()
        storage = _ST_STORAGE.get(dtype)
        if storage is not None:
            import torch

            t = t.view(torch.uint16 if storage.itemsize == 2 else torch.uint8)
        return name, dtype, list(x.shape), t.numpy()
    arr = np.asarray(x)
    if arr.dtype not in _NUMPY_TO_ST:
        raise ValueError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
    return name, _NUMPY_TO_ST[arr.dtype], list(arr.shape), np.ascontiguousarray(arr)


def _parts(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> list[tuple[str, str, list[int], np.ndarray]]:
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [_tensor_parts(str(n), t) for n, t in items]


def _byte_view(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if _is_torch(data):
        return _tensor_parts("data", data)[3]
    raise TypeError(f"expected bytes, a numpy array or a CPU torch tensor, got {type(data).__name__}")


def adler32(data: Any, value: int = 1) -> int:
    """``zlib.adler32(data, value)`` over bytes, numpy arrays or CPU torch
    tensors (their raw little-endian bytes), SIMD and parallel."""
    return _core.adler32(_byte_view(data), value)


def xxh3_64(data: Any) -> int:
    """XXH3-64 of the same bytes :func:`adler32` reads."""
    return _core.xxh3_64(_byte_view(data))


@dataclass(frozen=True)
class DeltaStats:
    tensors: int
    raw_bytes: int
    encoded_bytes: int
    #: Adler-32 of every new tensor (what arc_v2 records).
    adler32: dict[str, int] = field(repr=False)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.encoded_bytes if self.encoded_bytes else float("inf")


def _stats(d: Mapping[str, Any]) -> DeltaStats:
    return DeltaStats(d["tensors"], d["raw_bytes"], d["encoded_bytes"], dict(d["adler32"]))


def encode_delta(
    base_path: str | os.PathLike[str],
    new_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    format: DeltaFormat = "rsd1",
    *,
    level: int = 1,
    chunk_elems: int = 1 << 20,
) -> DeltaStats:
    """Write the delta from ``base_path`` to ``new_path`` (safetensors files)."""
    return _stats(_core.encode_delta_files(base_path, new_path, out_path, format, level, chunk_elems))


def decode_delta(
    base_path: str | os.PathLike[str], delta_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> DeltaStats:
    """Apply a delta (either format, detected) to ``base_path``; the verified
    result is written to ``out_path``. The base is only read."""
    return _stats(_core.decode_delta_files(base_path, delta_path, out_path))


def encode_delta_tensors(
    base: Mapping[str, Any],
    new: Mapping[str, Any],
    format: DeltaFormat = "rsd1",
    *,
    level: int = 1,
    chunk_elems: int = 1 << 20,
) -> bytes:
    """In-memory :func:`encode_delta` on dicts of numpy arrays or CPU tensors."""
    blob, _ = _core.encode_delta_buffers(_parts(base), _parts(new), format, level, chunk_elems)
    return blob


def decode_delta_tensors(base: Mapping[str, Any], delta: bytes | bytearray | memoryview) -> dict[str, Any]:
    """In-memory :func:`decode_delta`. Values come back as torch tensors when
    the base's values are torch tensors, else as numpy arrays (BF16/FP8 as
    same-width unsigned integers, numpy having no such types)."""
    torch_out = any(_is_torch(v) for v in base.values())
    decoded, _ = _core.decode_delta_buffers(_parts(base), _byte_view(delta))
    out: dict[str, Any] = {}
    for name, dtype, shape, raw in decoded:
        np_dtype = _ST_TO_NUMPY.get(dtype) or _ST_STORAGE[dtype]
        arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        if torch_out:
            import torch

            t = torch.from_numpy(arr.copy())
            if dtype == "BF16":
                t = t.view(torch.bfloat16)
            elif dtype.startswith("F8"):
                t = t.view(torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2)
            out[name] = t
        else:
            out[name] = arr
    return out


# -- the store -------------------------------------------------------------------------------------


def check_identity(identity: str) -> str:
    """Snapshot identities are path components: letters, digits, ``._-``,
    starting with a letter or digit; no separators, no ``..``."""
    if not isinstance(identity, str) or not _IDENTITY.fullmatch(identity) or ".." in identity:
        raise ValueError(
            f"invalid snapshot identity {identity!r}: use 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return identity


@dataclass(frozen=True)
class SnapshotInfo:
    """A stored snapshot's manifest."""

    identity: str
    kind: Literal["full", "delta"]
    path: Path
    files: list[str]
    #: name -> {"dtype", "shape", "adler32", "xxh3"} of the full checkpoint it represents.
    tensors: dict[str, dict[str, Any]]
    parent: str | None = None
    #: For deltas, as the reference SDK sends it to the hot-load API.
    incremental_snapshot_metadata: dict[str, str] | None = None
    created: str = ""

    @property
    def nbytes(self) -> int:
        return sum(self.file(i).stat().st_size for i in range(len(self.files)))

    def file(self, index: int = 0) -> Path:
        """The path of ``files[index]``, checked to lie inside the snapshot's
        directory (see :func:`confined`)."""
        return confined(self.path, self.files[index], self.identity)


def confined(directory: Path, name: object, identity: str) -> Path:
    """``directory / name`` if ``name`` is a relative path that stays inside
    ``directory`` once every symlink is resolved; else
    :class:`SnapshotCorruptError`. Manifests are data: a ``files`` entry of
    ``../x``, ``/etc/passwd`` or a symlink out of the store must not make the
    store read (or hot-load) a file outside it."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise SnapshotCorruptError(
            f"manifest of {identity!r} names an invalid file {name!r}", path=str(directory)
        )
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise SnapshotCorruptError(
            f"manifest of {identity!r} names {name!r}, outside its snapshot directory", path=str(directory)
        )
    path = directory / rel
    root = directory.resolve()
    if not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise SnapshotCorruptError(
            f"manifest of {identity!r} names {name!r}, which resolves outside its snapshot directory "
            f"(to {path.resolve()})",
            path=str(path),
        )
    return path


class SnapshotStore:
    """Snapshots in a directory (the "hot-load bucket"):
    ``<root>/snapshots/<identity>/{manifest.json, model.safetensors | delta.*}``
    and materialized full checkpoints in ``<root>/materialized/<identity>/``.

    Snapshots are written into a private temporary directory and published
    by an atomic rename, so concurrent writers cannot corrupt each other (the
    second to publish an identity gets :class:`FileExistsError`) and readers
    never see a partial snapshot.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        (self.root / "materialized").mkdir(parents=True, exist_ok=True)

    def _dir(self, identity: str) -> Path:
        return self.root / "snapshots" / check_identity(identity)

    def __contains__(self, identity: str) -> bool:
        return (self._dir(identity) / "manifest.json").exists()

    def identities(self) -> list[str]:
        """Identities of the published snapshots. Staging (``.tmp-*``) and
        trash (``.trash-*``) directories are never valid identities, so
        in-progress and half-deleted snapshots are not listed."""
        return sorted(
            p.parent.name
            for p in (self.root / "snapshots").glob("*/manifest.json")
            if _IDENTITY.fullmatch(p.parent.name) and ".." not in p.parent.name
        )

    def get(self, identity: str) -> SnapshotInfo:
        d = self._dir(identity)
        try:
            m = json.loads((d / "manifest.json").read_text())
        except FileNotFoundError:
            raise KeyError(f"no snapshot {identity!r} in {self.root}") from None
        except (json.JSONDecodeError, OSError) as e:
            raise SnapshotCorruptError(f"manifest of {identity!r} is unreadable: {e}", path=str(d)) from e
        try:
            info = SnapshotInfo(
                identity=m["identity"],
                kind=m["kind"],
                path=d,
                files=list(m["files"]),
                tensors=dict(m["tensors"]),
                parent=m.get("parent"),
                incremental_snapshot_metadata=m.get("incremental_snapshot_metadata"),
                created=m.get("created", ""),
            )
        except (KeyError, TypeError) as e:
            raise SnapshotCorruptError(f"manifest of {identity!r} lacks {e}", path=str(d)) from e
        if info.identity != identity:
            raise SnapshotCorruptError(
                f"manifest in {identity!r} claims identity {info.identity!r}", path=str(d)
            )
        if not info.files:
            raise SnapshotCorruptError(f"manifest of {identity!r} lists no files", path=str(d))
        for i in range(len(info.files)):
            info.file(i)
        return info

    @contextlib.contextmanager
    def _staging(self, identity: str) -> Iterator[Path]:
        dest = self._dir(identity)
        if dest.exists():
            raise FileExistsError(f"snapshot {identity!r} already exists in {self.root}")
        tmp = self.root / "snapshots" / f".tmp-{identity}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            yield tmp
            try:
                os.rename(tmp, dest)
            except OSError as e:
                raise FileExistsError(f"snapshot {identity!r} was published concurrently: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _write_manifest(d: Path, manifest: dict[str, Any]) -> None:
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def save_full(
        self,
        identity: str,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> SnapshotInfo:
        """Store a full checkpoint (a state dict or an iterator of named tensors)."""
        parts = _parts(tensors)
        with self._staging(identity) as tmp:
            sums = _core.write_safetensors(
                tmp / "model.safetensors", parts, {"format": "pt", **(metadata or {})}
            )
            manifest = {
                "format_version": 1,
                "identity": identity,
                "kind": "full",
                "files": ["model.safetensors"],
                "parent": None,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "tensors": {
                    n: {"dtype": dt, "shape": shape, "adler32": sums[n][0], "xxh3": sums[n][1]}
                    for n, dt, shape, _ in parts
                },
            }
            self._write_manifest(tmp, manifest)
        return self.get(identity)

    def save_delta(
        self,
        identity: str,
        base_identity: str,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        format: DeltaFormat = "rsd1",
        level: int = 1,
    ) -> SnapshotInfo:
        """Store ``tensors`` as a delta against ``base_identity`` (whose full
        checkpoint is materialized and verified first)."""
        base_dir = self.materialize(base_identity)
        parts = _parts(tensors)
        fname = "delta.rsd" if format == "rsd1" else "delta.arc_v2.safetensors"
        with self._staging(identity) as tmp:
            stats = _core.encode_delta_from_file(
                base_dir / "model.safetensors", parts, tmp / fname, format, level
            )
            manifest = {
                "format_version": 1,
                "identity": identity,
                "kind": "delta",
                "files": [fname],
                "parent": base_identity,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "incremental_snapshot_metadata": {
                    "previous_snapshot_identity": base_identity,
                    "compression_format": format,
                    # Sic: the reference's wire spelling.
                    "checksum_format": "alder32",
                },
                "tensors": {
                    n: {"dtype": dt, "shape": shape, "adler32": stats["adler32"][n], "xxh3": None}
                    for n, dt, shape, _ in parts
                },
            }
            self._write_manifest(tmp, manifest)
        return self.get(identity)

    def chain(self, identity: str) -> list[SnapshotInfo]:
        """The snapshots from the nearest full one to ``identity``, in order."""
        out: list[SnapshotInfo] = []
        seen: set[str] = set()
        current: str | None = identity
        while current is not None:
            if current in seen:
                raise SnapshotCorruptError(f"snapshot chain of {identity!r} loops at {current!r}")
            seen.add(current)
            info = self.get(current)
            out.append(info)
            if info.kind == "full":
                return out[::-1]
            current = info.parent
        raise SnapshotCorruptError(f"snapshot chain of {identity!r} has no full snapshot")

    def materialize(self, identity: str) -> Path:
        """The full checkpoint of ``identity`` as a directory holding one
        ``model.safetensors``, rebuilt by walking the chain, every tensor's
        checksum verified, published by atomic rename (idempotent)."""
        dest = self.root / "materialized" / check_identity(identity)
        if (dest / "model.safetensors").exists():
            return dest
        chain = self.chain(identity)
        target = chain[-1]
        tmp = self.root / "materialized" / f".tmp-{identity}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            current = chain[0].file()
            for i, step in enumerate(chain[1:]):
                out = tmp / f"step{i}.safetensors"
                _core.decode_delta_files(current, step.file(), out)
                if current.parent == tmp:
                    current.unlink()
                current = out
            final = tmp / "model.safetensors"
            if current.parent == tmp:
                current.rename(final)
            else:
                # A full snapshot: hard-link when possible (same filesystem), else copy.
                try:
                    os.link(current, final)
                except OSError:
                    shutil.copyfile(current, final)
            self._verify(target, final)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / "model.safetensors").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    @staticmethod
    def _verify(info: SnapshotInfo, path: Path) -> None:
        sums = _core.safetensors_checksums(path)
        if set(sums) != set(info.tensors):
            missing = sorted(set(info.tensors) ^ set(sums))[:5]
            raise ChecksumMismatchError(f"materialized {info.identity!r} has the wrong tensors: {missing}")
        for name, meta in info.tensors.items():
            dtype, shape, adler, xxh = sums[name]
            if dtype != meta["dtype"] or list(shape) != list(meta["shape"]) or adler != meta["adler32"]:
                raise ChecksumMismatchError(
                    f"materialized {info.identity!r}: tensor {name!r} does not match its manifest "
                    f"(adler32 {adler} vs {meta['adler32']})",
                    tensor=name,
                )
            if meta.get("xxh3") is not None and xxh != meta["xxh3"]:
                raise ChecksumMismatchError(
                    f"materialized {info.identity!r}: tensor {name!r} XXH3 mismatch", tensor=name
                )

    def delete(self, identity: str) -> None:
        for d in (self._dir(identity), self.root / "materialized" / check_identity(identity)):
            if d.exists():
                trash = d.with_name(f".trash-{d.name}-{uuid.uuid4().hex[:8]}")
                os.rename(d, trash)
                shutil.rmtree(trash, ignore_errors=True)


class SnapshotChain:
    """The trainer's side of weight sync: decides base vs delta and keeps the
    chain valid.

    Rules (the reference SDK's, with its edge case fixed): the first save is
    a full snapshot (``first_checkpoint_type``); later saves are deltas
    against the *last snapshot that was successfully hot-loaded*. If no
    snapshot has been hot-loaded successfully (e.g. the base's hot-load
    failed), the next save is a full snapshot: a delta is never produced
    without a valid, loaded base.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        compression_format: DeltaFormat = "rsd1",
        first_checkpoint_type: Literal["base", "delta"] = "base",
    ) -> None:
        self.store = store
        self.compression_format = compression_format
        self.first_checkpoint_type = first_checkpoint_type
        self._loaded: str | None = None

    @property
    def loaded_identity(self) -> str | None:
        """The snapshot the deployment is known to serve."""
        return self._loaded

    def next_kind(self) -> Literal["base", "delta"]:
        return "delta" if self._loaded is not None else "base"

    def save(
        self,
        identity: str,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        checkpoint_type: Literal["base", "delta"] | None = None,
    ) -> SnapshotInfo:
        kind = checkpoint_type or self.next_kind()
        if kind == "delta" and self._loaded is None:
            # The reference would send this as a delta without metadata.
            kind = "base"
        if kind == "base":
            return self.store.save_full(identity, tensors)
        assert self._loaded is not None
        return self.store.save_delta(identity, self._loaded, tensors, format=self.compression_format)

    def mark_loaded(self, identity: str) -> None:
        """Record a successful hot-load of ``identity``."""
        self.store.get(identity)
        self._loaded = identity

    def mark_failed(self, identity: str) -> None:
        """Record a failed hot-load: if it was meant to replace the loaded
        snapshot, the chain keeps pointing at what is actually served."""
        if self._loaded == identity:
            self._loaded = None

    def reset(self) -> None:
        self._loaded = None


def safetensors_headers(weights_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` over every ``*.safetensors`` file in
    ``weights_dir``, read from the headers only (the Rust core's one
    safetensors parser, which validates every entry against the file's
    size). Raises :class:`SnapshotCorruptError` naming the file, and the
    tensor when one entry is malformed."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in sorted(weights_dir.glob("*.safetensors")):
        out.update(_core.safetensors_header(f))
    return out
