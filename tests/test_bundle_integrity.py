"""``sflam device`` and ``sflam device-host`` check the bundle's hashes before anything connects.

Each test works on a copy of the session's exported ``quick_bundle``. The broker URL points at a
127.0.0.1 port nothing listens on: a device that got past the check would log its failed connects
and retry for ever, which the control test shows.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.bundle import BundleError, verify_bundle
from edge_runtime.commands import verified_bundle

ROOT = Path(__file__).resolve().parents[1]
EXIT_TIMEOUT_S = 60.0  # a failure guard only: a device past the check never exits by itself


@pytest.fixture()
def bundle(quick_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(quick_bundle, tmp_path / "bundle"))


@pytest.fixture()
def data_spec(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, 8))
    return f"npz:{path}"


@pytest.fixture()
def dead_broker() -> str:
    """An mqtt:// URL on a loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"mqtt://127.0.0.1:{port}"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def sflam(*args: str) -> list[str]:
    return [sys.executable, "-m", "sflam", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_an_untouched_copy_passes_and_files_outside_the_manifest_are_ignored(bundle: Path) -> None:
    (bundle / "keys").mkdir()
    (bundle / "keys" / "dev-0.key").write_bytes(b"added at flash time, not in the manifest")
    assert verify_bundle(bundle) == []
    assert verified_bundle(str(bundle)) == bundle


def test_every_problem_is_listed(bundle: Path) -> None:
    flip_a_byte(bundle / "weights.safetensors")
    (bundle / "embed.onnx").unlink()
    (bundle / "check.npz").write_bytes(b"short")
    with pytest.raises(BundleError, match="failed its integrity check") as err:
        verified_bundle(bundle)
    size = json.loads((bundle / "manifest.json").read_text())["files"]["check.npz"]["bytes"]
    assert str(err.value).splitlines()[1:] == [
        f"  check.npz: 5 bytes, manifest says {size}", "  embed.onnx: missing",
        "  weights.safetensors: sha256 differs from the manifest (corrupted or altered)",
    ]


def test_an_untouched_bundle_gets_as_far_as_connecting(bundle: Path, data_spec: str, dead_broker: str) -> None:
    # The control: with a sound bundle the same command logs its connect attempts to stderr.
    command = sflam("device", "--bundle", str(bundle), "--broker", dead_broker, "--device-id", "d0",
                    "--data", data_spec, "--backend", "numpy", "--meter", "estimate")
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        attempt = next((line for _, line in zip(range(200), proc.stderr) if "connect to 127.0.0.1:" in line), None)
    finally:
        proc.terminate()
        proc.communicate(timeout=EXIT_TIMEOUT_S)
    assert attempt is not None and f"connect to {dead_broker.removeprefix('mqtt://')} failed" in attempt


def test_sflam_device_refuses_a_tampered_bundle_before_connecting(
    bundle: Path, data_spec: str, dead_broker: str
) -> None:
    # Prepare: two files of the manifest altered, size kept (only the sha256 can tell)
    flip_a_byte(bundle / "weights.safetensors")
    flip_a_byte(bundle / "device.json")
    command = sflam("device", "--bundle", str(bundle), "--broker", dead_broker, "--device-id", "d0",
                    "--data", data_spec, "--backend", "numpy", "--meter", "estimate")
    # Execute
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    # Assert: a clean error naming both files, and no connect attempt
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"sflam device: error: bundle {bundle} failed its integrity check")
    assert "device.json: sha256 differs" in done.stderr and "weights.safetensors: sha256 differs" in done.stderr
    assert "connect" not in done.stderr and "Traceback" not in done.stderr
    assert "sflam-device-summary" not in done.stdout


def test_sflam_device_host_refuses_a_tampered_bundle_first(bundle: Path, dead_broker: str, tmp_path: Path) -> None:
    flip_a_byte(bundle / "forward.onnx")
    command = sflam("device-host", "--bundle", str(bundle), "--broker", dead_broker,
                    "--devices", str(tmp_path / "no-such-host-file.json"))
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "failed its integrity check" in done.stderr and "forward.onnx: sha256 differs" in done.stderr
    assert "no-such-host-file" not in done.stderr  # the bundle is checked before the host file is read
