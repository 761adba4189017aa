"""``sflam export``: a (model, device profile) pair -> a verified device bundle directory.

Every artifact is verified against torch by its exporter before anything is written to the
destination; the bundle is assembled in a staging directory and renamed into place only when
complete, so a failed export never leaves a half bundle behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime import platforms
from edge_runtime.backends.base import SIGNATURES
from edge_runtime.bundle import FORMAT_VERSION, MANIFEST, WEIGHT_KEYS, file_sha256
from export.artifact import FORMATS, Artifact, ExportError
from export.graphs import EmbedGraph, ForwardGraph
from firmware_profiles import DeviceProfile, load_profile
from server_runtime.checkpoint import create_model
from server_runtime.presets import ViTConfig
from server_runtime.vit import VisionTransformer
from sflam_common.version import __version__

log = logging.getLogger(__name__)
OPSET = 18
_SOURCES = ("export/graphs.py", "edge_runtime/quantize.py")


def export_bundle(
    preset: str,
    profile_name: str,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
    layout: Mapping[str, object] | None = None,
    batch: int = 8,
    formats: tuple[str, ...] | None = None,
    bits: int = 8,
    force: bool = False,
) -> Path:
    """Export, verify and assemble a bundle at ``out_dir``; returns its path.

    ``layout`` (pooling fields, see :func:`server_runtime.checkpoint.create_model`) does not change
    the device part; the manifest's ``config`` records it for the FL baseline's whole-model device.
    """
    if not 1 <= bits <= 8:
        raise ExportError(f"--bits must be 1..8 for the exported quantizer, got {bits}")
    profile = load_profile(profile_name)
    formats = _formats(profile, formats)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} exists; choose another --out or pass --force")
    model = create_model(preset, checkpoint=checkpoint, num_classes=num_classes, layout=layout, seed=0).eval()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        artifacts = _export_all(model, profile, formats, staging, batch, bits)
        _write_support_files(staging, model, profile, artifacts, batch, bits)
        _write_manifest(staging, model.config, profile, artifacts, checkpoint, bits)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _formats(profile: DeviceProfile, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    formats = tuple(requested) if requested else tuple(profile.runtime.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    unsupported = [f for f in formats if not profile.supports_format(f)]
    if unsupported:
        raise ExportError(
            f"profile {profile.name} does not run {', '.join(unsupported)} "
            f"(it runs {', '.join(profile.runtime.formats)})"
        )
    return formats


def _device_weights(model: VisionTransformer) -> tuple[np.ndarray, np.ndarray]:
    proj = model.patch_embed.proj
    return proj.weight.detach().numpy().copy(), proj.bias.detach().numpy().copy()


def _export_all(
    model: VisionTransformer, profile: DeviceProfile, formats: tuple[str, ...], out: Path, batch: int, bits: int
) -> list[Artifact]:
    weight, bias = _device_weights(model)
    config = model.config
    artifacts: list[Artifact] = []
    for fmt in formats:
        start = time.perf_counter()
        log.info("exporting %s for %s ...", fmt, profile.name)
        if fmt == "onnx":
            from export.onnx_export import export_onnx

            artifacts += export_onnx(out, config)
        elif fmt == "tflite":
            from export.tflite_export import export_tflite

            artifacts.append(export_tflite(out, config, batch))
        elif fmt == "tflite-int8":
            from export.tflite_export import export_tflite_int8

            artifacts.append(export_tflite_int8(out, config, batch, weight, bias))
        elif fmt == "tflite-micro":
            from export.micro_export import export_tflite_micro

            artifacts.append(export_tflite_micro(out, config, weight, bias, profile, bits=bits))
        log.info("%s verified in %.1f s", fmt, time.perf_counter() - start)
    return artifacts


def _write_support_files(
    out: Path, model: VisionTransformer, profile: DeviceProfile, artifacts: list[Artifact], batch: int, bits: int
) -> None:
    from safetensors.numpy import save_file

    weight, bias = _device_weights(model)
    save_file(dict(zip(WEIGHT_KEYS, (weight, bias))), str(out / "weights.safetensors"))
    (out / "weights.safetensors").chmod(0o644)  # readable by a service running as another user
    trainable = profile.runtime.supports_training and any(a.trainable for a in artifacts)
    config = model.config
    batch = _check_batch(artifacts, batch)  # a fixed-batch artifact (TFLite, Micro) decides
    device = {
        "preset": config.name, "profile": profile.name, "batch_size": batch,
        "image_size": config.img_size, "in_chans": config.in_chans, "patch_size": config.patch_size,
        "embed_dim": config.embed_dim, "num_patches": config.num_patches, "num_classes": config.num_classes,
        "mean": list(config.mean), "std": list(config.std), "default_bits": bits,
        "lr": 0.01, "momentum": 0.9, "trainable": trainable,
    }
    (out / "device.json").write_text(json.dumps(device, indent=2) + "\n")
    _write_check_vector(out, config, weight, bias, batch, bits)
    launcher = out / "launch.sh"
    launcher.write_text(_LAUNCHER)
    launcher.chmod(0o755)
    (out / "sflam-device.service").write_text(_UNIT)


def _check_batch(artifacts: list[Artifact], batch: int) -> int:
    fixed = {a.batch for a in artifacts if a.batch is not None}
    return fixed.pop() if len(fixed) == 1 else batch


def _write_check_vector(out: Path, config: ViTConfig, weight: np.ndarray, bias: np.ndarray, batch: int, bits: int) -> None:
    rng = np.random.default_rng(0)
    shape = (batch, config.in_chans, config.img_size, config.img_size)
    images = rng.normal(size=shape).astype(np.float32)
    noise = rng.random((batch, config.num_patches, config.embed_dim), dtype=np.float32)
    levels = np.array([2**bits - 1], np.float32)
    per_token = np.array([0.0], np.float32)
    with torch.no_grad():
        inputs = [torch.from_numpy(a) for a in (images, weight, bias, noise, levels, per_token)]
        tokens = EmbedGraph()(*inputs[:3])
        codes, lo, hi = ForwardGraph()(*inputs)
    np.savez(
        out / "check.npz", images=images, weight=weight, bias=bias, noise=noise, levels=levels,
        per_token=per_token, tokens=tokens.numpy(), codes=codes.numpy(), lo=lo.numpy(), hi=hi.numpy(),
    )


def _source_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def _signature_shapes(config: ViTConfig) -> dict[str, dict[str, dict[str, list]]]:
    """Inputs and outputs of each device graph: shape ("B" = batch) and dtype (all float32)."""
    c, p, d, n, h = config.in_chans, config.patch_size, config.embed_dim, config.num_patches, config.img_size
    shapes = {
        "images": ["B", c, h, h], "weight": [d, c, p, p], "bias": [d], "noise": ["B", n, d],
        "levels": [], "per_token": [], "tokens": ["B", n, d], "codes": ["B", n, d], "lo": ["B", n, 1],
        "hi": ["B", n, 1], "momentum_weight": [d, c, p, p], "momentum_bias": [d], "grad_tokens": ["B", n, d],
        "lr": [], "momentum": [], "new_weight": [d, c, p, p], "new_bias": [d],
        "new_momentum_weight": [d, c, p, p], "new_momentum_bias": [d],
    }
    return {
        sig: {side: {k: {"shape": shapes[k], "dtype": "float32"} for k in keys} for side, keys in zip(("inputs", "outputs"), io)}
        for sig, io in SIGNATURES.items()
    }


def _write_manifest(
    out: Path, config: ViTConfig, profile: DeviceProfile, artifacts: list[Artifact], checkpoint: Path | None, bits: int
) -> None:
    by_name = {a.path.name: a for a in artifacts}
    files = {}
    for path in sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST):
        entry: dict[str, object] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        artifact = by_name.get(path.name)
        if artifact is not None:
            entry.update(
                format=artifact.format, signatures=list(artifact.signatures), batch=artifact.batch,
                trainable=artifact.trainable, parity=artifact.parity, extra=artifact.extra,
            )
        files[path.name] = entry
    manifest = {
        "format_version": FORMAT_VERSION,
        "sflam_version": __version__,
        "preset": config.name,
        "config": {k: v for k, v in vars(config).items()},
        "profile": profile.name,
        "checkpoint_sha256": file_sha256(Path(checkpoint)) if checkpoint else None,
        "created_at": time.time(),
        "opset": OPSET if any(a.format == "onnx" for a in artifacts) else None,
        "source_sha256": _source_hash(),
        "patch_layout": "conv weight (D, C, p, p); tokens (B, N, D), N row-major over the patch grid",
        # The float graphs; int8 and micro files bake their weights in (see each file's "extra").
        "signatures": _signature_shapes(config),
        "quantizer": {"default_bits": bits, "granularities": ["tensor", "token"], "noise": "input U[0,1)",
                      "rounding": "floor((x - lo) / delta + u)"},
        "frozen_embedding": not (profile.runtime.supports_training and any(a.trainable for a in artifacts)),
        "target_platform": _target_platform(profile, artifacts),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _target_platform(profile: DeviceProfile, artifacts: list[Artifact]) -> dict[str, object]:
    """The profile's client platform, the backends ``--backend auto`` tries there, and notes on
    formats it cannot run (or does not trust yet); edge_runtime/platforms.py. A bundle the target
    cannot run says so here, and ``sflam export`` prints it."""
    target = platforms.for_profile_kind(profile.kind)
    formats = tuple(dict.fromkeys(a.format for a in artifacts))
    return {"name": target.name if target else "firmware", "auto": list(target.auto) if target else [],
            "notes": platforms.format_notes(profile.kind, formats)}


def _quiet_converters(verbose: bool) -> None:
    """Keep converter chatter (absl, torch.export notices) out of the CLI unless asked for."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")
    for name in ("torch.utils._pytree", "torch.onnx", "torch._export", "onnxscript", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_export(args: argparse.Namespace) -> int:
    """Handler of ``sflam export``."""
    _quiet_converters(args.verbose)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else None
    out = export_bundle(
        args.model, args.profile, Path(args.out), checkpoint=args.checkpoint, num_classes=args.num_classes,
        layout={"global_pool": args.global_pool}, batch=args.batch, formats=formats, bits=args.bits, force=args.force,
    )
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"bundle written to {out} ({'frozen embedding' if manifest['frozen_embedding'] else 'trainable'})")
    target = manifest["target_platform"]
    if target["auto"]:
        print(f"  target platform {target['name']}: --backend auto tries {', '.join(target['auto'])}")
    for note in target["notes"]:
        print(f"  note: {note}")
    for name, entry in manifest["files"].items():
        parity = ", ".join(f"{k}={v:.3g}" for k, v in entry.get("parity", {}).items() if isinstance(v, (int, float)))
        print(f"  {name:<28} {entry['bytes']:>12,} B  {entry.get('format', ''):<12} {parity}")
    return 0


_LAUNCHER = """#!/bin/sh
# sflam device bundle launcher. `./launch.sh --check` verifies hashes and runs one forward.
here=$(cd "$(dirname "$0")" && pwd)
python=${SFLAM_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
exec "$python" -m edge_runtime.launch --bundle "$here" "$@"
"""

_UNIT = """[Unit]
Description=sflam split-federated device client
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
# Rendered by `sflam flash` for the installed bundle's directory and for the ssh user that flashed
# it (no Group=: systemd then uses that user's login group).
User=@USER@
WorkingDirectory=@BUNDLE@
# SFLAM_DEVICE_ARGS="--broker mqtts://broker:8883 --device-id jetson-07 --data npz:/data/shard.npz"
EnvironmentFile=-@BUNDLE@/device.env
ExecStart=@BUNDLE@/launch.sh $SFLAM_DEVICE_ARGS
Restart=on-failure
RestartSec=5
# Sandbox: no privilege gain, the whole file system read-only except the bundle, a private /tmp.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths=@BUNDLE@
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""
