"""torch -> TFLite device artifacts (fixed batch), each verified with ai-edge-litert against torch.

- ``export_tflite``: fp32, signatures embed / forward / train_step, weights as inputs (trainable).
- ``export_tflite_int8``: dynamic-range int8 for phones (ai-edge-quantizer ``dynamic_wi8_afp32``:
  per-channel int8 conv weights, activations quantized to int8 on the fly). Dynamic-range
  quantization only touches constant weights, so this variant bakes the given weights in as
  constants: signatures embed / forward only, a frozen-embedding (inference-only) artifact.

litert-torch names inputs ``args_i`` in graph-argument order and outputs ``output_i``; the
name map is recorded in ``Artifact.extra["inputs"]`` / ``["outputs"]`` for the backend.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from edge_runtime.backends.base import BackendError
from edge_runtime.backends.litert_backend import INPUTS, OUTPUTS, LiteRTBackend, default_io_names
from export import verify
from export.artifact import Artifact, ExportError, ParityError
from export.graphs import EmbedGraph, ForwardGraph, TrainStepGraph, patch_tokens, quantize_codes
from server_runtime.presets import ViTConfig

log = logging.getLogger(__name__)

GRAPHS = {"embed": EmbedGraph, "forward": ForwardGraph, "train_step": TrainStepGraph}
INT8_RECIPE = "dynamic_wi8_afp32"
TRAIN_STEPS = 3  # chained train_step calls checked against torch.optim.SGD with momentum
FORWARD_LEVELS = (1.0, 3.0, 15.0, 255.0)  # q = 1, 2, 4, 8 bits
# int8 tolerance: per-channel int8 conv weights times images quantized to int8 on the fly add
# an error of about half an int8 step of each to every token; measured 0.4-0.6 % of the token
# scale (max |torch token|) for the small presets, so 2 % refuses a broken quantization, not
# a normal one. Codes are not held to +-1 (an 8-bit delta is ~0.4 % of the range); the
# fractions within +-1 are measured and reported.
INT8_TOKEN_TOLERANCE = 0.02
INT8_FORWARD_LEVELS = (3.0, 255.0)  # q = 2 and q = 8 bits


class _FrozenEmbed(nn.Module):
    """EmbedGraph with its weights as constants (buffers): images -> tokens."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patch_tokens(images, self.weight, self.bias)


class _FrozenForward(_FrozenEmbed):
    """ForwardGraph with its weights as constants: images, noise, levels, per_token -> codes, lo, hi."""

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, per_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_codes(patch_tokens(images, self.weight, self.bias), noise, levels, per_token)


def export_tflite(out_dir: Path, config: ViTConfig, batch: int) -> Artifact:
    """Write ``device_b{batch}.tflite`` (embed, forward, train_step), verified against torch."""
    batch = _check_batch(batch)
    _check_graph_names()
    path = Path(out_dir) / f"device_b{batch}.tflite"
    inputs = _sample_inputs(config, batch)
    modules = {sig: (graph().eval(), tuple(inputs[n] for n in INPUTS[sig])) for sig, graph in GRAPHS.items()}
    convert_s = _convert(modules, path)
    io = _io_names(path)
    parity = _verified(path, io, lambda backend: _fp32_parity(backend, config, batch))
    log.info("tflite %s: %d bytes, converted in %.1f s, parity %s", path.name, path.stat().st_size, convert_s, parity)
    extra = {**io, "convert_s": round(convert_s, 3), "bytes": path.stat().st_size}
    return Artifact(path, "tflite", tuple(GRAPHS), batch, parity=parity, trainable=True, extra=extra)


