"""Acceptance tests of the reference (numpy) quantizer, docs/protocol.md section 5."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edge_runtime.quantize import (
    QuantizedTensor,
    QuantizeError,
    dequantize,
    pack_codes,
    quantize,
    step_sizes,
    unpack_codes,
)

DRAWS = 4000
STAT_BITS = (1, 2, 4, 8)


def _probe(bits: int) -> np.ndarray:
    """~300 values over [-1.3, 2.9]: lo, hi, grid points, midpoints and random values."""
    lo, hi = np.float32(-1.3), np.float32(2.9)
    delta = step_sizes(np.array([lo]), np.array([hi]), bits)[0]
    k = np.arange(min(2**bits, 32), dtype=np.float32)
    grid = lo + k * delta
    middles = lo + (k[:-1] + np.float32(0.5)) * delta
    uniform = np.random.default_rng(1).uniform(lo, hi, 240).astype(np.float32)
    return np.concatenate([[lo, hi], grid, middles, uniform]).astype(np.float32)


def _draws(x: np.ndarray, bits: int, noise: np.ndarray | None = None) -> tuple[np.ndarray, np.float32]:
    """Errors Q(x) - x (float64) of DRAWS independent draws, one per row, and delta."""
    batch = np.broadcast_to(x, (DRAWS, x.size))  # per token: every row has x's range
    q = quantize(batch, bits, per="token", rng=np.random.default_rng(bits), noise=noise)
    assert np.all(q.lo == x.min()) and np.all(q.hi == x.max())
    return dequantize(q).astype(np.float64) - x.astype(np.float64), step_sizes(q.lo[:1], q.hi[:1], bits)[0]


def _fraction(x: np.ndarray, delta: np.float32) -> np.ndarray:
    """p: the fractional part of the float32 (x - lo) / delta the quantizer floors."""
    scaled = ((x - x.min()) / delta).astype(np.float64)
    return scaled - np.floor(scaled)


def _unbiased(errors: np.ndarray, p: np.ndarray, delta: float) -> bool:
    """Whether mean errors lie within their confidence bounds (see the test for the bounds)."""
    sigma = np.sqrt(p * (1 - p)) * delta  # one draw: Q(x) - x is (1-p)delta w.p. p, -p delta else
    per_element = np.abs(errors.mean(axis=0)) <= 5 * sigma / math.sqrt(DRAWS) + 2 * delta / DRAWS
    aggregate_sigma = math.sqrt((sigma**2).sum()) / (p.size * math.sqrt(DRAWS))
    return bool(per_element.all()) and abs(errors.mean()) <= 4 * aggregate_sigma


@pytest.mark.parametrize("bits", STAT_BITS)
def test_stochastic_quantization_is_unbiased(bits: int) -> None:
    # Prepare: per element, Q(x) - x has mean 0 and variance p(1-p) delta^2, p = frac((x-lo)/delta).
    # The mean over n draws has sigma sqrt(p(1-p)) delta / sqrt(n). Bounds: element-wise 5 sigma
    # (~300 elements x 4 bit-widths: a 4-sigma miss somewhere would be likely by chance alone)
    # plus 2 delta / n, since float32 rounding of scaled + u can flip an on-grid draw (p = 0,
    # sigma = 0) with probability ~2^-17; over all elements the mean is within 4 aggregate sigma.
    x = _probe(bits)
    # Execute
    errors, delta = _draws(x, bits)
    truncated, _ = _draws(x, bits, noise=np.zeros((DRAWS, x.size), np.float32))
    # Assert: unbiased, and the same bounds do reject a biased quantizer (plain truncation)
    p = _fraction(x, delta)
    assert _unbiased(errors, p, float(delta))
    assert not _unbiased(truncated, p, float(delta))
    assert np.abs(errors).max() <= delta * (1 + 1e-5)


@pytest.mark.parametrize("bits", STAT_BITS)
def test_expected_squared_error_is_p_one_minus_p_delta_squared(bits: int) -> None:
    # Prepare: e = Q(x) - x takes (1-p)delta w.p. p and -p delta w.p. 1-p, so
    # E e^2 = p(1-p) delta^2 <= delta^2 / 4 and Var e^2 = E e^4 - (E e^2)^2. The sum over the d
    # elements, averaged over n draws, has standard deviation sqrt(sum Var e^2 / n): the
    # statistical allowance is 4 of those.
    x = _probe(bits)
    # Execute
    errors, delta = _draws(x, bits)
    # Assert
    p, d2 = _fraction(x, delta), float(delta) ** 2
    expected = (p * (1 - p) * d2).sum()
    fourth = ((1 - p) * p**4 + p * (1 - p) ** 4) * d2**2
    allowance = 4 * math.sqrt((fourth - (p * (1 - p) * d2) ** 2).sum() / DRAWS)
    measured = (errors**2).sum(axis=1).mean()
    assert abs(measured - expected) <= allowance + 1e-9 * expected
    assert measured <= x.size * d2 / 4 + allowance
    assert expected < 0.9 * x.size * d2 / 4  # the probe is not all midpoints: the bound is not trivially tight


@pytest.mark.parametrize("bits", STAT_BITS)
def test_midpoints_reach_the_variance_bound_exactly(bits: int) -> None:
    # Prepare: at a midpoint (p = 1/2) either code is delta/2 away, whatever the noise
    lo, delta = np.float32(-1.0), np.float32(0.0625)  # exact in float32: (hi - lo) / (2^q - 1)
    k = np.arange(2**bits - 1, dtype=np.float32)
    x = np.concatenate([[lo, lo + (2**bits - 1) * delta], lo + (k + np.float32(0.5)) * delta]).astype(np.float32)
    # Execute
    errors, measured_delta = _draws(x, bits)
    # Assert
    assert measured_delta == delta
    np.testing.assert_allclose((errors[:, 2:] ** 2).sum(axis=1), (x.size - 2) * float(delta) ** 2 / 4, rtol=1e-6)
    assert np.all(errors[:, :2] == 0)


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_deterministic_mode_rounds_to_the_nearest_grid_point(bits: int, per: str) -> None:
    # Prepare
    x = np.random.default_rng(bits).normal(size=(6, 50)).astype(np.float32) * np.float32(3)
    # Execute
    first = quantize(x, bits, per=per, stochastic=False, rng=np.random.default_rng(1))
    again = quantize(x, bits, per=per, stochastic=False, rng=np.random.default_rng(2))
    # Assert: identical, on the grid, and at most delta/2 (+ float32 rounding) from x
    assert first == again
    rows = x.reshape(first.num_groups, -1)
    delta = step_sizes(first.lo, first.hi, bits)[:, None].astype(np.float64)
    decoded = dequantize(first).reshape(rows.shape).astype(np.float64)
    error = np.abs(decoded - rows)
    assert np.all(error <= delta / 2 * (1 + 1e-5) + 1e-6)
    on_grid = (decoded - first.lo[:, None]) / delta
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-3)
    assert error.max() > delta.min() / 4  # it does quantize


def test_32_bits_round_trip_bit_exactly() -> None:
    # Prepare: extremes, signed zeros, subnormals
    x = np.array([1e38, -1e38, 3.4028235e38, -0.0, 0.0, 1e-45, -1e-40, 1.1754944e-38, 0.1, -7.25], np.float32)
    # Execute
    q = quantize(x, 32)
    # Assert
    assert q.payload == x.astype("<f4").tobytes() and q.lo.size == 0 and q.hi.size == 0
    assert dequantize(q).view(np.uint32).tolist() == x.view(np.uint32).tolist()


def test_16_bits_equals_a_float16_cast() -> None:
    # Prepare: in-range values, float16 subnormals and round-to-even ties
    x = np.array([[65504.0, -65504.0, 6e-8, -3e-5, 0.1, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -0.0]], np.float32)
    # Execute
    q = quantize(x, 16, per="token")
    # Assert
    assert q.payload == x.astype("<f2").tobytes() and len(q.payload) == 2 * x.size
    assert dequantize(q).view(np.uint32).tolist() == x.astype(np.float16).astype(np.float32).view(np.uint32).tolist()


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 7), (1001,), (13, 77)])
@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_size_is_ceil_d_q_over_8_plus_two_floats_per_group(bits: int, shape: tuple[int, ...]) -> None:
    # Prepare
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    d = math.prod(shape)
    # Execute
    per_tensor, per_token = quantize(x, bits), quantize(x, bits, per="token")
    # Assert
    for q, groups in ((per_tensor, 1), (per_token, math.prod(shape[:-1]))):
        assert len(q.payload) == math.ceil(d * bits / 8)
        assert q.lo.dtype == q.hi.dtype == np.float32 and q.lo.shape == q.hi.shape == (groups,)
        assert len(q.payload) + q.lo.nbytes + q.hi.nbytes == math.ceil(d * bits / 8) + 8 * groups


def _reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Independent packer: the low ``bits`` of each code, MSB first, one continuous stream."""
    stream = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(stream.reshape(-1)).tobytes()


