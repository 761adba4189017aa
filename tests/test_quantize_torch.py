"""The torch twin against the numpy reference: same codes, same payloads, same decoded values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.quantize import QuantizedTensor, QuantizeError, dequantize, quantize, step_sizes, unpack_codes
from server_runtime.quantize_torch import dequantize_torch, fake_quantize, quantize_torch

PACKED = list(range(1, 9))
# the only tests the suite lets skip (tests/conftest.py): they need a GPU this machine may not have


def _data(seed: int, shape: tuple[int, int] = (48, 97)) -> np.ndarray:
    """Rows of different scales, with values on and one ulp beside a 4-bit grid (boundary cases)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * rng.uniform(0.01, 10, size=(shape[0], 1))).astype(np.float32)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    grid = lo + np.arange(16, dtype=np.float32) * step_sizes(lo[:, 0], hi[:, 0], 4)[:, None]
    x[:, :16] = grid
    x[:, 16:32] = np.nextafter(grid, np.float32(np.inf))
    x[:, 32:48] = np.nextafter(grid, np.float32(-np.inf))
    return np.clip(x, lo, hi)


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _mismatches(a: QuantizedTensor, b: QuantizedTensor) -> int:
    """Codes that differ between two tensors; fails if any differs by more than one code."""
    codes_a = unpack_codes(a.payload, a.bits, a.num_elements).astype(int)
    codes_b = unpack_codes(b.payload, b.bits, b.num_elements).astype(int)
    assert np.abs(codes_a - codes_b).max() <= 1
    return int((codes_a != codes_b).sum())


def _bits_of(values: np.ndarray | torch.Tensor) -> list[int]:
    """float32 values as their bit patterns (so -0.0 != 0.0 and NaN == NaN)."""
    array = values.cpu().numpy() if isinstance(values, torch.Tensor) else values
    return np.ascontiguousarray(array, np.float32).view(np.uint32).reshape(-1).tolist()


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", PACKED)
def test_same_noise_gives_the_reference_codes_and_ranges(bits: int, per: str) -> None:
    # Prepare
    x, noise = _data(bits), _noise((48, 97), bits)
    # Execute
    reference = quantize(x, bits, per=per, noise=noise)
    twin = quantize_torch(torch.from_numpy(x), bits, per=per, noise=torch.from_numpy(noise))
    # Assert: docs/export.md section 6 allows +-1 code on boundary values; on CPU the twin is exact
    assert _mismatches(reference, twin) == 0
    assert twin == reference  # bits, shape, per, lo, hi and the packed payload
    assert twin.lo.dtype == twin.hi.dtype == np.float32


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", PACKED)
def test_deterministic_mode_matches_the_reference(bits: int, per: str) -> None:
    x = _data(10 + bits)
    reference = quantize(x, bits, per=per, stochastic=False)
    twin = quantize_torch(torch.from_numpy(x), bits, per=per, stochastic=False, generator=torch.Generator().manual_seed(3))
    assert _mismatches(reference, twin) == 0 and twin == reference


def test_float64_and_scalar_inputs_match_the_reference() -> None:
    x64 = np.random.default_rng(0).normal(size=(5, 7)) * 1e3
    assert quantize_torch(torch.from_numpy(x64), 5, noise=torch.from_numpy(_noise((5, 7), 1))) == quantize(
        x64, 5, noise=_noise((5, 7), 1)
    )
    scalar = quantize_torch(torch.tensor(2.5), 3, per="token", stochastic=False)
    assert scalar == quantize(np.float32(2.5), 3, per="token", stochastic=False) and scalar.shape == ()


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", [16, 32])
def test_float_payloads_are_byte_identical(bits: int, per: str) -> None:
    # Prepare: signed zeros, subnormals, ties, and the largest values each width can carry
    big = 65504.0 if bits == 16 else 3.4028235e38
    x = np.array([[big, -big, -0.0, 0.0, 1e-45, -1e-40], [6e-8, 65504.0, -65504.0, 1.0 + 2**-11, 0.1, -7.25]], np.float32)
    # Execute
    twin = quantize_torch(torch.from_numpy(x), bits, per=per)
    reference = quantize(x, bits, per=per)
    # Assert
    assert twin == reference and twin.lo.size == 0 and len(twin.payload) == x.size * bits // 8
    assert _bits_of(dequantize_torch(twin)) == _bits_of(dequantize(twin))