def export_tflite_int8(out_dir: Path, config: ViTConfig, batch: int, weight: np.ndarray, bias: np.ndarray) -> Artifact:
    """Write ``device_b{batch}_int8.tflite`` (embed, forward; ``weight``/``bias`` baked in, int8).

    Verified against torch within ``INT8_TOKEN_TOLERANCE`` of the token scale; codes are reported.
    """
    batch = _check_batch(batch)
    w, b = _checked_weights(config, weight, bias)
    path = Path(out_dir) / f"device_b{batch}_int8.tflite"
    inputs = _sample_inputs(config, batch)
    frozen = {
        "embed": (_FrozenEmbed(w, b).eval(), (inputs["images"],)),
        "forward": (_FrozenForward(w, b).eval(), tuple(inputs[n] for n in ("images", "noise", "levels", "per_token"))),
    }
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "frozen_fp32.tflite"
        convert_s = _convert(frozen, float_path)
        fp32_bytes = float_path.stat().st_size
        quantize_s = _quantize(float_path, path)
    _check_int8_weights(path, config)
    io = _io_names(path)
    parity = _verified(path, io, lambda backend: _int8_parity(backend, config, batch, w, b))
    int8_bytes = path.stat().st_size
    log.info("tflite-int8 %s: %d bytes (frozen fp32 %d), parity %s", path.name, int8_bytes, fp32_bytes, parity)
    extra = {
        **io, "recipe": INT8_RECIPE, "convert_s": round(convert_s, 3), "quantize_s": round(quantize_s, 3),
        "bytes": int8_bytes, "fp32_bytes": fp32_bytes, "size_ratio": round(int8_bytes / fp32_bytes, 4),
    }
    return Artifact(path, "tflite-int8", ("embed", "forward"), batch, parity=parity, trainable=False, extra=extra)


def _verified(path: Path, io: dict, check: Callable[[LiteRTBackend], dict[str, float]]) -> dict[str, float]:
    """``check`` run on the artifact through LiteRTBackend; a failing artifact is deleted."""
    try:
        return check(LiteRTBackend(path, io))
    except (ExportError, BackendError) as exc:
        path.unlink(missing_ok=True)  # never leave an unverified artifact behind
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path.name} does not run as exported: {exc}") from exc


def _convert(modules: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]], path: Path) -> float:
    """Convert the modules into one .tflite with a signature each; returns the seconds it took."""
    import litert_torch

    start = time.perf_counter()
    converter = None
    for sig, (module, args) in modules.items():
        converter = (converter or litert_torch).signature(sig, module, args)
    try:
        with _converter_progress(log.isEnabledFor(logging.DEBUG)):
            content = converter.convert().model_content()
    except Exception as exc:  # the converter raises many types; report which signature set failed
        raise ExportError(f"litert-torch could not convert {sorted(modules)}: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return time.perf_counter() - start


@contextlib.contextmanager
def _converter_progress(show: bool) -> Iterator[None]:
    """litert-torch prints a progress tree to the console; show it only when debugging."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    os.environ[key] = "y" if show else "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _quantize(float_path: Path, out_path: Path) -> float:
    """Dynamic-range int8 quantization with ai-edge-quantizer; returns the seconds it took."""
    from ai_edge_quantizer import Quantizer, recipe

    start = time.perf_counter()
    quantizer = Quantizer(str(float_path), getattr(recipe, INT8_RECIPE)())
    result = quantizer.quantize(enable_progress_report=False)
    out_path.write_bytes(bytes(result.quantized_model))
    return time.perf_counter() - start


def _check_int8_weights(path: Path, config: ViTConfig) -> None:
    """ExportError unless the quantizer stored the conv weights as int8 (it could leave them float)."""
    from ai_edge_litert.interpreter import Interpreter

    dim, patch, chans = config.embed_dim, config.patch_size, config.in_chans
    details = Interpreter(model_path=str(path)).get_tensor_details()
    shapes = {tuple(int(n) for n in d["shape"]) for d in details if d["dtype"] == np.int8}
    if (dim, patch, patch, chans) not in shapes:
        path.unlink(missing_ok=True)
        raise ExportError(f"{INT8_RECIPE} left the patch-embedding conv in float (int8 tensors: {sorted(shapes)})")


def _io_names(path: Path) -> dict[str, dict[str, dict[str, str]]]:
    """``{"inputs": {sig: {arg: "args_i"}}, "outputs": {sig: {result: "output_i"}}}`` of a model."""
    from ai_edge_litert.interpreter import Interpreter

    listed = Interpreter(model_path=str(path)).get_signature_list()
    try:
        names = {sig: default_io_names(sig, entry["inputs"], entry["outputs"]) for sig, entry in listed.items()}
    except BackendError as exc:  # litert-torch changed its naming: the map cannot be inferred
        raise ExportError(f"{path.name}: {exc}") from exc
    return {key: {sig: n[key] for sig, n in names.items()} for key in ("inputs", "outputs")}


def _check_graph_names() -> None:
    """ExportError if the backend's names drifted from the graphs' arguments or verify's names."""
    for sig, graph in GRAPHS.items():
        args = tuple(inspect.signature(graph().forward).parameters)
        if (args, args) != (INPUTS[sig], verify.SIGNATURES[sig][0]) or OUTPUTS[sig] != verify.SIGNATURES[sig][1]:
            raise ExportError(
                f"{sig}: graph arguments {args}, verify {verify.SIGNATURES[sig]} and the LiteRT backend "
                f"{(INPUTS[sig], OUTPUTS[sig])} disagree on names"
            )


def _check_batch(batch: int) -> int:
    """``batch`` as an int when it is a whole number >= 1, else ExportError."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ExportError(f"a TFLite artifact needs a fixed batch >= 1, got {batch!r}")
    return int(batch)


def _checked_weights(config: ViTConfig, weight: np.ndarray, bias: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The device weights as float32 tensors, or ExportError naming the shapes expected."""
    shape = (config.embed_dim, config.in_chans, config.patch_size, config.patch_size)
    weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
    if weight.shape != shape or bias.shape != (config.embed_dim,):
        raise ExportError(
            f"{config.name} needs weight {shape} and bias ({config.embed_dim},), got {weight.shape} and {bias.shape}"
        )
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ExportError("device weights contain NaN or inf")
    return torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy())