@pytest.mark.parametrize("size", [1, 7, 8, 9, 1001])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_match_an_independent_msb_first_packer(bits: int, size: int) -> None:
    # Prepare
    codes = np.random.default_rng(size * 10 + bits).integers(0, 2**bits, size).astype(np.uint8)
    codes[-1] = 2**bits - 1
    # Execute
    packed = pack_codes(codes, bits)
    # Assert
    assert packed == _reference_pack(codes, bits)
    np.testing.assert_array_equal(unpack_codes(packed, bits, size), codes)


def test_pack_layout_by_hand() -> None:
    # 3 bits, codes 1, 2, 3: 001 010 011 -> 00101001 1(0000000)
    assert pack_codes(np.array([1, 2, 3], np.uint8), 3) == bytes([0b00101001, 0b10000000])
    assert pack_codes(np.array([5], np.uint8), 7) == bytes([0b00001010])


def test_same_seed_same_payload_different_seed_different_payload() -> None:
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    a, b, c = (quantize(x, 3, rng=np.random.default_rng(s)) for s in (7, 7, 8))
    assert a == b
    assert a.payload != c.payload


def test_injected_noise_gives_floor_of_scaled_plus_noise() -> None:
    # Prepare: q = 2 over [0, 3] gives delta = 1, so scaled = x
    x = np.array([0.0, 0.3, 1.0, 2.6, 3.0], np.float32)
    noise = np.array([0.5, 0.75, 0.1, 0.3, 0.9], np.float32)
    # Execute
    q = quantize(x, 2, noise=noise)
    # Assert: floor([0.5, 1.05, 1.1, 2.9, 3.9]) = [0, 1, 1, 2, 3 (clipped from 3)]
    np.testing.assert_array_equal(unpack_codes(q.payload, 2, 5), [0, 1, 1, 2, 3])
    assert q.payload == bytes([0b00010110, 0b11000000])
    np.testing.assert_array_equal(dequantize(q), [0.0, 1.0, 1.0, 2.0, 3.0])


