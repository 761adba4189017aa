"""The torch twin of the reference quantizer, for server-side gradients and simulation.

Same formulas and float32 operation order as ``edge_runtime.quantize`` (the reference), computed
on the input's device; codes are packed with the reference packer, so payloads are
byte-identical to the numpy ones for the same noise. Every division uses a divisor tensor on the
input's device: CUDA turns a division by a CPU scalar into a multiplication by its reciprocal,
which is not bit-exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import FunctionCtx

from edge_runtime.quantize import (
    FLOAT_BITS,
    QuantizedTensor,
    QuantizeError,
    check_bits,
    check_consistent,
    num_groups,
    pack_codes,
    unpack_codes,
)

_TORCH_FLOATS = {16: torch.float16, 32: torch.float32}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def quantize_torch(
    x: torch.Tensor,
    bits: int,
    *,
    per: str = "tensor",
    generator: torch.Generator | None = None,
    stochastic: bool = True,
    noise: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize and pack ``x`` like ``edge_runtime.quantize.quantize``; ``noise`` replaces ``generator``."""
    bits, x = _checked(x, bits, per)
    shape = tuple(int(s) for s in x.shape)
    if bits in FLOAT_BITS:
        values = x.to(_TORCH_FLOATS[bits]).cpu().numpy().astype(FLOAT_BITS[bits])
        empty = np.empty(0, np.float32)
        return QuantizedTensor(bits, shape, per, empty, empty, values.tobytes())
    codes, lo, hi = _encode(x, bits, per, _offset(x, stochastic, generator, noise))
    packed = pack_codes(codes.to(torch.uint8).reshape(-1).cpu().numpy(), bits)
    return QuantizedTensor(bits, shape, per, lo.cpu().numpy(), hi.cpu().numpy(), packed)


def dequantize_torch(q: QuantizedTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 values ``q`` stands for, bit for bit those of ``edge_runtime.quantize.dequantize``."""
    check_consistent(q)
    if q.bits in FLOAT_BITS:
        values = np.frombuffer(q.payload, dtype=FLOAT_BITS[q.bits]).reshape(q.shape)
        return torch.from_numpy(values.copy()).to(device=device, dtype=torch.float32)
    codes = torch.from_numpy(unpack_codes(q.payload, q.bits, q.num_elements)).to(device)
    lo = torch.from_numpy(np.array(q.lo, dtype=np.float32)).to(device)
    hi = torch.from_numpy(np.array(q.hi, dtype=np.float32)).to(device)
    return _decode(codes.reshape(q.num_groups, -1), lo, hi, q.bits).reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    per: str = "tensor",
    generator: torch.Generator | None = None,
    stochastic: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the server would see after quantize + dequantize, as float32 on x's device, unpacked.

    Straight-through for autograd: the gradient w.r.t. the output passes to ``x`` unchanged
    (cast to x's dtype), as the device applies it to its unquantized output (docs/protocol.md section 5).
    """
    return _StraightThrough.apply(x, bits, per, generator, stochastic, noise)


class _StraightThrough(torch.autograd.Function):
    """Quantize-dequantize forward, identity backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        bits: int,
        per: str,
        generator: torch.Generator | None,
        stochastic: bool,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.input_dtype = x.dtype  # type: ignore[attr-defined]
        return _fake_values(x, bits, per, generator, stochastic, noise)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return grad.to(ctx.input_dtype), None, None, None, None, None  # type: ignore[attr-defined]


def _fake_values(
    x: torch.Tensor,
    bits: int,
    per: str,
    generator: torch.Generator | None,
    stochastic: bool,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Dequantized values of x without packing; the same numbers dequantize_torch returns."""
    bits, x = _checked(x, bits, per)
    if bits in FLOAT_BITS:
        return x.to(_TORCH_FLOATS[bits]).to(torch.float32)
    codes, lo, hi = _encode(x, bits, per, _offset(x, stochastic, generator, noise))
    return _decode(codes, lo, hi, bits).reshape(x.shape)


def _checked(x: torch.Tensor, bits: int, per: str) -> tuple[int, torch.Tensor]:
    """Validated bits and x as float32; the reference's checks, plus ``per`` at 16/32 bits."""
    bits = check_bits(bits)
    if not isinstance(x, torch.Tensor):
        raise QuantizeError(f"quantize_torch needs a torch.Tensor, got {type(x).__name__}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise QuantizeError("cannot quantize a tensor with NaN or inf values")
    if x.numel() == 0:
        raise QuantizeError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    num_groups(tuple(x.shape), per)  # QuantizeError on a bad granularity
    limit = _FLOAT16_MAX if bits == 16 else _FLOAT32_MAX
    if float(x.abs().max()) > limit:
        raise QuantizeError(f"values beyond +-{limit:.6g} cannot travel at {bits} bits")
    return bits, x


def _offset(
    x: torch.Tensor, stochastic: bool, generator: torch.Generator | None, noise: torch.Tensor | None
) -> torch.Tensor | None:
    """The U[0,1) noise added before the floor (x's shape), or None for round to nearest."""
    if not stochastic:
        return None
    if noise is None:
        return torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    noise = torch.as_tensor(noise).to(device=x.device, dtype=torch.float32)
    if tuple(noise.shape) != tuple(x.shape):
        raise QuantizeError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if not bool(((noise >= 0) & (noise < 1)).all()):
        raise QuantizeError("noise must lie in [0, 1)")
    return noise


def _encode(
    x: torch.Tensor, bits: int, per: str, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped float codes in [0, 2^q - 1] with per-group lo, hi; encode_codes' operations in order."""
    groups = num_groups(tuple(x.shape), per)
    flat = x.reshape(groups, -1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    if not bool(torch.isfinite(hi - lo).all()):
        raise QuantizeError("a quantization range is wider than float32 can represent (hi - lo overflows)")
    delta = _step_sizes(lo, hi, bits)[:, None]
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    scaled = (flat - lo[:, None]) / safe
    offset = torch.full_like(scaled, 0.5) if noise is None else noise.reshape(groups, -1)
    codes = torch.floor(scaled + offset)
    return codes.clamp(0, 2**bits - 1), lo, hi


def _step_sizes(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """delta = (hi - lo) / (2^q - 1) in float32, divided by a device tensor (see module docstring)."""
    return (hi - lo) / torch.full_like(hi, float(2**bits - 1))


def _decode(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Grouped codes -> float32 lo + code * delta: a separate multiply and add, as decode_codes."""
    delta = _step_sizes(lo, hi, bits)[:, None]
    return lo[:, None] + codes.to(torch.float32) * delta
