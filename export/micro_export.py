"""Full-integer TFLite Micro artifact of the device forward, for microcontrollers.

A microcontroller runs only the frozen patch embedding (int8 weights baked in; no train_step)
and the stochastic quantizer, all in int8:

- inputs: ``pixels`` int8 (B, H, W, C), NHWC, the raw 8-bit pixel minus 128 (the byte with its
  top bit flipped; the config's mean/std are folded into the weights), and ``noise`` int8
  (B, N, D), uniform random bytes: u = (noise + 128) / 256 (tflite-micro has no RANDOM_UNIFORM).
- outputs: ``codes`` int8 (B, N, D); ``lo``, ``hi`` int8, (1, 1, 1) per tensor or (B, N, 1)
  per token.

Decode rule (the firmware's; :func:`decode_outputs`): code = codes + 128 (flip the top bit), in
[0, 2^bits - 1]; lo = range_scale * (lo - range_zero_point), hi likewise, with the quantization
of the lo/hi output tensors (the token scale; both in ``Artifact.extra``). The protocol's value
is lo + (hi - lo) / (2^bits - 1) * code, as ``edge_runtime.quantize`` decodes.

Graph: conv (per-channel int8 weights) -> lo = REDUCE_MIN, hi = MAX_POOL_2D of the tokens ->
t = (x - lo) / max(hi - lo, one token step) (DIV, t on a 1/255 grid) -> ADD(t, noise) whose
output scale 1/levels and zero point -128 make the int8 requantization compute
round(levels * t + u - 1/2) = floor(levels * t + u) and its saturation clip to [0, levels].
``bits`` and the range granularity are fixed at export.

Tolerance: the tokens are int8 (one step = range_scale), so the device resolves
max(delta, token step). Decoded values agree with torch within ``VALUE_TOLERANCE`` of that,
lo/hi within ``RANGE_TOLERANCE_STEPS`` token steps; codes agree within +-1 where delta spans two
or more token steps (below 8 bits). At 8 bits t's grid is the code grid: codes are the rounded
int8 tokens and the noise no longer moves them.

Made with litert-torch (float TFLite of :class:`MicroForwardGraph`) and ai-edge-quantizer
(``static_wi8_ai8``, calibrated); the ranges the arithmetic above needs are set in the
calibration result and checked in the quantized model.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.artifact import Artifact, ExportError, ExportRefused
from export.micro_runtime import (  # noqa: F401  (re-exported: the decode rule and tolerances)
    CODE_OFFSET,
    RANGE_TOLERANCE_STEPS,
    VALUE_TOLERANCE,
    MicroModel,
    _parity,
    _quiet_stderr,
    decode_outputs,
    measure_arena,
    pixel_bytes,
)
from firmware_profiles import DeviceProfile
from server_runtime.presets import ViTConfig

MICRO_FORMAT = "tflite-micro"
GRANULARITIES = ("tensor", "token")
_MODEL_OVERHEAD_BYTES = 3 * 1024  # flatbuffer tables and ops (3.7 KiB measured): a lower bound
_CALIBRATION_IMAGES = 24
_TOKEN_OPS = ("CONV_2D", "RESHAPE", "REDUCE_MIN", "MAX_POOL_2D")  # outputs on the token scale


@dataclass(frozen=True)
class MicroFootprint:
    """Flash and RAM of a micro artifact: lower bounds before conversion, measured after."""

    weight_bytes: int  # int8 patch-embedding weights
    model_bytes: int  # the .tflite flatbuffer (flash)
    arena_bytes: int  # tensor arena, inputs and outputs included (RAM)
    measured: bool


class MicroForwardGraph(nn.Module):
    """pixels (B, H, W, C) in [0, 1], noise (u - 1/2) / levels -> codes / levels, lo, hi.

    The float twin of the int8 graph; weights are constants with the normalization folded in.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, per: str, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(weight, np.float32)))
        self.register_buffer("bias", torch.from_numpy(np.ascontiguousarray(bias, np.float32)))
        self.register_buffer("eps", torch.tensor(eps, dtype=torch.float32))
        self.per = per

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dim, patch = self.weight.shape[0], self.weight.shape[-1]
        x = F.conv2d(pixels.permute(0, 3, 1, 2), self.weight, self.bias, stride=patch)
        tokens = x.permute(0, 2, 3, 1).reshape(noise.shape)  # cancels the converter's transposes
        per_tensor = self.per == "tensor"
        lo = tokens.amin(dim=(0, 1, 2) if per_tensor else 2, keepdim=True)
        window = (noise.shape[0] * noise.shape[1], dim) if per_tensor else (1, dim)
        # hi by max pooling: ai-edge-quantizer has no int8 REDUCE_MAX
        hi = F.max_pool2d(tokens.reshape(1, 1, -1, dim), window).reshape(lo.shape)
        t = (tokens - lo) / torch.maximum(hi - lo, self.eps)
        return t + noise, lo, hi