def test_both_refuse_values_float16_cannot_carry() -> None:
    x = np.array([1.0, 65520.0], np.float32)  # 65520 would round to inf in float16
    with pytest.raises(QuantizeError, match="cannot travel at 16 bits"):
        quantize(x, 16)
    with pytest.raises(QuantizeError, match="cannot travel at 16 bits"):
        quantize_torch(torch.from_numpy(x), 16)


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", [*PACKED, 16, 32])
def test_dequantize_torch_equals_dequantize_bit_for_bit(bits: int, per: str) -> None:
    # Prepare: a tensor quantized by the reference, as it arrives from a device
    q = quantize(_data(20 + bits), bits, per=per, rng=np.random.default_rng(bits))
    # Execute
    values = dequantize_torch(q)
    # Assert
    assert values.dtype == torch.float32 and tuple(values.shape) == q.shape
    assert _bits_of(values) == _bits_of(dequantize(q))


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", [*PACKED, 16, 32])
def test_fake_quantize_is_dequantize_of_quantize(bits: int, per: str) -> None:
    # Prepare
    x = torch.from_numpy(_data(30 + bits))
    noise = torch.from_numpy(_noise(tuple(x.shape), bits))
    # Execute
    fake = fake_quantize(x, bits, per=per, noise=noise)
    seeded = fake_quantize(x, bits, per=per, generator=torch.Generator().manual_seed(bits))
    # Assert: the same values for the same noise, whether it is given or drawn
    assert _bits_of(fake) == _bits_of(dequantize_torch(quantize_torch(x, bits, per=per, noise=noise)))
    again = dequantize_torch(quantize_torch(x, bits, per=per, generator=torch.Generator().manual_seed(bits)))
    assert _bits_of(seeded) == _bits_of(again)
    if bits <= 8:
        assert not torch.equal(fake, x)


def test_fake_quantize_is_straight_through() -> None:
    # Prepare
    x = torch.linspace(-2, 3, 40, dtype=torch.bfloat16).reshape(4, 10).requires_grad_()
    weight = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    # Execute
    y = fake_quantize(x, 2, per="token", generator=torch.Generator().manual_seed(0))
    (y * weight).sum().backward()
    # Assert: the gradient w.r.t. the quantized output reaches x unchanged
    assert y.dtype == torch.float32 and y.requires_grad
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad.float(), weight)
    assert quantize_torch(x, 2, stochastic=False) == quantize(x.detach().float().numpy(), 2, stochastic=False)