def test_injected_noise_with_a_non_unit_step() -> None:
    # q = 1 over [-1, 1]: delta = 2, scaled = [0, 0.5, 1]
    x = np.array([-1.0, 0.0, 1.0], np.float32)
    low = quantize(x, 1, noise=np.array([0.9, 0.49, 0.0], np.float32))
    high = quantize(x, 1, noise=np.array([0.9, 0.5, 0.0], np.float32))
    np.testing.assert_array_equal(dequantize(low), [-1.0, -1.0, 1.0])
    np.testing.assert_array_equal(dequantize(high), [-1.0, 1.0, 1.0])


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("per", ["tensor", "token"])
def test_a_constant_tensor_decodes_exactly_to_the_constant(per: str, stochastic: bool) -> None:
    x = np.full((4, 5), 2.7, np.float32)
    q = quantize(x, 4, per=per, stochastic=stochastic)
    assert np.all(q.lo == q.hi)
    np.testing.assert_array_equal(unpack_codes(q.payload, 4, x.size), np.zeros(x.size))
    assert np.array_equal(dequantize(q), x)


def test_a_constant_row_decodes_exactly_per_token() -> None:
    x = np.stack([np.full(9, -0.3, np.float32), np.linspace(-1, 1, 9, dtype=np.float32)])
    decoded = dequantize(quantize(x, 2, per="token", rng=np.random.default_rng(0)))
    assert np.array_equal(decoded[0], x[0]) and not np.array_equal(decoded[1], x[1])


def test_per_token_ranges_are_row_extremes_and_beat_per_tensor_on_mixed_scales() -> None:
    # Prepare: rows with scales 1e-3, 1 and 1e3
    rng = np.random.default_rng(0)
    scales = np.array([1e-3, 1.0, 1e3], np.float32)[:, None, None]
    x = (rng.normal(size=(3, 4, 128)) * scales).astype(np.float32)
    # Execute
    token = quantize(x, 4, per="token", rng=np.random.default_rng(1))
    tensor = quantize(x, 4, per="tensor", rng=np.random.default_rng(1))
    # Assert
    np.testing.assert_array_equal(token.lo, x.reshape(12, -1).min(axis=1))
    np.testing.assert_array_equal(token.hi, x.reshape(12, -1).max(axis=1))
    assert tensor.lo.tolist() == [x.min()] and tensor.hi.tolist() == [x.max()]
    token_sq = ((dequantize(token) - x).astype(np.float64) ** 2).sum(axis=(1, 2))
    tensor_sq = ((dequantize(tensor) - x).astype(np.float64) ** 2).sum(axis=(1, 2))
    assert np.all(token_sq[:2] < 1e-4 * tensor_sq[:2])
    assert token_sq.sum() < 0.6 * tensor_sq.sum()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad: float) -> None:
    x = np.array([0.0, bad, 1.0], np.float32)
    for bits in (4, 32):
        with pytest.raises(QuantizeError, match="NaN or inf"):
            quantize(x, bits)


