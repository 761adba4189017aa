"""TFLite artifacts (fp32 trainable, dynamic-range int8 frozen) against torch, run by LiteRTBackend.

The references are computed here: tokens by the model's patch embedding
(``server_runtime.vit.PatchEmbed``), codes by the numpy reference quantizer
(``edge_runtime.quantize``) with the same noise, train steps by autograd and torch.optim.SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import ai_edge_litert  # noqa: F401  (the runtime: required by the export extra, so fail here when absent)
import ai_edge_quantizer  # noqa: F401  (the int8 exporter's quantizer)
import litert_torch  # noqa: F401  (the exporters' converter)
import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.backends.base import BackendError
from edge_runtime.backends.litert_backend import LiteRTBackend
from edge_runtime.backends.numpy_backend import NumpyBackend
from edge_runtime.quantize import encode_codes, ranges
from export import tflite_export, verify
from export.artifact import Artifact, ExportError, ParityError
from server_runtime.presets import ViTConfig, get_preset
from server_runtime.vit import PatchEmbed

PRESETS = ("vit_quick_patch4_16", "vit_mini_patch4_32")
BATCH = 2
FP32_TOL = 1e-5
CASES = [(bits, per_token) for bits in (2, 8) for per_token in (False, True)]


@dataclass
class Exported:
    config: ViTConfig
    fp32: Artifact
    int8: Artifact
    weight: np.ndarray  # the weights baked into the int8 artifact
    bias: np.ndarray


@pytest.fixture(scope="module", params=PRESETS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    config = get_preset(request.param)
    out = tmp_path_factory.mktemp(request.param)
    weight, bias = _weights(config, seed=11)
    fp32 = tflite_export.export_tflite(out, config, BATCH)
    int8 = tflite_export.export_tflite_int8(out, config, BATCH, weight, bias)
    return Exported(config, fp32, int8, weight, bias)


@pytest.fixture(scope="module")
def fp32_backend(exported: Exported) -> LiteRTBackend:
    return LiteRTBackend(exported.fp32.path, exported.fp32.extra)


@pytest.fixture(scope="module")
def int8_backend(exported: Exported) -> LiteRTBackend:
    return LiteRTBackend(exported.int8.path, exported.int8.extra)


def _weights(config: ViTConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """nn.Conv2d's default init for the patch embedding, seeded."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)
    return conv.weight.detach().numpy().copy(), conv.bias.detach().numpy().copy()


def _inputs(config: ViTConfig, seed: int, batch: int = BATCH) -> dict[str, np.ndarray]:
    """Images in [-1, 1] (normalized), U[0,1) noise and an activation gradient, seeded."""
    rng = np.random.default_rng(seed)
    tokens = (batch, config.num_patches, config.embed_dim)
    images = rng.uniform(-1, 1, (batch, config.in_chans, config.img_size, config.img_size))
    return {
        "images": images.astype(np.float32),
        "noise": rng.random(tokens, dtype=np.float32),
        "grad_tokens": rng.standard_normal(tokens).astype(np.float32),
    }


def _patch_embedding(img_size: int, weight: np.ndarray, bias: np.ndarray) -> PatchEmbed:
    """The server model's patch embedding holding ``weight`` and ``bias``."""
    dim, chans, patch, _ = weight.shape
    embed = PatchEmbed(img_size, patch, chans, dim)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.from_numpy(np.asarray(weight)))
        embed.proj.bias.copy_(torch.from_numpy(np.asarray(bias)))
    return embed


def _torch_tokens(images, weight, bias) -> np.ndarray:
    """The model's patch embedding of ``images``."""
    with torch.no_grad():
        return _patch_embedding(images.shape[-1], weight, bias)(torch.from_numpy(np.asarray(images))).numpy()


def _torch_forward(images, weight, bias, noise, bits, per_token):
    """The reference quantizer's codes (B, N, D) and lo, hi as (B, N, 1), on the model's tokens."""
    tokens = _torch_tokens(images, weight, bias)
    per = "token" if per_token else "tensor"
    lo, hi = ranges(tokens, per)
    codes = encode_codes(tokens, lo, hi, bits, noise, per).reshape(tokens.shape).astype(np.float32)
    shape = (*tokens.shape[:2], 1)
    if per == "tensor":
        lo, hi = np.full(shape, lo[0]), np.full(shape, hi[0])
    return codes, lo.reshape(shape), hi.reshape(shape)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- fp32: trainable, parity with torch ---------------------------------------------------------