# ---------------------------------------------------------------- public API


def export_tflite_micro(
    out_dir: Path,
    config: ViTConfig,
    weight: np.ndarray,
    bias: np.ndarray,
    profile: DeviceProfile,
    *,
    batch: int = 1,
    calibration_images: np.ndarray | None = None,
    bits: int = 8,
    per: str = "tensor",
) -> Artifact:
    """Write the full-int8 forward for ``profile``, verified in tflite_micro against torch.

    ``calibration_images`` are model inputs (normalized, (M, C, H, W)) that set the token range;
    without them a synthetic set (noise, smooth and flat images) does. ExportRefused when the
    profile lacks tflite-micro or the model cannot fit its flash / RAM: checked from the shapes
    before converting, then with the measured sizes.
    """
    weight, bias = _checked_weights(config, weight, bias)
    levels = _checked_settings(batch, bits, per)
    _check_runtime(profile)
    check_fits(profile, config, minimum_footprint(config, batch))
    pixels = _calibration_pixels(config, calibration_images, batch)
    folded = fold_normalization(weight, bias, config.mean, config.std)
    token_range = _token_range(*folded, pixels)
    noise_shape = (batch, config.num_patches, config.embed_dim)
    model = _build_int8_model(*folded, levels, per, token_range, pixels, noise_shape)
    footprint = MicroFootprint(weight.size, len(model), measure_arena(model), measured=True)
    check_fits(profile, config, footprint)
    micro = MicroModel(model, footprint.arena_bytes)
    parity = _parity(micro, config, weight, bias, pixels, levels, per)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"device_b{batch}_micro.tflite"
    path.write_bytes(model)
    extra = {
        "model_bytes": footprint.model_bytes,
        "arena_bytes": footprint.arena_bytes,
        "weight_bytes": footprint.weight_bytes,
        "ram_budget_bytes": ram_budget_bytes(profile),
        "bits": bits,
        "per": per,
        "inputs": "pixels int8 (B, H, W, C) = pixel byte - 128; noise int8 (B, N, D) = random bytes",
        "outputs": "codes int8 (B, N, D); lo, hi int8",
        "range_scale": micro.range_scale,
        "range_zero_point": micro.range_zero_point,
        "decode": "code = codes + 128; lo = range_scale * (lo - range_zero_point); hi likewise",
    }
    return Artifact(path, MICRO_FORMAT, ("forward",), batch, parity, trainable=False, extra=extra)


