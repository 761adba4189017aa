"""`sflam export` end to end: a verified bundle, its manifest, and the launcher's --check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_runtime.bundle import WEIGHT_KEYS, BundleError, load_weights, read_manifest, verify_bundle
from edge_runtime.launch import main as launch_main
from edge_runtime.quantize import encode_codes, ranges
from export.artifact import ExportError, ExportRefused
from export.bundle import export_bundle
from server_runtime.checkpoint import create_model

ROOT = Path(__file__).resolve().parents[1]
PRESET = "vit_quick_patch4_16"
TOKEN_TOL = 1e-5  # float32 in onnxruntime against torch, of max(1, token scale)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "quick-pi5"
    return export_bundle(PRESET, "raspberry-pi-5", out, batch=2, formats=("onnx",))


@pytest.fixture(scope="module")
def patch_embed() -> torch.nn.Module:
    """The patch embedding of the model the bundle was exported from (no checkpoint: seed 0)."""
    return create_model(PRESET, seed=0).eval().patch_embed


def _model_tokens(patch_embed: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return patch_embed(torch.from_numpy(images)).numpy()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bundle_holds_every_file_with_hashes_and_parity(onnx_bundle: Path) -> None:
    manifest = read_manifest(onnx_bundle)
    names = set(manifest["files"])
    assert {"embed.onnx", "forward.onnx", "train_step.onnx", "weights.safetensors", "device.json",
            "check.npz", "launch.sh", "sflam-device.service"} <= names
    assert manifest["preset"] == "vit_quick_patch4_16" and manifest["opset"] == 18
    assert manifest["frozen_embedding"] is False
    recorded = {"embed.onnx": "embed_max_abs_err", "forward.onnx": "forward_code_max_diff",
                "train_step.onnx": "train_step_max_rel_err"}
    for name, metric in recorded.items():
        entry = manifest["files"][name]
        assert entry["format"] == "onnx" and metric in entry["parity"], name
    assert verify_bundle(onnx_bundle) == []
    assert not (onnx_bundle.parent / "quick-pi5.partial").exists()


def test_bundle_graphs_with_its_weights_compute_the_models_embedding_and_codes(
    onnx_bundle: Path, patch_embed: torch.nn.Module
) -> None:
    # Prepare: fresh images and noise; the bundle's files in onnxruntime
    rng = np.random.default_rng(21)
    images = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    noise = rng.random((2, 16, 64), dtype=np.float32)
    weight, bias = (load_weights(onnx_bundle)[key] for key in WEIGHT_KEYS)
    graph_inputs = {"images": images, "weight": weight, "bias": bias}
    quantizer = {"noise": noise, "levels": np.array(255, np.float32), "per_token": np.array(1, np.float32)}
    # Execute
    (tokens,) = _session(onnx_bundle / "embed.onnx").run(["tokens"], graph_inputs)
    codes, lo, hi = _session(onnx_bundle / "forward.onnx").run(["codes", "lo", "hi"], {**graph_inputs, **quantizer})
    want = _model_tokens(patch_embed, images)
    want_lo, want_hi = ranges(want, "token")
    want_codes = encode_codes(want, want_lo, want_hi, 8, noise, "token")
    # Assert: the model's own weights travel, and the graphs compute its tokens and the reference codes
    np.testing.assert_array_equal(weight, patch_embed.proj.weight.detach().numpy())
    np.testing.assert_array_equal(bias, patch_embed.proj.bias.detach().numpy())
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(tokens - want).max() <= TOKEN_TOL * scale
    diff = np.abs(codes.reshape(-1) - want_codes)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3  # runtimes may differ by one on boundaries
    assert np.abs(lo.reshape(-1) - want_lo).max() <= TOKEN_TOL * scale
    assert np.abs(hi.reshape(-1) - want_hi).max() <= TOKEN_TOL * scale


def test_check_vector_holds_the_models_outputs(onnx_bundle: Path, patch_embed: torch.nn.Module) -> None:
    # Prepare: what `launch.sh --check` holds a device to
    check = np.load(onnx_bundle / "check.npz")
    # Execute
    want = _model_tokens(patch_embed, check["images"])
    want_lo, want_hi = ranges(want, "tensor")
    want_codes = encode_codes(want, want_lo, want_hi, 8, check["noise"], "tensor")
    # Assert
    assert (float(check["levels"][0]), float(check["per_token"][0])) == (255.0, 0.0)  # --bits 8, one range
    np.testing.assert_allclose(check["tokens"], want, rtol=0, atol=TOKEN_TOL * max(1.0, float(np.abs(want).max())))
    assert np.abs(check["codes"].reshape(-1) - want_codes).max() <= 1
    np.testing.assert_allclose(check["lo"].reshape(-1), np.full(check["lo"].size, want_lo[0]), rtol=1e-6)
    np.testing.assert_allclose(check["hi"].reshape(-1), np.full(check["hi"].size, want_hi[0]), rtol=1e-6)


def test_launcher_check_passes_and_fails_on_a_corrupted_file(onnx_bundle: Path, tmp_path: Path, capsys) -> None:
    # Prepare: a copy to corrupt
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, copy)
    # Execute / Assert: the pristine bundle passes with the ONNX Runtime and numpy backends
    assert launch_main(["--bundle", str(copy), "--check", "--backend", "onnx"]) == 0
    assert launch_main(["--bundle", str(copy), "--check", "--backend", "numpy"]) == 0
    assert "forward check: ok" in capsys.readouterr().out
    # a flipped byte in a model file is caught by the hash check, naming the file
    data = bytearray((copy / "forward.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "forward.onnx").write_bytes(bytes(data))
    assert launch_main(["--bundle", str(copy), "--check"]) == 1
    assert "forward.onnx: sha256 differs" in capsys.readouterr().err


def test_launch_sh_runs_the_check_from_anywhere(onnx_bundle: Path) -> None:
    env = {"SFLAM_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(onnx_bundle / "launch.sh"), "--check", "--backend", "onnx"],
                            capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "bundle integrity: ok" in result.stdout


def test_device_json_describes_how_to_run_it(onnx_bundle: Path) -> None:
    device = json.loads((onnx_bundle / "device.json").read_text())
    assert device["image_size"] == 16 and device["num_patches"] == 16 and device["embed_dim"] == 64
    assert device["batch_size"] == 2 and device["trainable"] is True


def test_existing_destination_and_unsupported_formats_are_refused(onnx_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="exists"):
        export_bundle(PRESET, "raspberry-pi-5", onnx_bundle, formats=("onnx",))
    with pytest.raises(ExportError, match="does not run tflite-micro"):
        export_bundle("vit_quick_patch4_16", "raspberry-pi-5", tmp_path / "b", formats=("tflite-micro",))
    with pytest.raises(ExportError, match="bits must be 1..8"):
        export_bundle("vit_quick_patch4_16", "raspberry-pi-5", tmp_path / "b", bits=16)
    assert not (tmp_path / "b").exists()


def test_vit_b32_on_a_microcontroller_is_refused_naming_sizes(tmp_path: Path) -> None:
    with pytest.raises(ExportRefused, match="stm32h7") as info:
        export_bundle("vit_base_patch32_224", "stm32h7", tmp_path / "mcu")
    assert "MB" in str(info.value) or "MiB" in str(info.value)
    assert not (tmp_path / "mcu").exists() and not (tmp_path / "mcu.partial").exists()


def test_cli_export_prints_the_files(tmp_path: Path) -> None:
    out = tmp_path / "cli-bundle"
    result = subprocess.run(
        [sys.executable, "-m", "sflam", "export", "--model", "vit_quick_patch4_16", "--profile", "jetson-orin-nano",
         "--formats", "onnx", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "forward.onnx" in result.stdout and verify_bundle(out) == []
    assert "target platform linux-aarch64: --backend auto tries onnx, litert, numpy" in result.stdout
    phone = subprocess.run(
        [sys.executable, "-m", "sflam", "export", "--model", "vit_quick_patch4_16", "--profile", "android-midrange",
         "--formats", "onnx", "--batch", "2", "--out", str(tmp_path / "phone")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert phone.returncode == 0, phone.stderr
    assert "note: onnx: no onnx runtime installs on android-aarch64; the device client there runs numpy" in phone.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "sflam", "export", "--model", "vit_quick_patch4_16", "--profile", "esp32-s3",
         "--formats", "onnx", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert bad.returncode == 2 and "does not run onnx" in bad.stderr


def test_unreadable_or_incomplete_weights_are_a_bundle_error(onnx_bundle: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"weights.safetensors: unreadable weights \(.*header"):
        load_weights(tmp_path)
    save_file({"patch_embed.proj.weight": np.zeros((2, 3, 4, 4), np.float32)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"missing patch_embed.proj.bias"):
        load_weights(tmp_path)
    weights = load_weights(onnx_bundle)
    assert all(w.dtype == np.float32 and w.flags.writeable for w in weights.values())