def test_generator_seeds_the_noise() -> None:
    x = torch.from_numpy(_data(0))
    a, b, c = (quantize_torch(x, 3, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert a == b and a.payload != c.payload


def test_the_twin_is_unbiased_over_generator_draws() -> None:
    # Prepare: 2000 draws of 80 values as rows of one per-token batch. Per element the mean
    # error over n draws has sigma sqrt(p(1-p)) delta / sqrt(n); bounds as in test_quantize:
    # 5 sigma element-wise (+ 2 delta / n for float32 rounding on grid points), 4 sigma overall.
    draws, bits = 2000, 3
    x = torch.cat([torch.tensor([-1.0, 2.5]), torch.rand(78, generator=torch.Generator().manual_seed(1)) * 3.5 - 1])
    batch = x.expand(draws, -1)
    # Execute
    errors = fake_quantize(batch, bits, per="token", generator=torch.Generator().manual_seed(2)).double() - x.double()
    # Assert
    delta = float((x.max() - x.min()) / (2**bits - 1))
    scaled = ((x - x.min()) / delta).double()
    sigma = torch.sqrt((scaled - scaled.floor()) * (1 - scaled + scaled.floor())) * delta
    assert torch.all(errors.mean(0).abs() <= 5 * sigma / math.sqrt(draws) + 2 * delta / draws)
    assert abs(float(errors.mean())) <= 4 * float(sigma.square().sum().sqrt()) / (x.numel() * math.sqrt(draws))
    assert float(errors.abs().max()) > delta / 2  # stochastic: not round to nearest


def _error_of(call) -> str:  # type: ignore[no-untyped-def]
    """The QuantizeError message ``call`` raises."""
    with pytest.raises(QuantizeError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(
    ("values", "bits", "per"),
    [
        ([0.0, float("nan")], 4, "tensor"),
        ([0.0, float("inf")], 32, "tensor"),
        ([0.0, 1.0], 0, "tensor"),
        ([0.0, 1.0], 9, "tensor"),
        ([0.0, 1.0], 15, "tensor"),
        ([0.0, 1.0], 33, "tensor"),
        ([0.0, 1.0], True, "tensor"),
        ([0.0, 1.0], 4, "channel"),
        ([], 4, "tensor"),
    ],
)
def test_errors_are_the_reference_errors(values: list[float], bits: int, per: str) -> None:
    x = np.array(values, np.float32)
    expected = _error_of(lambda: quantize(x, bits, per=per))
    assert _error_of(lambda: quantize_torch(torch.from_numpy(x), bits, per=per)) == expected
    assert _error_of(lambda: fake_quantize(torch.from_numpy(x), bits, per=per)) == expected


def test_dequantize_torch_refuses_inconsistent_tensors_like_the_reference() -> None:
    q = quantize(np.ones((3, 4), np.float32), 4, per="token")
    short = QuantizedTensor(4, q.shape, "token", q.lo, q.hi, q.payload[:-1])
    two = QuantizedTensor(4, q.shape, "token", q.lo[:2], q.hi[:2], q.payload)
    for bad in (short, two):
        assert _error_of(lambda: dequantize_torch(bad)) == _error_of(lambda: dequantize(bad))


def test_the_twin_refuses_what_the_reference_lets_through() -> None:
    # Stricter than the reference (reported there as a bug): per is checked at 16/32 bits too,
    # and noise must have x's shape instead of merely reshaping or broadcasting.
    x = torch.ones(2, 3)
    assert "per must be one of" in _error_of(lambda: quantize_torch(x, 32, per="channel"))
    assert "noise must have the shape of x (2, 3), got (3, 2)" in _error_of(lambda: quantize_torch(x, 4, noise=torch.rand(3, 2)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", [*PACKED, 16, 32])
def test_cuda_twin_matches_the_reference(bits: int, per: str) -> None:
    # Prepare
    x, noise = _data(40 + bits, (256, 257)), _noise((256, 257), bits)
    # Execute
    twin = quantize_torch(torch.from_numpy(x).cuda(), bits, per=per, noise=torch.from_numpy(noise).cuda())
    reference = quantize(x, bits, per=per, noise=noise)
    # Assert: at most +-1 code on at most 0.1% of elements (docs/export.md section 6); decode exact
    assert _mismatches(reference, twin) <= x.size // 1000
    assert np.array_equal(twin.lo, reference.lo) and np.array_equal(twin.hi, reference.hi)
    assert _bits_of(dequantize_torch(twin, "cuda")) == _bits_of(dequantize(twin))
    fake = fake_quantize(torch.from_numpy(x).cuda(), bits, per=per, noise=torch.from_numpy(noise).cuda())
    assert fake.is_cuda and _bits_of(fake) == _bits_of(dequantize_torch(twin, "cuda"))
