"""ONNX artifacts and the numpy / ONNX Runtime backends against torch and an autograd SGD oracle.

The references are computed here, independently of ``export.verify``: tokens by the model's own
patch embedding (``server_runtime.vit.PatchEmbed``), codes by the numpy reference quantizer
(``edge_runtime.quantize``) on those tokens with the same noise, train steps by autograd and
``torch.optim.SGD`` with momentum. Inputs are drawn here, with other seeds than the exporter's.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.backends.base import Backend, BackendError
from edge_runtime.backends.numpy_backend import NumpyBackend
from edge_runtime.backends.onnx_backend import FILES, NAMES, OnnxBackend
from edge_runtime.quantize import encode_codes, ranges
from export import verify
from export.artifact import Artifact, ParityError
from export.graphs import TrainStepGraph
from export.onnx_export import OPSET, export_onnx
from server_runtime.presets import ViTConfig, get_preset
from server_runtime.vit import PatchEmbed

PRESETS = ["vit_quick_patch4_16", "vit_mini_patch4_32", "vit_tiny_patch16_224"]
BATCHES = [1, 3]
SIGNATURES = list(verify.SIGNATURES)
QUANTIZER_CASES = [(bits, per) for bits in (1, 4, 8) for per in ("tensor", "token")]
# float32 in another runtime: tokens measured within ~1e-6 of max(1, token scale) (vit_tiny), SGD
# states within ~6e-7 of their own scale. Codes may differ by one on boundary values, rarely.
FLOAT_TOL = 1e-5
CODE_MISMATCH_FRACTION = 1e-3
LR, MOMENTUM, GRAD_SCALE, TRAIN_STEPS = 0.01, 0.9, 1e-2, 3


@pytest.fixture(scope="module", params=PRESETS)
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ViTConfig, Path, list[Artifact]]:
    """The three ONNX files of a preset, exported (and verified by the exporter) once per module."""
    config = get_preset(request.param)
    out = tmp_path_factory.mktemp(config.name)
    return config, out, export_onnx(out, config)


@pytest.fixture(scope="module")
def onnx_backend(exported: tuple[ViTConfig, Path, list[Artifact]]) -> OnnxBackend:
    return OnnxBackend(exported[1], threads=1)


# --- references computed here ---------------------------------------------------------------------


def _draw(config: ViTConfig, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Normal images, weights at nn.Conv2d's init scale, U[0,1) noise and a small gradient."""
    rng = np.random.default_rng(seed)
    chans, patch, dim, size = config.in_chans, config.patch_size, config.embed_dim, config.img_size
    bound = (chans * patch * patch) ** -0.5
    tokens = (batch, config.num_patches, dim)
    return {
        "images": rng.standard_normal((batch, chans, size, size)).astype(np.float32),
        "weight": rng.uniform(-bound, bound, (dim, chans, patch, patch)).astype(np.float32),
        "bias": rng.uniform(-bound, bound, dim).astype(np.float32),
        "noise": rng.random(tokens, dtype=np.float32),
        "grad_tokens": (rng.standard_normal(tokens) * GRAD_SCALE).astype(np.float32),
    }


def _patch_embedding(config: ViTConfig, weight: np.ndarray, bias: np.ndarray) -> PatchEmbed:
    """The server model's patch embedding holding ``weight`` and ``bias``."""
    embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, config.embed_dim)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.from_numpy(weight))
        embed.proj.bias.copy_(torch.from_numpy(bias))
    return embed