@pytest.mark.parametrize("bits", [0, 9, 15, 33, -1, True, 4.0, "8"])
def test_unsupported_bits_are_refused(bits: object) -> None:
    with pytest.raises(QuantizeError, match=r"bits must be one of 1\.\.8, 16, 32, got " + re.escape(repr(bits))):
        quantize(np.ones(3, np.float32), bits)  # type: ignore[arg-type]


def test_a_numpy_integer_bit_width_is_accepted_as_an_int() -> None:
    # Execute
    q = quantize(np.ones(3, np.float32), np.int64(4))  # type: ignore[arg-type]

    # Assert
    assert q.bits == 4 and type(q.bits) is int


@pytest.mark.parametrize("bits", [0, 9, 16, 32])
def test_only_packed_widths_are_packed(bits: int) -> None:
    with pytest.raises(QuantizeError, match=rf"only 1\.\.8-bit codes are packed, got {bits}"):
        pack_codes(np.zeros(3, np.uint8), bits)
    with pytest.raises(QuantizeError, match=rf"only 1\.\.8-bit codes are packed, got {bits}"):
        unpack_codes(b"\x00", bits, 3)


def test_unknown_granularity_is_refused() -> None:
    with pytest.raises(QuantizeError, match=r"per must be one of \('tensor', 'token'\), got 'channel'"):
        quantize(np.ones((2, 3), np.float32), 4, per="channel")


# At 16 and 32 bits too, the granularity is validated.
@pytest.mark.parametrize("bits", [16, 32])
def test_unknown_granularity_is_refused_at_float_bits(bits: int) -> None:
    with pytest.raises(QuantizeError, match="per must be one of"):
        quantize(np.ones((2, 3), np.float32), bits, per="channel")


def test_an_empty_tensor_is_refused() -> None:
    for bits in (4, 16):
        with pytest.raises(QuantizeError, match=r"empty tensor of shape \(0, 3\)"):
            quantize(np.zeros((0, 3), np.float32), bits)


def test_dequantize_refuses_a_payload_of_the_wrong_length() -> None:
    q = quantize(np.arange(10, dtype=np.float32), 3)
    short = QuantizedTensor(3, q.shape, q.per, q.lo, q.hi, q.payload[:-1])
    with pytest.raises(QuantizeError, match="10 values at 3 bits need 4 payload bytes, got 3"):
        dequantize(short)
    with pytest.raises(QuantizeError, match="need 4 bytes, got 5"):
        unpack_codes(q.payload + b"\0", 3, 10)


def test_dequantize_refuses_the_wrong_number_of_ranges() -> None:
    q = quantize(np.ones((3, 4), np.float32), 4, per="token")
    two = QuantizedTensor(4, q.shape, "token", q.lo[:2], q.hi[:2], q.payload)
    as_tensor = QuantizedTensor(4, q.shape, "tensor", q.lo, q.hi, q.payload)
    floats = quantize(np.ones(4, np.float32), 32)
    ranged = QuantizedTensor(32, floats.shape, "tensor", np.zeros(1, np.float32), np.ones(1, np.float32), floats.payload)
    for bad, groups in ((two, 3), (as_tensor, 1), (ranged, 0)):
        with pytest.raises(QuantizeError, match=f"needs {groups} ranges"):
            dequantize(bad)


def test_a_range_wider_than_float32_can_represent_is_refused() -> None:
    # hi - lo would overflow to inf and every value would decode to NaN (0 * inf): refuse.
    x = np.array([-2e38, 0.0, 2e38], np.float32)
    with pytest.raises(QuantizeError, match="wider than float32"):
        quantize(x, 8, stochastic=False)
    bad = QuantizedTensor(8, (3,), "tensor", np.array([-2e38], np.float32), np.array([2e38], np.float32), b"\0\0\0")
    with pytest.raises(QuantizeError, match="wider than float32"):
        dequantize(bad)
