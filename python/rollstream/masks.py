"""Sampling masks: the support vLLM sampled each token from (after top-k /
top-p), carried to the trainer so it can mask its logits the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SamplingMask"]


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
            row = int(np.argmax(steps < 0))
            raise ValueError(f"SamplingMask offsets decrease at row {row}")
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "offsets", offs)

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