def _model_tokens(config: ViTConfig, images: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _patch_embedding(config, weight, bias)(torch.from_numpy(images)).numpy()


def _reference_forward(
    tokens: np.ndarray, noise: np.ndarray, bits: int, per: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference quantizer's codes (B, N, D) and its lo, hi broadcast to the graphs' (B, N, 1)."""
    lo, hi = ranges(tokens, per)
    codes = encode_codes(tokens, lo, hi, bits, noise, per).reshape(tokens.shape)
    shape = (*tokens.shape[:2], 1)
    if per == "tensor":
        lo, hi = np.full(shape, lo[0]), np.full(shape, hi[0])
    return codes.astype(np.float32), lo.reshape(shape), hi.reshape(shape)


def _scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|); inf when the shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, float(np.abs(want).max())))


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: for tensors on their own scale (weights, momentum buffers)."""
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _embed_error(backend: Backend, config: ViTConfig, batch: int, seed: int) -> float:
    """The runtime's tokens against the model's patch embedding, scaled by max(1, token scale)."""
    x = _draw(config, batch, seed)
    tokens = backend.embed(x["images"], x["weight"], x["bias"])
    return _scaled_error(tokens, _model_tokens(config, x["images"], x["weight"], x["bias"]))


@dataclass(frozen=True)
class Agreement:
    """A runtime's forward against the reference quantizer, over every QUANTIZER_CASE."""

    codes_valid: bool  # the reference's shape, integers in [0, levels]
    code_max_diff: float
    code_mismatch_fraction: float
    range_error: float  # lo and hi, scaled as _scaled_error


def _forward_agreement(backend: Backend, config: ViTConfig, batch: int, seed: int) -> Agreement:
    x = _draw(config, batch, seed)
    tokens = _model_tokens(config, x["images"], x["weight"], x["bias"])
    valid, diffs, range_error = True, [], 0.0
    for bits, per in QUANTIZER_CASES:
        levels = 2**bits - 1
        codes, lo, hi = backend.forward(x["images"], x["weight"], x["bias"], x["noise"], levels, per == "token")
        want_codes, want_lo, want_hi = _reference_forward(tokens, x["noise"], bits, per)
        valid &= codes.shape == want_codes.shape and bool(np.array_equal(codes, np.floor(codes)))
        valid &= bool(codes.min() >= 0 and codes.max() <= levels)
        diffs.append(np.abs(codes - want_codes).ravel() if valid else np.array([np.inf]))
        range_error = max(range_error, _scaled_error(lo, want_lo), _scaled_error(hi, want_hi))
    diff = np.concatenate(diffs)
    return Agreement(valid, float(diff.max()), float(np.mean(diff > 0)), range_error)


def _train_step_error(backend: Backend, config: ViTConfig, batch: int, seed: int) -> float:
    """Worst relative error over TRAIN_STEPS chained steps (the runtime's outputs fed back) against
    autograd through the model's patch embedding and torch.optim.SGD with momentum."""
    start = _draw(config, batch, seed)
    embed = _patch_embedding(config, start["weight"], start["bias"])
    params = (embed.proj.weight, embed.proj.bias)
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    state = (start["weight"], start["bias"], np.zeros_like(start["weight"]), np.zeros_like(start["bias"]))
    worst = 0.0
    for step in range(TRAIN_STEPS):
        x = _draw(config, batch, seed + 1 + step)
        sgd.zero_grad()
        embed(torch.from_numpy(x["images"])).backward(torch.from_numpy(x["grad_tokens"]))
        sgd.step()
        state = backend.train_step(*state, x["images"], x["grad_tokens"], LR, MOMENTUM)
        want = (*params, *(sgd.state[p]["momentum_buffer"] for p in params))
        worst = max(worst, *(_relative_error(got, ref.detach().numpy()) for got, ref in zip(state, want)))
    return worst


class TorchTrainStep:
    """``export.graphs.TrainStepGraph`` with the Backend's train_step signature."""

    def train_step(self, *args: np.ndarray | float) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            out = TrainStepGraph()(*(torch.from_numpy(np.array(a, np.float32)) for a in args))
        return tuple(o.numpy() for o in out)


# --- the exported files ---------------------------------------------------------------------------


def test_export_returns_three_dynamic_batch_artifacts_that_record_their_parity(
    exported, onnx_backend: OnnxBackend
) -> None:
    # Prepare
    config, out, artifacts = exported
    embed, forward, _ = (a.parity for a in artifacts)
    # Execute: the embed error on the exporter's own check inputs, measured here
    measured = max(
        _scaled_error(
            onnx_backend.embed(x["images"], x["weight"], x["bias"]),
            _model_tokens(config, x["images"], x["weight"], x["bias"]),
        )
        for x in (verify.reference_inputs(config, batch) for batch in BATCHES)
    )
    # Assert
    assert [a.path for a in artifacts] == [out / FILES[s] for s in SIGNATURES]
    assert [a.signatures for a in artifacts] == [(s,) for s in SIGNATURES]
    assert all(a.format == "onnx" and a.batch is None and a.trainable for a in artifacts)
    assert all(a.extra["check_batches"] == BATCHES for a in artifacts)
    assert all(len(a.sha256) == 64 for a in artifacts)
    assert measured <= FLOAT_TOL
    assert measured / 2 <= embed["embed_max_abs_err"] <= 2 * measured  # the record is what the file does
    # 2 check batches x 3 bit widths x 2 range granularities, every code compared.
    per_batch = config.num_patches * config.embed_dim * len(verify.LEVELS) * 2
    assert forward["forward_codes_compared"] == sum(BATCHES) * per_batch


def test_files_pass_the_checker_are_single_files_and_carry_the_names(exported) -> None:
    _, out, artifacts = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())  # no external-data files
    for artifact in artifacts:
        onnx.checker.check_model(str(artifact.path), full_check=True)
        model = onnx.load(str(artifact.path))
        (signature,) = artifact.signatures
        assert {o.domain: o.version for o in model.opset_import}[""] == OPSET
        assert tuple(i.name for i in model.graph.input) == NAMES[signature][0] == verify.SIGNATURES[signature][0]
        assert tuple(o.name for o in model.graph.output) == NAMES[signature][1] == verify.SIGNATURES[signature][1]
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            batched = value.name in verify.BATCH_INPUTS | verify.BATCH_OUTPUTS
            assert bool(dims and dims[0].dim_param) == batched, value.name


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_embed_matches_the_models_patch_embedding(exported, onnx_backend: OnnxBackend, batch: int) -> None:
    error = _embed_error(onnx_backend, exported[0], batch, seed=11)
    assert error <= FLOAT_TOL


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_forward_codes_are_the_reference_quantizers_within_one(
    exported, onnx_backend: OnnxBackend, batch: int
) -> None:
    agreement = _forward_agreement(onnx_backend, exported[0], batch, seed=12)
    assert agreement.codes_valid
    assert agreement.code_max_diff <= 1
    assert agreement.code_mismatch_fraction <= CODE_MISMATCH_FRACTION
    assert agreement.range_error <= FLOAT_TOL


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_train_step_follows_torch_sgd_for_three_steps(exported, onnx_backend: OnnxBackend, batch: int) -> None:
    error = _train_step_error(onnx_backend, exported[0], batch, seed=13)
    assert error <= FLOAT_TOL


# --- the numpy backend and the torch graph, against the same references ----------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", BATCHES)
def test_numpy_backend_matches_the_model_embedding_the_quantizer_and_sgd(preset: str, batch: int) -> None:
    # Prepare
    config, backend = get_preset(preset), NumpyBackend()
    # Execute
    embed_error = _embed_error(backend, config, batch, seed=5)
    agreement = _forward_agreement(backend, config, batch, seed=6)
    train_error = _train_step_error(backend, config, batch, seed=7)
    # Assert
    assert embed_error <= FLOAT_TOL
    assert agreement.codes_valid and agreement.code_max_diff <= 1
    assert agreement.code_mismatch_fraction <= CODE_MISMATCH_FRACTION
    assert agreement.range_error <= FLOAT_TOL
    assert train_error <= FLOAT_TOL


def test_the_torch_train_step_graph_follows_torch_sgd_over_three_steps() -> None:
    error = _train_step_error(TorchTrainStep(), get_preset("vit_quick_patch4_16"), 3, seed=8)
    assert error <= FLOAT_TOL


@pytest.mark.parametrize("per", ["tensor", "token"])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_numpy_backend_codes_are_the_reference_quantizer_codes(bits: int, per: str) -> None:
    # Prepare
    inputs = verify.reference_inputs(get_preset("vit_mini_patch4_32"), 2, seed=bits)
    backend = NumpyBackend()
    # Execute
    tokens = backend.embed(inputs["images"], inputs["weight"], inputs["bias"])
    codes, lo, hi = backend.forward(
        inputs["images"], inputs["weight"], inputs["bias"], inputs["noise"], 2**bits - 1, per == "token"
    )
    # Assert: the same float32 operations as edge_runtime.quantize, so the same codes exactly.
    groups = tokens.shape[0] * tokens.shape[1] if per == "token" else 1
    expected = encode_codes(tokens, lo.reshape(-1)[:groups], hi.reshape(-1)[:groups], bits, inputs["noise"], per)
    assert np.array_equal(codes.reshape(-1), expected.astype(np.float32))
    assert np.array_equal(lo[..., 0], tokens.min(axis=2) if per == "token" else np.full(lo.shape[:2], tokens.min()))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_onnx_backend_codes_are_numpy_codes_within_one(onnx_backend, exported, bits: int, per_token: bool) -> None:
    config = exported[0]
    inputs = verify.reference_inputs(config, 3, seed=100 + bits)
    args = (inputs["images"], inputs["weight"], inputs["bias"], inputs["noise"], 2.0**bits - 1, per_token)
    onnx_codes, onnx_lo, onnx_hi = onnx_backend.forward(*args)
    numpy_codes, numpy_lo, numpy_hi = NumpyBackend().forward(*args)
    diff = np.abs(onnx_codes - numpy_codes)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= CODE_MISMATCH_FRACTION * diff.size
    assert onnx_codes.min() >= 0 and onnx_codes.max() == 2**bits - 1  # the range's top is reached
    np.testing.assert_allclose(onnx_lo, numpy_lo, atol=1e-5)
    np.testing.assert_allclose(onnx_hi, numpy_hi, atol=1e-5)


# --- the checks can fail, and say why -------------------------------------------------------------


def test_a_wrong_embedding_fails_parity_with_its_numbers() -> None:
    honest = verify.backend_runs(NumpyBackend())["embed"]
    with pytest.raises(ParityError, match=r"embed_max_abs_err = 0\.00\d+ exceeds the threshold 1e-05"):
        verify.check_embed(lambda x: (honest(x)[0] + 1e-3,), get_preset("vit_quick_patch4_16"), 1)


def test_codes_two_apart_fail_parity() -> None:
    honest = verify.backend_runs(NumpyBackend())["forward"]

    def off_by_two(x):
        codes, lo, hi = honest(x)
        codes = codes.copy()
        codes.flat[0] += 2.0 if codes.flat[0] <= 253 else -2.0
        return codes, lo, hi

    with pytest.raises(ParityError, match="forward_code_max_diff = 2"):
        verify.check_forward(off_by_two, get_preset("vit_quick_patch4_16"), 1, levels=[255.0])


def test_sgd_without_momentum_fails_the_oracle_on_the_second_step() -> None:
    honest = verify.backend_runs(NumpyBackend())["train_step"]
    forgetful = lambda x: honest({**x, "momentum": np.float32(0.0)})  # noqa: E731
    with pytest.raises(ParityError, match=r"train_step_max_rel_err .* step 2"):
        verify.check_train_step(forgetful, get_preset("vit_quick_patch4_16"), 2)


# --- what a user sees when a bundle is broken -----------------------------------------------------


@pytest.fixture
def bundle_copy(exported, tmp_path: Path) -> Path:
    for name in FILES.values():
        shutil.copy(exported[1] / name, tmp_path / name)
    return tmp_path


def test_an_absent_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "train_step.onnx").unlink()
    with pytest.raises(BackendError, match=r"train_step graph train_step\.onnx is missing from"):
        OnnxBackend(bundle_copy)


