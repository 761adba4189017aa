"""ONNX artifacts and the numpy / ONNX Runtime backends against torch and the autograd SGD oracle."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_runtime.backends.base import BackendError
from edge_runtime.backends.numpy_backend import NumpyBackend
from edge_runtime.backends.onnx_backend import FILES, NAMES, OnnxBackend
from edge_runtime.quantize import encode_codes
from export import verify
from export.artifact import Artifact, ParityError
from export.onnx_export import OPSET, export_onnx
from server_runtime.presets import ViTConfig, get_preset

PRESETS = ["vit_quick_patch4_16", "vit_mini_patch4_32", "vit_tiny_patch16_224"]
BATCHES = [1, 3]
SIGNATURES = list(verify.SIGNATURES)


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


def test_export_returns_three_verified_dynamic_batch_artifacts(exported) -> None:
    config, out, artifacts = exported
    assert [a.path for a in artifacts] == [out / FILES[s] for s in SIGNATURES]
    assert [a.signatures for a in artifacts] == [(s,) for s in SIGNATURES]
    assert all(a.format == "onnx" and a.batch is None and a.trainable for a in artifacts)
    embed, forward, train = (a.parity for a in artifacts)
    assert 0 <= embed["embed_max_abs_err"] <= verify.EMBED_TOLERANCE
    assert 0 <= forward["forward_max_abs_err"] <= verify.RANGE_TOLERANCE
    assert forward["forward_code_max_diff"] <= 1
    assert forward["forward_code_mismatches"] <= verify.CODE_MISMATCH_FRACTION * forward["forward_codes_compared"]
    # 2 check batches x 3 bit widths x 2 range granularities, every code compared.
    per_batch = config.num_patches * config.embed_dim * len(verify.LEVELS) * 2
    assert forward["forward_codes_compared"] == sum(BATCHES) * per_batch
    assert 0 < train["train_step_max_rel_err"] <= verify.TRAIN_STEP_TOLERANCE
    assert all(len(a.sha256) == 64 for a in artifacts)


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
def test_onnx_runtime_matches_torch_for_every_graph(exported, onnx_backend: OnnxBackend, batch: int) -> None:
    config = exported[0]
    # Execute: fresh inputs (another seed than the exporter's own check).
    metrics = verify.check_signatures(verify.backend_runs(onnx_backend), config, [batch], seed=11)
    # Assert
    assert metrics["embed_max_abs_err"] <= verify.EMBED_TOLERANCE
    assert metrics["forward_code_max_diff"] <= 1
    assert metrics["train_step_max_rel_err"] <= verify.TRAIN_STEP_TOLERANCE


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", BATCHES)
def test_numpy_backend_matches_torch_and_the_sgd_oracle(preset: str, batch: int) -> None:
    metrics = verify.check_signatures(verify.backend_runs(NumpyBackend()), get_preset(preset), [batch], seed=5)
    assert metrics["embed_max_abs_err"] <= verify.EMBED_TOLERANCE
    assert metrics["forward_code_max_diff"] <= 1
    assert 0 < metrics["train_step_max_rel_err"] <= verify.TRAIN_STEP_TOLERANCE


def test_the_torch_train_step_graph_matches_autograd_sgd_over_three_steps() -> None:
    error = verify.check_train_step(verify.torch_run("train_step"), get_preset("vit_quick_patch4_16"), 3, steps=3)
    assert 0 < error["train_step_max_rel_err"] <= verify.TRAIN_STEP_TOLERANCE


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
    assert np.count_nonzero(diff) <= verify.CODE_MISMATCH_FRACTION * diff.size
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
