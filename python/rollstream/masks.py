"""Sampling masks: the support vLLM sampled each token from (after top-k /
top-p), carried to the trainer so it can mask its logits the same way.

With top-k / top-p, vLLM samples from a truncated, renormalised
distribution; a trainer that recomputes logprobs over the full vocabulary
biases every importance ratio. :func:`apply_sampling_mask` sets every logit
outside the kept set to ``fill`` (-inf), so ``log_softmax`` of the masked,
temperature-scaled logits reproduces vLLM's processed logprobs.

Row ``t`` of a mask is the kept set of generated token ``t``; the logits that
predict generated token ``t`` are at position ``prompt_len - 1 + t`` of a
forward pass over ``full_tokens``: pass that as ``start``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = ["SamplingMask", "apply_sampling_mask", "to_dense"]


@dataclass(frozen=True, slots=True)
class SamplingMask:
    """Kept token ids per generated token, in CSR form.

    Row ``t`` (generated token ``t``) keeps ``token_ids[offsets[t]:offsets[t+1]]``.
    ``token_ids`` is int32, ``offsets`` int64 of length ``rows + 1`` starting at 0.
    """

    token_ids: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.token_ids, dtype=np.int32)
        offs = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if ids.ndim != 1 or offs.ndim != 1:
            raise ValueError(f"SamplingMask arrays must be 1-D, got shapes {ids.shape} and {offs.shape}")
        if len(offs) == 0 or offs[0] != 0:
            raise ValueError("SamplingMask offsets must start with 0")
        if offs[-1] != len(ids):
            raise ValueError(
                f"SamplingMask offsets end at {int(offs[-1])} but there are {len(ids)} token ids"
            )
        steps = np.diff(offs)
        if (steps < 0).any():
            raise ValueError(f"SamplingMask offsets decrease at row {int(np.argmax(steps < 0))}")
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "offsets", offs)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> SamplingMask:
        """From one list of kept ids per generated token (vLLM's wire form)."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    @classmethod
    def from_bits(cls, bits: npt.NDArray[np.uint8], vocab_size: int) -> SamplingMask:
        """Inverse of :meth:`to_bits`."""
        dense = np.unpackbits(bits, axis=1, count=vocab_size, bitorder="little").astype(bool)
        return cls.from_dense(dense)

    @classmethod
    def from_dense(cls, dense: npt.NDArray[np.bool_]) -> SamplingMask:
        rows, ids = np.nonzero(dense)
        offsets = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=offsets[1:])
        return cls(ids.astype(np.int32), offsets)

    @property
    def rows(self) -> int:
        """Number of generated tokens covered."""
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.rows

    def row(self, t: int) -> npt.NDArray[np.int32]:
        """Kept ids of generated token ``t``."""
        if not -self.rows <= t < self.rows:
            raise IndexError(f"row {t} out of range for a mask of {self.rows} rows")
        t %= self.rows
        return self.token_ids[self.offsets[t] : self.offsets[t + 1]]

    def sizes(self) -> npt.NDArray[np.int64]:
        """Number of kept ids per row."""
        return np.diff(self.offsets)

    def contains(self, token_ids: Sequence[int] | npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
        """Whether each row keeps the given token (one per row): the sampled
        token is always in its row."""
        tok = np.asarray(token_ids)
        if tok.shape != (self.rows,):
            raise ValueError(f"expected {self.rows} token ids, got shape {tok.shape}")
        row_of = np.repeat(np.arange(self.rows), self.sizes())
        hit = np.zeros(self.rows, dtype=bool)
        hit[row_of[self.token_ids == tok[row_of]]] = True
        return hit

    def to_dense(self, vocab_size: int) -> npt.NDArray[np.bool_]:
        """``[rows, vocab_size]`` booleans, True where kept."""
        return to_dense(self, vocab_size)

    def to_bits(self, vocab_size: int) -> npt.NDArray[np.uint8]:
        """Bit-packed dense form, ``[rows, ceil(vocab_size / 8)]`` (little bit order)."""
        return np.packbits(self.to_dense(vocab_size), axis=1, bitorder="little")


def to_dense(mask: SamplingMask, vocab_size: int) -> npt.NDArray[np.bool_]:
    """``[rows, vocab_size]`` booleans, True where kept (built in Rust)."""
    flat: npt.NDArray[np.bool_] = _core.mask_to_dense(mask.token_ids, mask.offsets, vocab_size)
    return flat.reshape(mask.rows, vocab_size)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _fill_bits(dtype: np.dtype[Any], fill: float) -> int:
    return int(np.array([fill], dtype=dtype).view(f"u{dtype.itemsize}")[0])


def _keep_array(keep: Any, rows: int) -> npt.NDArray[np.int64] | None:
    if keep is None:
        return None
    k = np.asarray(keep.cpu() if _is_torch(keep) else keep, dtype=np.int64).reshape(-1)
    if k.shape != (rows,):
        raise ValueError(f"keep must have one token id per mask row ({rows}), got shape {k.shape}")
    return k


def _apply_numpy(rows2d: np.ndarray, mask: SamplingMask, start: int, fill: float, keep: Any) -> None:
    if rows2d.dtype.kind != "f" and rows2d.dtype.name != "bfloat16":
        raise ValueError(f"logits must be floating point, got {rows2d.dtype}")
    _core.apply_mask_inplace(
        rows2d,
        start,
        mask.token_ids,
        mask.offsets,
        _fill_bits(rows2d.dtype, fill),
        _keep_array(keep, mask.rows),
    )


def _apply_torch_kernel(t: Any, mask: SamplingMask, start: int, fill: float, keep: Any) -> None:
    """CPU tensors without autograd: the Rust kernel on the tensor's memory."""
    import torch

    vocab = t.shape[-1]
    if t.dtype == torch.bfloat16:
        view = t.view(torch.int16).numpy().reshape(-1, vocab)
        bits = int(torch.tensor([fill], dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF
        _core.apply_mask_inplace(
            view, start, mask.token_ids, mask.offsets, bits, _keep_array(keep, mask.rows)
        )
    else:
        _apply_numpy(t.numpy().reshape(-1, vocab), mask, start, fill, keep)


def _torch_keep_mask(
    shape: tuple[int, ...], masks: Sequence[tuple[int, SamplingMask, int, Any]], device: Any
) -> Any:
    """A boolean ``shape`` tensor, True where logits stay: built on the device
    from one host->device transfer of the CSR indices."""
    import torch

    b_idx, r_idx, c_idx = [], [], []
    untouched = np.ones(shape[:-1], dtype=bool)
    vocab = shape[-1]
    for b, mask, start, keep in masks:
        if mask.rows == 0:
            continue
        if start < 0 or start + mask.rows > shape[-2]:
            raise ValueError(f"{mask.rows} mask rows starting at {start} exceed the {shape[-2]} logit rows")
        if mask.rows and (mask.token_ids.min(initial=0) < 0 or mask.token_ids.max(initial=0) >= vocab):
            bad = np.nonzero((mask.token_ids < 0) | (mask.token_ids >= vocab))[0][0]
            row = int(np.searchsorted(mask.offsets, bad, side="right") - 1)
            raise ValueError(
                f"sampling mask row {row}: token id {int(mask.token_ids[bad])} is outside [0, {vocab})"
            )
        rows = np.repeat(np.arange(mask.rows, dtype=np.int64) + start, mask.sizes())
        r_idx.append(rows)
        c_idx.append(mask.token_ids.astype(np.int64))
        b_idx.append(np.full(len(rows), b, dtype=np.int64))
        k = _keep_array(keep, mask.rows)
        if k is not None:
            if (k >= vocab).any():
                row = int(np.argmax(k >= vocab))
                raise ValueError(f"sampling mask row {row}: keep id {int(k[row])} is outside [0, {vocab})")
            sel = k >= 0
            r_idx.append(np.arange(mask.rows, dtype=np.int64)[sel] + start)
            c_idx.append(k[sel])
            b_idx.append(np.full(int(sel.sum()), b, dtype=np.int64))
        untouched[
            (b, slice(start, start + mask.rows)) if len(shape) == 3 else slice(start, start + mask.rows)
        ] = False
    idx = torch.from_numpy(
        np.stack(
            [
                np.concatenate(b_idx or [np.zeros(0, np.int64)]),
                np.concatenate(r_idx or [np.zeros(0, np.int64)]),
                np.concatenate(c_idx or [np.zeros(0, np.int64)]),
            ]
        )
    )
    idx = idx.to(device, non_blocking=True)
    keep_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if len(shape) == 3:
        keep_mask[idx[0], idx[1], idx[2]] = True
    else:
        keep_mask[idx[1], idx[2]] = True
    keep_mask |= torch.from_numpy(untouched).to(device, non_blocking=True).unsqueeze(-1)
    return keep_mask


def apply_sampling_mask(
    logits: Any,
    mask: SamplingMask | Sequence[SamplingMask | None],
    *,
    start: int | Sequence[int] = 0,
    fill: float = float("-inf"),
    keep: Any = None,
    inplace: bool = False,
) -> Any:
    """Set every logit outside the mask's kept ids to ``fill``.

    ``logits``: numpy array or torch tensor (CPU or CUDA; float32, float16,
    bfloat16), shape ``[T, V]`` with one :class:`SamplingMask`, or
    ``[B, T, V]`` with one mask (or None) per sequence. Mask rows map to
    logit rows ``start .. start + rows`` (``start`` per sequence for batches);
    other rows (prompt, padding) are left as they are.

    ``keep``: token ids guaranteed to stay unmasked, one per mask row (e.g.
    the labels, against floating-point boundary cases; -1 for none), or a
    sequence of such per batch entry.

    torch tensors that require grad (or live on an accelerator) go through
    ``masked_fill``: autograd-friendly, masked positions get zero gradient,
    the CSR indices cross to the device in one transfer. Other CPU inputs use
    the multithreaded Rust kernel. Returns the masked logits (the input
    itself when ``inplace=True``).
    """
    if _is_torch(logits):
        return _apply_torch(logits, mask, start, fill, keep, inplace)
    arr = np.asarray(logits)
    if arr.ndim not in (2, 3):
        raise ValueError(f"logits must be [T, V] or [B, T, V], got shape {arr.shape}")
    out = arr if inplace else arr.copy()
    if inplace and not (arr.flags.c_contiguous and arr.flags.writeable):
        raise ValueError("inplace=True needs C-contiguous, writeable logits")
    for b, m, s, k in _per_sequence(out, mask, start, keep):
        if m is not None:
            _apply_numpy(out[b] if out.ndim == 3 else out, m, s, fill, k)
    return out


def _per_sequence(logits: Any, mask: Any, start: Any, keep: Any) -> list[tuple[int, Any, int, Any]]:
    if logits.ndim == 2:
        if not isinstance(mask, SamplingMask):
            raise TypeError(f"[T, V] logits take one SamplingMask, got {type(mask).__name__}")
        if not isinstance(start, (int, np.integer)):
            raise TypeError("[T, V] logits take one int start")
        return [(0, mask, int(start), keep)]
    n = logits.shape[0]
    if isinstance(mask, SamplingMask) or len(mask) != n:
        raise ValueError(f"[B, T, V] logits take a sequence of {n} masks (None to skip a sequence)")
    starts = [int(start)] * n if isinstance(start, (int, np.integer)) else [int(s) for s in start]
    keeps = [None] * n if keep is None else list(keep)
    if len(starts) != n or len(keeps) != n:
        raise ValueError(f"start and keep must have one entry per sequence ({n})")
    return [(b, mask[b], starts[b], keeps[b]) for b in range(n)]


def _apply_torch(logits: Any, mask: Any, start: Any, fill: float, keep: Any, inplace: bool) -> Any:
    import torch

    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [T, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    seqs = _per_sequence(logits, mask, start, keep)
    grad = logits.requires_grad and torch.is_grad_enabled()
    kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if logits.device.type == "cpu" and not grad and logits.dtype in kernel_dtypes:
        out = logits if inplace else logits.clone()
        if not out.is_contiguous():
            raise ValueError("logits must be contiguous")
        for b, m, s, k in seqs:
            if m is not None:
                _apply_torch_kernel(out[b] if out.dim() == 3 else out, m, s, fill, k)
        return out
    keep_mask = _torch_keep_mask(
        tuple(logits.shape), [(b, m, s, k) for b, m, s, k in seqs if m is not None], logits.device
    )
    if inplace:
        return logits.masked_fill_(~keep_mask, fill)
    return logits.masked_fill(~keep_mask, fill)