def test_a_corrupted_file_is_named(bundle_copy: Path) -> None:
    data = (bundle_copy / "forward.onnx").read_bytes()
    (bundle_copy / "forward.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match=r"onnxruntime cannot load .*forward\.onnx \(forward\)"):
        OnnxBackend(bundle_copy)


def test_a_file_of_another_graph_is_refused(bundle_copy: Path) -> None:
    with pytest.raises(BackendError, match="is not a forward graph"):
        OnnxBackend(bundle_copy, {"forward": "embed.onnx"})


def test_a_partial_bundle_runs_what_it_has_and_names_what_it_lacks(bundle_copy: Path, exported) -> None:
    backend = OnnxBackend(bundle_copy, {"embed": "embed.onnx"})
    inputs = verify.reference_inputs(exported[0], 1)
    assert backend.embed(inputs["images"], inputs["weight"], inputs["bias"]).shape[0] == 1
    with pytest.raises(BackendError, match="no train_step graph was loaded"):
        backend.train_step(*(inputs[n] for n in NAMES["train_step"][0]))


def test_bad_input_shapes_are_backend_errors(onnx_backend: OnnxBackend, exported) -> None:
    inputs = verify.reference_inputs(exported[0], 1)
    with pytest.raises(BackendError, match="onnxruntime failed to run embed"):
        onnx_backend.embed(inputs["images"][:, :2], inputs["weight"], inputs["bias"])
    with pytest.raises(BackendError, match="images have 2 channels"):
        NumpyBackend().embed(inputs["images"][:, :2], inputs["weight"], inputs["bias"])


def test_missing_onnxruntime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, bundle_copy: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(BackendError, match="needs onnxruntime"):
        OnnxBackend(bundle_copy)


def test_export_refuses_a_sample_batch_of_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_batch must be >= 2"):
        export_onnx(tmp_path, get_preset("vit_quick_patch4_16"), sample_batch=1)
    assert list(tmp_path.iterdir()) == []


def test_export_raises_parity_error_with_the_numbers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(verify, "EMBED_TOLERANCE", -1.0)  # no runtime can meet it
    with pytest.raises(ParityError, match=r"embed_max_abs_err = \S+ exceeds the threshold -1 \(preset vit_quick"):
        export_onnx(tmp_path, get_preset("vit_quick_patch4_16"), check_batches=(2,))
