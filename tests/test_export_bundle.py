"""`sflam export` end to end: a verified bundle, its manifest, and the launcher's --check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.bundle import read_manifest, verify_bundle
from edge_runtime.launch import main as launch_main
from export.artifact import ExportError, ExportRefused
from export.bundle import export_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "quick-pi5"
    return export_bundle("vit_quick_patch4_16", "raspberry-pi-5", out, batch=2, formats=("onnx",))


def test_bundle_holds_every_file_with_hashes_and_parity(onnx_bundle: Path) -> None:
    manifest = read_manifest(onnx_bundle)
    names = set(manifest["files"])
    assert {"embed.onnx", "forward.onnx", "train_step.onnx", "weights.safetensors", "device.json",
            "check.npz", "launch.sh", "sflam-device.service"} <= names
    assert manifest["preset"] == "vit_quick_patch4_16" and manifest["opset"] == 18
    assert manifest["frozen_embedding"] is False
    for name in ("embed.onnx", "forward.onnx", "train_step.onnx"):
        entry = manifest["files"][name]
        assert entry["format"] == "onnx" and entry["parity"], name
    assert verify_bundle(onnx_bundle) == []
    assert not (onnx_bundle.parent / "quick-pi5.partial").exists()


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
        export_bundle("vit_quick_patch4_16", "raspberry-pi-5", onnx_bundle, formats=("onnx",))
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
    bad = subprocess.run(
        [sys.executable, "-m", "sflam", "export", "--model", "vit_quick_patch4_16", "--profile", "esp32-s3",
         "--formats", "onnx", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert bad.returncode == 2 and "does not run onnx" in bad.stderr
