"""Running a TFLite Micro artifact: the tflite_micro interpreter, arena sizing, the decode rule
and parity against torch (see ``export.micro_export`` for the artifact itself)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from export.artifact import ExportError, ParityError
from export.graphs import ForwardGraph
from server_runtime.presets import ViTConfig

CODE_OFFSET = 128  # protocol code = int8 code output + 128
VALUE_TOLERANCE = 3.0  # max |decoded micro - decoded torch| / max(delta, token step)
RANGE_TOLERANCE_STEPS = 2.0  # max |lo, hi micro - torch| in token steps
_ARENA_STEP_BYTES = 16  # TFLM aligns arena buffers to 16 bytes
_PARITY_BATCHES = 6
_PARITY_DRAWS = 3


def decode_outputs(
    codes: np.ndarray, lo: np.ndarray, hi: np.ndarray, range_scale: float, range_zero_point: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 outputs -> protocol codes (uint8) and float32 lo, hi: the firmware's decode rule."""
    protocol_codes = (np.asarray(codes, np.int16) + CODE_OFFSET).astype(np.uint8)
    scale = np.float32(range_scale)
    lo_value = (scale * (np.asarray(lo, np.int32) - range_zero_point)).astype(np.float32)
    hi_value = (scale * (np.asarray(hi, np.int32) - range_zero_point)).astype(np.float32)
    return protocol_codes, lo_value, hi_value


def pixel_bytes(pixels: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] (8-bit values) -> the model's int8 input, pixel byte - 128."""
    values = np.round(np.asarray(pixels, np.float32) * 255).astype(np.int16)
    return (values - CODE_OFFSET).astype(np.int8)


class MicroModel:
    """A micro model in the tflite_micro interpreter (reference kernels) with a given arena."""

    def __init__(self, model: bytes, arena_bytes: int) -> None:
        from tflite_micro.python.tflite_micro import runtime

        self.interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
        params = self.interpreter.get_output_details(1)["quantization_parameters"]
        self.range_scale = float(params["scales"][0])
        self.range_zero_point = int(params["zero_points"][0])
        self.batch = int(self.interpreter.get_input_details(0)["shape"][0])

    def run(self, pixels_int8: np.ndarray, noise_int8: np.ndarray) -> tuple[np.ndarray, ...]:
        """int8 codes, lo, hi as the device gets them."""
        self.interpreter.set_input(np.ascontiguousarray(pixels_int8, np.int8), 0)
        self.interpreter.set_input(np.ascontiguousarray(noise_int8, np.int8), 1)
        self.interpreter.invoke()
        return tuple(self.interpreter.get_output(index) for index in range(3))

    def decoded(self, pixels: np.ndarray, noise_int8: np.ndarray) -> tuple[np.ndarray, ...]:
        """Protocol codes (uint8), lo, hi (float32) for pixels in [0, 1]."""
        outputs = self.run(pixel_bytes(pixels), noise_int8)
        return decode_outputs(*outputs, self.range_scale, self.range_zero_point)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ allocator's complaints while probing arena sizes (file descriptor 2)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure_arena(model: bytes) -> int:
    """Smallest tensor arena (16-byte steps) with which tflite_micro allocates and runs the model.

    Measured with the reference kernels; optimized ones (CMSIS-NN, ESP-NN) may ask for a little
    scratch on top (im2col), so firmware should allocate some headroom.
    """
    low, high = 0, len(model) + (1 << 16)
    while not _runs_with(model, high):
        low, high = high, high * 2
        if high > 1 << 32:
            raise ExportError("tflite_micro could not allocate the model in a 4 GiB arena")
    while high - low > _ARENA_STEP_BYTES:
        middle = (low + high) // 2 // _ARENA_STEP_BYTES * _ARENA_STEP_BYTES
        low, high = (low, middle) if _runs_with(model, middle) else (middle, high)
    return high


