"""apply_sampling_mask and friends: numpy and torch, batched, autograd,
dense/bit forms, and the error contract. Only the torch tests need torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollstream.masks import SamplingMask, apply_sampling_mask, to_dense
from rollstream.testing import need


def reference(logits: np.ndarray, mask: SamplingMask, start: int, fill: float = -np.inf) -> np.ndarray:
    out = logits.copy()
    for t in range(mask.rows):
        keep = np.zeros(logits.shape[-1], dtype=bool)
        keep[mask.row(t)] = True
        out[start + t, ~keep] = fill
    return out


def random_mask(rng: np.random.Generator, rows: int, vocab: int, k: int) -> SamplingMask:
    return SamplingMask.from_rows(
        [sorted(rng.choice(vocab, size=min(k, vocab), replace=False)) for _ in range(rows)]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_matches_reference(dtype: type) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((10, 300)).astype(dtype)
    mask = random_mask(rng, 6, 300, 17)
    out = apply_sampling_mask(logits, mask, start=3)
    np.testing.assert_array_equal(out, reference(logits, mask, 3))
    assert not np.isinf(logits).any(), "out-of-place by default"
    same = apply_sampling_mask(logits, mask, start=3, inplace=True)
    assert same is logits
    np.testing.assert_array_equal(logits, out)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cpu_kernel_and_autograd_paths_agree(dtype: str) -> None:
    torch = need("torch")
    dt = getattr(torch, dtype)
    rng = np.random.default_rng(1)
    base = torch.randn(8, 500).to(dt)
    mask = random_mask(rng, 5, 500, 40)
    keep = torch.tensor([int(mask.row(t)[0]) for t in range(5)])
    fast = apply_sampling_mask(base, mask, start=2, keep=keep)
    x = base.float().requires_grad_(True)
    slow = apply_sampling_mask(x.to(dt), mask, start=2, keep=keep)
    assert torch.equal(fast.float(), slow.float().detach())
    torch.log_softmax(slow.float()[2:7], -1).sum().backward()
    dense = torch.from_numpy(to_dense(mask, 500))
    assert x.grad is not None
    assert (x.grad[2:7][~dense] == 0).all(), "masked positions get zero gradient"


def test_batched_with_padding_and_per_sequence_starts() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 9, 64)).astype(np.float32)
    masks = [random_mask(rng, 4, 64, 5), None, random_mask(rng, 2, 64, 9)]
    out = apply_sampling_mask(logits, masks, start=[5, 0, 1])
    np.testing.assert_array_equal(out[0], reference(logits[0], masks[0], 5))
    np.testing.assert_array_equal(out[1], logits[1])
    np.testing.assert_array_equal(out[2], reference(logits[2], masks[2], 1))


def test_batched_torch_equals_batched_numpy() -> None:
    torch = need("torch")
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 9, 64)).astype(np.float32)
    masks = [random_mask(rng, 4, 64, 5), None, random_mask(rng, 2, 64, 9)]
    out = apply_sampling_mask(logits, masks, start=[5, 0, 1])
    t = apply_sampling_mask(torch.from_numpy(logits).requires_grad_(True), masks, start=[5, 0, 1])
    np.testing.assert_array_equal(t.detach().numpy(), out)


def test_forms_round_trip() -> None:
    rng = np.random.default_rng(3)
    mask = random_mask(rng, 7, 151936, 512)
    dense = mask.to_dense(151936)
    assert dense.shape == (7, 151936)
    assert dense.sum() == len(mask.token_ids)
    bits = mask.to_bits(151936)
    unpacked = np.unpackbits(bits, axis=1, count=151936, bitorder="little").astype(bool)
    np.testing.assert_array_equal(unpacked, dense)
    assert bits.shape[1] * 8 - 151936 in range(8), "padding is less than one byte"
    back = SamplingMask.from_bits(bits, 151936)
    np.testing.assert_array_equal(back.token_ids, mask.token_ids)
    np.testing.assert_array_equal(back.offsets, mask.offsets)
    assert mask.contains([int(mask.row(t)[-1]) for t in range(7)]).all()


@pytest.mark.parametrize(
    ("ids", "offsets", "fragment"),
    [
        ([1, 70], [0, 1, 2], "row 1: token id 70"),
        ([1, -3], [0, 1, 2], "row 1: token id -3"),
    ],
)
def test_bad_masks_name_the_row_and_write_nothing(ids: list[int], offsets: list[int], fragment: str) -> None:
    logits = np.zeros((4, 64), np.float32)
    mask = SamplingMask(np.array(ids), np.array(offsets))
    with pytest.raises(ValueError, match=fragment):
        apply_sampling_mask(logits, mask, inplace=True)
    assert not np.isinf(logits).any()


def test_bad_masks_raise_the_same_error_on_torch() -> None:
    torch = need("torch")
    mask = SamplingMask(np.array([1, 70]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="row 1: token id 70"):
        apply_sampling_mask(torch.zeros(4, 64, requires_grad=True), mask)


def test_shape_and_type_errors() -> None:
    with pytest.raises(ValueError, match="decrease at row 1"):
        SamplingMask(np.array([1, 2]), np.array([0, 2, 1, 2]))
    m = SamplingMask.from_rows([[1], [2], [3]])
    with pytest.raises(ValueError, match="exceed"):
        apply_sampling_mask(np.zeros((4, 8), np.float32), m, start=2)
    with pytest.raises(ValueError, match="keep must have one token id per mask row"):
        apply_sampling_mask(np.zeros((4, 8), np.float32), m, keep=[1, 2])
    with pytest.raises(ValueError, match="a sequence of 2 masks"):
        apply_sampling_mask(np.zeros((2, 4, 8), np.float32), m)
    with pytest.raises(ValueError, match="floating point"):
        apply_sampling_mask(np.zeros((4, 8), np.int32), m)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 12), vocab=st.integers(1, 80), k=st.integers(1, 80), seed=st.integers(0, 1000))
def test_property_matches_reference(rows: int, vocab: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows + 2, vocab)).astype(np.float32)
    mask = random_mask(rng, rows, vocab, k)
    np.testing.assert_array_equal(apply_sampling_mask(logits, mask, start=1), reference(logits, mask, 1))


def test_dense_forms_check_the_vocabulary_before_allocating() -> None:
    mask = SamplingMask.from_rows([[1], [2]])
    with pytest.raises(ValueError, match="vocab_size=1099511627776"):
        mask.to_dense(2**40)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mask.to_dense(2)