def test_fp32_artifact_describes_itself_and_records_its_parity(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    # Prepare: the exporter's own check inputs, to hold its record against
    art, config = exported.fp32, exported.config
    x = verify.reference_inputs(config, BATCH)
    # Execute
    tokens = fp32_backend.embed(x["images"], x["weight"], x["bias"])
    want = _torch_tokens(x["images"], x["weight"], x["bias"])
    measured = float(np.abs(tokens - want).max() / max(1.0, np.abs(want).max()))
    # Assert
    assert art.path.name == f"device_b{BATCH}.tflite" and art.path.is_file()
    assert (art.format, art.batch, art.trainable) == ("tflite", BATCH, True)
    assert set(art.signatures) == {"embed", "forward", "train_step"}
    assert art.extra["inputs"]["forward"] == {
        "images": "args_0", "weight": "args_1", "bias": "args_2",
        "noise": "args_3", "levels": "args_4", "per_token": "args_5",
    }
    assert art.extra["outputs"]["train_step"]["new_momentum_bias"] == "output_3"
    assert measured <= FP32_TOL
    assert measured / 2 <= art.parity["embed_max_abs_err"] <= 2 * measured  # the record is what the file does
    codes_checked = BATCH * config.num_patches * config.embed_dim * len(tflite_export.FORWARD_LEVELS) * 2
    assert art.parity["forward_codes_compared"] == codes_checked  # every q, both range granularities


def test_fp32_embed_matches_torch(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    x = _inputs(exported.config, seed=1)
    weight, bias = _weights(exported.config, seed=2)
    tokens = fp32_backend.embed(x["images"], weight, bias)
    assert tokens.shape == (BATCH, exported.config.num_patches, exported.config.embed_dim)
    assert _rel(tokens, _torch_tokens(x["images"], weight, bias)) <= FP32_TOL


@pytest.mark.parametrize(("bits", "per_token"), CASES)
def test_fp32_forward_codes_match_torch_within_one(
    exported: Exported, fp32_backend: LiteRTBackend, bits: int, per_token: bool
) -> None:
    x = _inputs(exported.config, seed=3 + bits)
    weight, bias = _weights(exported.config, seed=4)
    codes, lo, hi = fp32_backend.forward(x["images"], weight, bias, x["noise"], 2**bits - 1, per_token)
    want_codes, want_lo, want_hi = _torch_forward(x["images"], weight, bias, x["noise"], bits, per_token)
    assert np.abs(codes - want_codes).max() <= 1
    assert np.mean(codes == want_codes) > 0.999
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert _rel(lo, want_lo) <= FP32_TOL and _rel(hi, want_hi) <= FP32_TOL
    assert (len(np.unique(lo)) == 1) != per_token  # one range per tensor, else one per token


def test_fp32_train_step_follows_sgd_momentum_for_three_steps(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    config, lr, momentum = exported.config, 0.05, 0.9
    weight0, bias0 = _weights(config, seed=5)
    embed = _patch_embedding(config.img_size, weight0, bias0)
    weight, bias = embed.proj.weight, embed.proj.bias
    oracle = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum)
    state = (weight0, bias0, np.zeros_like(weight0), np.zeros_like(bias0))
    for step in range(3):
        x = _inputs(config, seed=20 + step)
        oracle.zero_grad()
        embed(torch.from_numpy(x["images"])).backward(torch.from_numpy(x["grad_tokens"]))
        oracle.step()
        state = fp32_backend.train_step(*state, x["images"], x["grad_tokens"], lr, momentum)
    want = (weight, bias, oracle.state[weight]["momentum_buffer"], oracle.state[bias]["momentum_buffer"])
    for got, ref in zip(state, want):
        assert _rel(got, ref.detach().numpy()) <= FP32_TOL
    assert _rel(state[0], weight0) > 0.05  # the steps moved the weights well beyond the tolerance


def test_litert_codes_agree_with_the_numpy_reference_quantizer(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    x = _inputs(exported.config, seed=7)
    weight, bias = _weights(exported.config, seed=8)
    tokens = _torch_tokens(x["images"], weight, bias)
    for bits, per_token in CASES:
        per = "token" if per_token else "tensor"
        lo, hi = ranges(tokens, per)
        want = encode_codes(tokens, lo, hi, bits, x["noise"], per).reshape(tokens.shape)
        codes, _, _ = fp32_backend.forward(x["images"], weight, bias, x["noise"], 2**bits - 1, per_token)
        assert np.abs(codes - want).max() <= 1, (bits, per)


def test_litert_codes_agree_with_the_numpy_backend(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    numpy_backend = NumpyBackend()
    x = _inputs(exported.config, seed=9)
    weight, bias = _weights(exported.config, seed=10)
    for bits, per_token in CASES:
        got = fp32_backend.forward(x["images"], weight, bias, x["noise"], 2**bits - 1, per_token)
        want = numpy_backend.forward(x["images"], weight, bias, x["noise"], 2**bits - 1, per_token)
        assert np.abs(got[0] - want[0]).max() <= 1, (bits, per_token)


def test_default_io_names_match_the_recorded_ones(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    x = _inputs(exported.config, seed=12)
    weight, bias = _weights(exported.config, seed=13)
    plain = LiteRTBackend(exported.fp32.path)
    assert plain.signatures == ("embed", "forward", "train_step") and plain.trainable and plain.batch == BATCH
    np.testing.assert_array_equal(plain.embed(x["images"], weight, bias), fp32_backend.embed(x["images"], weight, bias))


def test_a_wrong_batch_is_refused_naming_both_sizes(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    x = _inputs(exported.config, seed=14, batch=BATCH + 1)
    weight, bias = _weights(exported.config, seed=15)
    with pytest.raises(BackendError, match=rf"fixed batch of {BATCH}; forward got images with a batch of {BATCH + 1}"):
        fp32_backend.forward(x["images"], weight, bias, x["noise"], 3, False)
    with pytest.raises(BackendError, match=rf"expects weight of shape"):
        fp32_backend.embed(_inputs(exported.config, seed=14)["images"], weight[:, :1], bias)


def test_the_parity_check_refuses_a_wrong_artifact(exported: Exported, fp32_backend: LiteRTBackend) -> None:
    class Off:  # the real artifact with its tokens nudged by 1e-3 of their scale
        model_path = fp32_backend.model_path

        def __getattr__(self, name):
            return getattr(fp32_backend, name)

        def embed(self, images, weight, bias):
            tokens = fp32_backend.embed(images, weight, bias)
            return tokens + 1e-3 * np.abs(tokens).max()

    with pytest.raises(ParityError, match=r"embed_max_abs_err = [0-9.e-]+ exceeds the threshold 1e-05"):
        tflite_export._fp32_parity(Off(), exported.config, BATCH)


# --- int8: frozen (inference only), looser documented tolerance ----------------------------------


def test_int8_artifact_is_frozen_smaller_and_records_its_parity(
    exported: Exported, int8_backend: LiteRTBackend
) -> None:
    # Prepare: the exporter's own check images and noise, to hold its record against
    art, fp32 = exported.int8, exported.fp32
    x = verify.reference_inputs(exported.config, BATCH)
    baked = (x["images"], exported.weight, exported.bias)
    # Execute
    embed_err = _rel(int8_backend.embed(*baked), _torch_tokens(*baked))
    within_one = {}
    for bits in (2, 8):
        diffs = [
            int8_backend.forward(*baked, x["noise"], 2**bits - 1, per_token)[0]
            - _torch_forward(*baked, x["noise"], bits, per_token)[0]
            for per_token in (False, True)
        ]
        within_one[bits] = float(np.mean(np.abs(np.concatenate(diffs)) <= 1))
    # Assert
    assert art.path.name == f"device_b{BATCH}_int8.tflite"
    assert (art.format, art.batch, art.trainable) == ("tflite-int8", BATCH, False)
    assert set(art.signatures) == {"embed", "forward"}
    assert art.extra["inputs"]["forward"] == {
        "images": "args_0", "noise": "args_1", "levels": "args_2", "per_token": "args_3"
    }
    size = art.path.stat().st_size
    # smaller than the same frozen graph in fp32, and than the fp32 artifact plus the fp32 weights it needs
    assert size < 0.75 * art.extra["fp32_bytes"]
    assert size < fp32.path.stat().st_size + exported.weight.nbytes + exported.bias.nbytes
    assert embed_err <= tflite_export.INT8_TOKEN_TOLERANCE
    assert embed_err / 2 <= art.parity["embed_max_rel_err"] <= 2 * embed_err  # the record is what the file does
    for bits, fraction in within_one.items():
        assert fraction >= 0.99
        assert abs(art.parity[f"codes_within_1_fraction_q{bits}"] - fraction) <= 0.01


def test_int8_embed_is_within_its_documented_tolerance(exported: Exported, int8_backend: LiteRTBackend) -> None:
    x = _inputs(exported.config, seed=16)
    tokens = int8_backend.embed(x["images"], exported.weight, exported.bias)
    err = _rel(tokens, _torch_tokens(x["images"], exported.weight, exported.bias))
    assert 0 < err <= tflite_export.INT8_TOKEN_TOLERANCE  # > 0: the weights really are int8


@pytest.mark.parametrize(("bits", "per_token"), CASES)
def test_int8_forward_codes_mostly_within_one(
    exported: Exported, int8_backend: LiteRTBackend, bits: int, per_token: bool
) -> None:
    x = _inputs(exported.config, seed=17 + bits)
    args = (x["images"], exported.weight, exported.bias, x["noise"])
    codes, lo, hi = int8_backend.forward(*args, 2**bits - 1, per_token)
    want_codes, want_lo, want_hi = _torch_forward(*args, bits, per_token)
    assert np.mean(np.abs(codes - want_codes) <= 1) >= 0.99
    assert _rel(lo, want_lo) <= tflite_export.INT8_TOKEN_TOLERANCE
    assert _rel(hi, want_hi) <= tflite_export.INT8_TOKEN_TOLERANCE


def test_int8_artifact_refuses_to_train(exported: Exported, int8_backend: LiteRTBackend) -> None:
    assert not int8_backend.trainable
    w, b = exported.weight, exported.bias
    x = _inputs(exported.config, seed=18)
    with pytest.raises(BackendError, match="no 'train_step' signature.*frozen, inference-only"):
        int8_backend.train_step(w, b, w * 0, b * 0, x["images"], x["grad_tokens"], 0.01, 0.9)


# --- refusals that need no conversion ------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, -1, True, 2.0])
def test_export_refuses_a_batch_that_is_not_a_positive_int(tmp_path, batch) -> None:
    with pytest.raises(ExportError, match="fixed batch >= 1"):
        tflite_export.export_tflite(tmp_path, get_preset("vit_quick_patch4_16"), batch)


def test_int8_export_refuses_weights_of_the_wrong_shape(tmp_path) -> None:
    config = get_preset("vit_quick_patch4_16")
    weight, bias = _weights(config, seed=0)
    with pytest.raises(ExportError, match=r"needs weight \(64, 3, 4, 4\) and bias \(64,\)"):
        tflite_export.export_tflite_int8(tmp_path, config, BATCH, weight[:32], bias)
    with pytest.raises(ExportError, match="NaN or inf"):
        tflite_export.export_tflite_int8(tmp_path, config, BATCH, weight * np.nan, bias)


def test_the_backend_refuses_missing_and_corrupt_models(tmp_path) -> None:
    with pytest.raises(BackendError, match="no such model file"):
        LiteRTBackend(tmp_path / "absent.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(BackendError, match="LiteRT cannot load it"):
        LiteRTBackend(tmp_path / "junk.tflite")


def test_the_backend_refuses_io_names_that_do_not_fit_the_model(exported: Exported) -> None:
    io = {key: {sig: dict(names) for sig, names in exported.fp32.extra[key].items()} for key in ("inputs", "outputs")}
    io["outputs"]["train_step"] = {"weight": "output_0", "bias": "output_1", "mw": "output_2", "mb": "output_3"}
    with pytest.raises(BackendError, match="io names of 'train_step' map"):
        LiteRTBackend(exported.fp32.path, io)
    io = {key: {sig: dict(names) for sig, names in exported.fp32.extra[key].items()} for key in ("inputs", "outputs")}
    io["inputs"]["embed"]["images"] = "args_9"
    with pytest.raises(BackendError, match=r"do not match the model's tensors \['args_0', 'args_9'\]"):
        LiteRTBackend(exported.fp32.path, io)