def _sample_inputs(config: ViTConfig, batch: int) -> dict[str, torch.Tensor]:
    """verify's reference inputs as tensors: the example arguments conversion traces with."""
    return {name: torch.from_numpy(np.array(value)) for name, value in verify.reference_inputs(config, batch).items()}


def _fp32_parity(backend: LiteRTBackend, config: ViTConfig, batch: int) -> dict[str, float]:
    """``export.verify``'s embed / forward (q in 1, 2, 4, 8) / chained train_step checks."""
    runs = verify.backend_runs(backend)
    parity = verify.check_embed(runs["embed"], config, batch)
    parity.update(verify.check_forward(runs["forward"], config, batch, levels=FORWARD_LEVELS))
    parity.update(verify.check_train_step(runs["train_step"], config, batch, steps=TRAIN_STEPS))
    return parity


def _int8_parity(backend: LiteRTBackend, config: ViTConfig, batch: int, weight: torch.Tensor,
                 bias: torch.Tensor) -> dict[str, float]:
    """Token error (refused beyond INT8_TOKEN_TOLERANCE) and code agreement, the baked weights in."""
    baked = {"weight": weight.numpy(), "bias": bias.numpy()}
    run = verify.backend_runs(backend)
    inputs = {**verify.select("embed", verify.reference_inputs(config, batch)), **baked}
    (want,) = verify.torch_run("embed")(inputs)
    (got,) = verify.outputs_of("embed", run["embed"](inputs))
    scale = float(np.abs(want).max()) or 1.0
    parity = {
        "embed_max_rel_err": float(np.abs(got - want).max() / scale),
        "embed_rms_rel_err": float(np.sqrt(np.mean((got - want) ** 2)) / scale),
        "token_tolerance": INT8_TOKEN_TOLERANCE,
        "forward_range_max_rel_err": 0.0,
    }
    for levels in INT8_FORWARD_LEVELS:
        diffs = []
        for per_token in (False, True):
            values = {**verify.reference_inputs(config, batch, levels=levels, per_token=per_token), **baked}
            codes, lo, hi = verify.outputs_of("forward", run["forward"](verify.select("forward", values)))
            want_codes, want_lo, want_hi = verify.torch_run("forward")(verify.select("forward", values))
            diffs.append(np.abs(codes - want_codes).reshape(-1))
            range_err = max(np.abs(lo - want_lo).max(), np.abs(hi - want_hi).max()) / scale
            parity["forward_range_max_rel_err"] = max(parity["forward_range_max_rel_err"], float(range_err))
        bits, diff = int(levels).bit_length(), np.concatenate(diffs)
        parity[f"codes_within_1_fraction_q{bits}"] = float(np.mean(diff <= 1))
        parity[f"codes_exact_fraction_q{bits}"] = float(np.mean(diff == 0))
        parity[f"code_max_diff_q{bits}"] = float(diff.max())
    worst = max(parity["embed_max_rel_err"], parity["forward_range_max_rel_err"])
    if not worst <= INT8_TOKEN_TOLERANCE:
        raise ParityError(
            f"{backend.model_path.name}: int8 tokens (or ranges) differ from torch by {worst:.3%} of their scale "
            f"{scale:.3g}, beyond the int8 tolerance {INT8_TOKEN_TOLERANCE:.0%} (preset {config.name}, batch {batch})"
        )
    return parity
