"""A device bundle on disk: its manifest, integrity check, weights and the backend that runs it.

Layout (written by ``export.bundle``)::

    manifest.json         what the bundle is: preset, shapes, quantizer, every file's sha256 and parity
    device.json           how the device should run it (batch, image size, normalization, lr, ...)
    weights.safetensors   initial device weights (patch_embed.proj.weight / .bias)
    check.npz             inputs and expected outputs of one forward, for ``launch.sh --check``
    *.onnx / *.tflite     the artifacts
    launch.sh, sflam-device.service
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import platforms
from edge_runtime.backends.base import Backend, BackendError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
WEIGHT_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias")


class BundleError(ValueError):
    """A bundle that is missing, malformed or corrupted; the message lists every problem."""


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The parsed manifest, with its required keys checked."""
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST}; is this an sflam bundle?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    missing = [k for k in ("format_version", "preset", "files", "config") if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing keys {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest['format_version']} (this runtime reads {FORMAT_VERSION})")
    return manifest


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_bundle(bundle: Path) -> list[str]:
    """Every integrity problem of a bundle (missing, resized or altered files); empty when sound."""
    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        return [str(exc)]
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif file_sha256(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (corrupted or altered)")
    return problems


def load_weights(bundle: Path) -> dict[str, np.ndarray]:
    """The bundle's device weights as float32 arrays, read tensor by tensor from the mapped file
    (one copy each, not the whole file twice: ViT-B/32's are 9.4 MB)."""
    from safetensors import SafetensorError, safe_open

    path = Path(bundle) / "weights.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as handle:
            missing = [k for k in WEIGHT_KEYS if k not in handle.keys()]
            weights = {} if missing else {k: handle.get_tensor(k) for k in WEIGHT_KEYS}
    except (OSError, ValueError, SafetensorError) as exc:
        raise BundleError(f"{path}: unreadable weights ({exc})") from None
    if missing:
        raise BundleError(f"{path}: missing {', '.join(missing)}")
    return {k: v.astype(np.float32, copy=False) for k, v in weights.items()}


def artifacts_for(manifest: dict[str, Any], backend: str) -> list[str]:
    """Files of the manifest a backend can run, in manifest order."""
    return [name for name, e in manifest["files"].items() if platforms.BACKEND_OF_FORMAT.get(e.get("format")) == backend]


def open_backend(bundle: Path, name: str = "auto", threads: int | None = None) -> Backend:
    """The backend ``name`` (onnx | litert | numpy | auto) loaded on this bundle's artifacts.

    ``auto`` tries this platform's order (:mod:`edge_runtime.platforms`: ONNX Runtime first on
    aarch64, LiteRT first elsewhere). ``threads`` caps the runtime's intra-op threads (None: the
    runtime's default, all cores).
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    order = platforms.auto_order() if name == "auto" else (name,)
    errors = []
    for candidate in order:
        try:
            return _open(bundle, manifest, candidate, threads)
        except BackendError as exc:
            errors.append(f"{candidate}: {exc}")
    raise BackendError("no usable backend: " + "; ".join(errors))


def _open(bundle: Path, manifest: dict[str, Any], name: str, threads: int | None = None) -> Backend:
    if name == "numpy":
        from edge_runtime.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    files = artifacts_for(manifest, name)
    if not files:
        raise BackendError(f"the bundle has no artifact for the {name} backend")
    if name == "onnx":
        from edge_runtime.backends.onnx_backend import OnnxBackend

        return OnnxBackend(bundle, threads=threads)
    if name == "litert":
        from edge_runtime.backends.litert_backend import LiteRTBackend

        trainable = [f for f in files if manifest["files"][f].get("trainable", True)]
        chosen = (trainable or files)[0]
        return LiteRTBackend(bundle / chosen, manifest["files"][chosen].get("extra") or None, num_threads=threads)
    raise BackendError(f"unknown backend {name!r} (onnx, litert, numpy, auto)")


@dataclass(frozen=True)
class SharedBundle:
    """What every device of one bundle reads and never changes: the manifest, device.json and the
    runtime session (ONNX Runtime and the numpy backend are safe to call from several threads)."""

    manifest: dict
    device_json: dict
    engine: Backend

    @classmethod
    def open(cls, bundle: Path, backend: str = "auto", threads: int | None = None) -> SharedBundle:
        return cls(read_manifest(bundle), json.loads((bundle / "device.json").read_text()),
                   open_backend(bundle, backend, threads))