def _runs_with(model: bytes, arena_bytes: int) -> bool:
    with _quiet_stderr():
        try:
            micro = MicroModel(model, arena_bytes)
            shapes = [micro.interpreter.get_input_details(index)["shape"] for index in range(2)]
            micro.run(*(np.zeros(shape, np.int8) for shape in shapes))
        except RuntimeError:
            return False
    return True


def torch_reference(
    config: ViTConfig, weight: np.ndarray, bias: np.ndarray, pixels: np.ndarray,
    noise_int8: np.ndarray, levels: int, per: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes (uint8), lo, hi of ``export.graphs.ForwardGraph`` on the same pixels and noise.

    lo/hi are shaped like the micro outputs: (1, 1, 1) per tensor, (B, N, 1) per token.
    """
    mean = torch.tensor(config.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    images = (torch.from_numpy(np.asarray(pixels, np.float32)).permute(0, 3, 1, 2) - mean) / std
    noise = (torch.from_numpy(np.asarray(noise_int8, np.float32)) + CODE_OFFSET) / 256
    per_token = torch.tensor(1.0 if per == "token" else 0.0)
    with torch.no_grad():
        weights = torch.from_numpy(weight), torch.from_numpy(bias)
        codes, lo, hi = ForwardGraph()(images, *weights, noise, torch.tensor(float(levels)), per_token)
    if per == "tensor":
        lo, hi = lo[:1, :1], hi[:1, :1]
    return codes.numpy().astype(np.uint8), lo.numpy(), hi.numpy()


def compare(
    micro: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...], levels: int, token_step: float
) -> dict[str, np.ndarray]:
    """Code differences, value errors in resolutions, lo/hi errors in token steps."""
    (codes, lo, hi), (ref_codes, ref_lo, ref_hi) = micro, reference
    delta, ref_delta = (hi - lo) / levels, (ref_hi - ref_lo) / levels
    resolution = np.maximum(ref_delta, token_step)
    value_err = np.abs((lo + delta * codes) - (ref_lo + ref_delta * ref_codes)) / resolution
    range_err = np.abs(np.concatenate([(lo - ref_lo).ravel(), (hi - ref_hi).ravel()])) / token_step
    code_diff = codes.astype(np.int32) - ref_codes.astype(np.int32)
    return {"code_diff": code_diff, "value_err": value_err, "range_err": range_err}


def _parity(
    micro: MicroModel, config: ViTConfig, weight: np.ndarray, bias: np.ndarray,
    pixels: np.ndarray, levels: int, per: str,
) -> dict[str, float]:
    """tflite_micro vs torch's ForwardGraph on calibration batches, several noise draws each."""
    rng = np.random.default_rng(2)
    noise_shape = (micro.batch, config.num_patches, config.embed_dim)
    batches = np.linspace(0, len(pixels) // micro.batch - 1, _PARITY_BATCHES).astype(int)
    results = []
    for start in np.unique(batches) * micro.batch:
        chunk = pixels[start : start + micro.batch]
        for _ in range(_PARITY_DRAWS):
            noise = rng.integers(-128, 128, size=noise_shape, dtype=np.int8)
            reference = torch_reference(config, weight, bias, chunk, noise, levels, per)
            results.append(compare(micro.decoded(chunk, noise), reference, levels, micro.range_scale))
    diff, value_err, range_err = (np.concatenate([r[key].ravel() for r in results]) for key in results[0])
    parity = {
        "codes_within_1": float(np.mean(np.abs(diff) <= 1)),
        "codes_max_abs_diff": float(np.abs(diff).max()),
        "value_within_1_resolution": float(np.mean(value_err <= 1)),
        "value_max_err_resolutions": float(value_err.max()),
        "range_max_err_steps": float(range_err.max()),
    }
    worst_value, worst_range = parity["value_max_err_resolutions"], parity["range_max_err_steps"]
    if worst_value > VALUE_TOLERANCE or worst_range > RANGE_TOLERANCE_STEPS:
        raise ParityError(
            f"tflite-micro forward of {config.name} differs from torch beyond {VALUE_TOLERANCE} resolutions "
            f"or {RANGE_TOLERANCE_STEPS} token steps: {parity}"
        )
    return parity