def fold_normalization(
    weight: np.ndarray, bias: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Weights acting on pixels in [0, 1] equal to the originals on (pixels - mean) / std."""
    mean_c = np.asarray(mean, np.float64)[None, :, None, None]
    folded = weight.astype(np.float64) / np.asarray(std, np.float64)[None, :, None, None]
    shift = (folded * mean_c).sum(axis=(1, 2, 3))
    return folded.astype(np.float32), (bias.astype(np.float64) - shift).astype(np.float32)


# ---------------------------------------------------------------- target checks


def minimum_footprint(config: ViTConfig, batch: int) -> MicroFootprint:
    """Lower bounds from the shapes alone: what any conversion needs at least."""
    dim, patch, chans = config.embed_dim, config.patch_size, config.in_chans
    weights = dim * chans * patch * patch
    model = weights + 28 * dim + _MODEL_OVERHEAD_BYTES  # + int32 bias, per-channel scales/zero points
    tokens = batch * config.num_patches * dim
    arena = batch * config.img_size**2 * chans + 2 * tokens  # live at the conv: pixels, noise, tokens
    return MicroFootprint(weights, model, arena, measured=False)


def ram_budget_bytes(profile: DeviceProfile) -> int:
    """The largest memory region the arena can live in.

    TFLM's arena is one contiguous buffer, so SRAM and PSRAM do not add up; with PSRAM
    (ESP32-S3) the arena may be allocated there (heap_caps_malloc(..., MALLOC_CAP_SPIRAM)).
    """
    return max(profile.memory.ram_bytes, profile.memory.psram_bytes or 0)


def check_fits(profile: DeviceProfile, config: ViTConfig, footprint: MicroFootprint) -> None:
    """ExportRefused naming the sizes when the model exceeds flash or the arena exceeds RAM."""
    memory, what = profile.memory, "measured" if footprint.measured else "at least"
    subject = f"{config.name} patch embedding"
    if footprint.model_bytes > memory.flash_bytes:
        raise ExportRefused(
            f"{subject}: {_mb(footprint.weight_bytes)} of int8 weights (model {what} "
            f"{footprint.model_bytes:,} B) > {_mib(memory.flash_bytes)} flash "
            f"({memory.flash_bytes:,} B) of {profile.name}"
        )
    budget = ram_budget_bytes(profile)
    if footprint.arena_bytes > budget:
        region = "RAM" if budget == memory.ram_bytes else "PSRAM"
        raise ExportRefused(
            f"{subject}: tensor arena {what} {_mb(footprint.arena_bytes)} "
            f"({footprint.arena_bytes:,} B, inputs and outputs included) > {_mib(budget)} {region} "
            f"({budget:,} B) of {profile.name}"
        )


def _check_runtime(profile: DeviceProfile) -> None:
    if MICRO_FORMAT not in profile.runtime.formats:
        formats = ", ".join(profile.runtime.formats)
        raise ExportRefused(f"profile {profile.name} does not run {MICRO_FORMAT} (its formats: {formats})")


def _mb(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


# ---------------------------------------------------------------- inputs


def _checked_weights(
    config: ViTConfig, weight: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 weight (D, C, p, p) and bias (D,) of ``config``, else ExportError."""
    weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
    shape = (config.embed_dim, config.in_chans, config.patch_size, config.patch_size)
    if weight.shape != shape or bias.shape != shape[:1]:
        raise ExportError(
            f"{config.name} needs weight {shape} and bias {shape[:1]}, got {weight.shape} and {bias.shape}"
        )
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ExportError("weights must be finite")
    return weight, bias


def _checked_settings(batch: int, bits: int, per: str) -> int:
    """levels = 2^bits - 1 for valid settings, else ExportError."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ExportError(f"tflite-micro codes are 1..8 bits, got {bits!r}")
    if per not in GRANULARITIES:
        raise ExportError(f"per must be one of {GRANULARITIES}, got {per!r}")
    return 2**bits - 1


def _calibration_pixels(config: ViTConfig, images: np.ndarray | None, batch: int) -> np.ndarray:
    """Calibration pixels (M, H, W, C) on the 8-bit grid of [0, 1], M a multiple of ``batch``."""
    size, chans = config.img_size, config.in_chans
    if images is None:
        pixels = _synthetic_pixels(max(_CALIBRATION_IMAGES, batch), size, chans)
    else:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (chans, size, size) or len(images) < batch:
            raise ExportError(
                f"calibration_images must be (M >= {batch}, {chans}, {size}, {size}), got {images.shape}"
            )
        mean = np.asarray(config.mean, np.float32)[None, :, None, None]
        std = np.asarray(config.std, np.float32)[None, :, None, None]
        pixels = np.clip(images * std + mean, 0.0, 1.0).transpose(0, 2, 3, 1)
    usable = len(pixels) // batch * batch
    return np.ascontiguousarray(np.round(pixels[:usable] * 255) / 255, np.float32)


def _synthetic_pixels(count: int, size: int, chans: int) -> np.ndarray:
    """Noise, smooth (upsampled 4x4 noise) and flat images, a third each."""
    rng = np.random.default_rng(0)
    third, cell = count // 3, math.ceil(size / 4)
    noise = rng.random((third, size, size, chans))
    smooth = rng.random((third, 4, 4, chans)).repeat(cell, axis=1).repeat(cell, axis=2)[:, :size, :size]
    flat_count = count - 2 * third
    flat = np.broadcast_to(rng.random((flat_count, 1, 1, chans)), (flat_count, size, size, chans))
    return np.concatenate([noise, smooth, flat]).astype(np.float32)


def _token_range(weight: np.ndarray, bias: np.ndarray, pixels: np.ndarray) -> tuple[float, float]:
    """(min, max) of the patch tokens over the calibration pixels, widened to include 0."""
    with torch.no_grad():
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        x = F.conv2d(images, torch.from_numpy(weight), torch.from_numpy(bias), stride=weight.shape[-1])
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if high - low <= 0:
        raise ExportError("the patch embedding is zero on every calibration image: nothing to quantize")
    return low, high


# ---------------------------------------------------------------- conversion


def _build_int8_model(
    weight: np.ndarray, bias: np.ndarray, levels: int, per: str,
    token_range: tuple[float, float], pixels: np.ndarray, noise_shape: tuple[int, int, int],
) -> bytes:
    """litert-torch float model -> ai-edge-quantizer full int8, with the arithmetic's ranges set."""
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    token_step = (token_range[1] - token_range[0]) / 255
    graph = MicroForwardGraph(weight, bias, per, eps=token_step).eval()
    batch = noise_shape[0]
    sample = (torch.from_numpy(pixels[:batch]), torch.zeros(noise_shape))
    with _environment(LITERT_TORCH_SHOW_PROGRESS="n"):  # its progress tree is for debugging
        float_model = bytes(litert_torch.convert(graph, sample).model_content())
    rng = np.random.default_rng(1)
    noise = [((rng.random(noise_shape) - 0.5) / levels).astype(np.float32) for _ in range(len(pixels) // batch)]
    samples = [{"args_0": pixels[i * batch : (i + 1) * batch], "args_1": u} for i, u in enumerate(noise)]
    qt = quantizer.Quantizer(bytearray(float_model), recipe.static_wi8_ai8())
    calibration = qt.calibrate({"serving_default": samples}, num_threads=1)
    for name, (low, high) in _activation_ranges(float_model, levels, token_range).items():
        calibration[name] = {"min": np.float32(low), "max": np.float32(high)}
    quantized = qt.quantize(calibration, enable_progress_report=False).quantized_model
    model = _inline_and_align(bytes(quantized))
    _verify_int8(model, levels, token_step)
    return model


def _activation_ranges(
    float_model: bytes, levels: int, token_range: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Tensor name -> (min, max) giving each activation the scale the int8 arithmetic needs.

    ai-edge-quantizer maps (min, max) to scale (max - min) / 255, zero point -128 - min / scale.
    """
    from tflite_micro.python.tflite_micro import runtime

    model = runtime.convert_bytearray_to_object(bytearray(float_model))
    graph = model.subgraphs[0]
    half, width = 0.5 / levels, token_range[1] - token_range[0]
    ranges = {
        graph.tensors[graph.inputs[0]].name: (0.0, 1.0),  # pixels: scale 1/255, zero point -128
        graph.tensors[graph.inputs[1]].name: (-half, half * 127 / 128),  # noise: 1/(256 levels), 0
    }
    by_op = {"SUB": (0.0, width), "MAXIMUM": (0.0, width), "DIV": (0.0, 1.0), "ADD": (0.0, 255 / levels)}
    by_op.update(dict.fromkeys(_TOKEN_OPS, token_range))
    for op in graph.operators:
        op_name = _op_name(model, op)
        if op_name not in by_op:
            raise ExportError(f"unexpected {op_name} in the micro graph: the converter's lowering changed")
        ranges.update((graph.tensors[index].name, by_op[op_name]) for index in op.outputs)
    return {(name.decode() if isinstance(name, bytes) else name): value for name, value in ranges.items()}


def _op_name(model: object, op: object) -> str:
    from tflite_micro.python.tflite_micro import runtime
    from tflite_micro.tensorflow.lite.micro.python.schema_py_generated import BuiltinOperator

    code = runtime.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
    names = (key for key, value in vars(BuiltinOperator).items() if value == code and key.isupper())
    return next(names, str(code))


def _inline_and_align(model: bytes) -> bytes:
    """Constants inside the flatbuffer, 16-byte aligned: what tflite-micro can read.

    ai-edge-quantizer stores constants of 256 KiB or more after the flatbuffer (buffer offsets),
    which tflite_micro silently reads as garbage; TFLM's align tool repacks the rest.
    """
    from ai_edge_litert.tools import flatbuffer_utils
    from tflite_micro.tensorflow.lite.micro.tools import tflite_flatbuffer_align_wrapper

    resolved = flatbuffer_utils.read_model_from_bytearray(bytearray(model))  # offsets -> data
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "inlined.tflite"), Path(folder, "aligned.tflite")
        source.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(resolved)))
        tflite_flatbuffer_align_wrapper.align_tflite_model(str(source), str(target))
        aligned = target.read_bytes()
    buffers = flatbuffer_utils.convert_bytearray_to_object(bytearray(aligned)).buffers
    if any(buffer.offset for buffer in buffers):
        raise ExportError("micro model still stores constants outside the flatbuffer")
    return aligned


def _verify_int8(model: bytes, levels: int, token_step: float) -> None:
    """ExportError unless no tensor is float and the I/O has the scales the decode rule assumes."""
    from tflite_micro.python.tflite_micro import runtime
    from tflite_micro.tensorflow.lite.micro.python.schema_py_generated import TensorType

    floats = {TensorType.FLOAT32, TensorType.FLOAT16, TensorType.FLOAT64}
    graph = runtime.convert_bytearray_to_object(bytearray(model)).subgraphs[0]
    float_names = [tensor.name for tensor in graph.tensors if tensor.type in floats]
    if float_names:
        raise ExportError(f"micro model is not full-integer: float tensors {float_names}")
    interpreter = MicroModel(model, len(model) * 4 + (1 << 20)).interpreter
    details = [interpreter.get_input_details(i) for i in range(2)]
    details += [interpreter.get_output_details(i) for i in range(3)]
    expected = [(1 / 255, -128), (1 / (256 * levels), 0), (1 / levels, -128)] + [(token_step, None)] * 2
    for index, (detail, (want_scale, want_zp)) in enumerate(zip(details, expected)):
        params = detail["quantization_parameters"]
        scale, zero_point = float(params["scales"][0]), int(params["zero_points"][0])
        if detail["dtype"] != np.int8 or not math.isclose(scale, want_scale, rel_tol=1e-4) or (
            want_zp not in (None, zero_point)
        ):
            raise ExportError(
                f"micro model tensor {index} (inputs, then outputs) is {np.dtype(detail['dtype']).name} "
                f"scale {scale:.6g} zero point {zero_point}; expected int8 scale {want_scale:.6g} "
                f"zero point {want_zp}"
            )


# ---------------------------------------------------------------- running in tflite_micro


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- parity


