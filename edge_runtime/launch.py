"""The bundle launcher: ``launch.sh --check`` verifies a bundle where it was installed;
``launch.sh --broker URL --device-id ID --data SPEC`` runs the device loop (``sflam device``).

``--check`` verifies every file's sha256 against the manifest, then runs one forward of the
bundle's check vector on the chosen backend and compares it with the output torch computed at
export time (codes within one step, ranges within float tolerance). Exit status 0 means the
device can run this bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime.backends.base import BackendError
from edge_runtime.bundle import BundleError, open_backend, read_manifest, verify_bundle

# (token error relative to scale, max code difference, fraction of codes allowed to differ)
FP32_TOLERANCE = (1e-4, 1, 1e-3)
# Frozen int8 artifacts: int8 weights and dynamic activation quantization (export/tflite_export.py)
INT8_TOLERANCE = (2e-2, 2, 1.0)


def check_forward(bundle: Path, backend_name: str) -> dict[str, object]:
    """Run the check vector; the figures measured, or BundleError when they are out of bounds."""
    with np.load(bundle / "check.npz", allow_pickle=False) as data:
        check = {k: data[k] for k in data.files}
    backend = open_backend(bundle, backend_name)
    tokens = backend.embed(check["images"], check["weight"], check["bias"])
    codes, lo, hi = backend.forward(
        check["images"], check["weight"], check["bias"], check["noise"],
        float(check["levels"][0]), bool(check["per_token"][0] > 0.5),
    )
    diff = np.abs(np.asarray(codes, np.float64) - check["codes"])
    scale = max(1.0, float(np.abs(check["tokens"]).max()))
    figures: dict[str, object] = {
        "backend": backend.name,
        "token_rel_err": float(np.abs(tokens - check["tokens"]).max()) / scale,
        "range_rel_err": float(max(np.abs(lo - check["lo"]).max(), np.abs(hi - check["hi"]).max())) / scale,
        "code_max_diff": float(diff.max()),
        "code_mismatch_fraction": float((diff > 0).mean()),
    }
    token_tol, code_tol, fraction_tol = FP32_TOLERANCE if getattr(backend, "trainable", True) else INT8_TOLERANCE
    if figures["token_rel_err"] > token_tol or figures["range_rel_err"] > token_tol:
        raise BundleError(f"forward check failed: tokens or ranges differ from torch ({figures})")
    if figures["code_max_diff"] > code_tol or figures["code_mismatch_fraction"] > fraction_tol:
        raise BundleError(f"forward check failed: codes differ from torch ({figures})")
    return figures


def run_check(bundle: Path, backend_name: str) -> int:
    """Hashes, then one forward; prints what it found; 0 when everything passes."""
    problems = verify_bundle(bundle)
    if problems:
        print("bundle integrity: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    manifest = read_manifest(bundle)
    print(f"bundle integrity: ok ({len(manifest['files'])} files, preset {manifest['preset']})")
    try:
        figures = check_forward(bundle, backend_name)
    except (BundleError, BackendError) as exc:
        print(f"forward check: FAILED: {exc}", file=sys.stderr)
        return 1
    print("forward check: ok " + json.dumps(figures))
    if figures["backend"] == "numpy":
        print("note: no LiteRT or ONNX Runtime artifact ran here (missing runtime, or a tflite-micro-only "
              "bundle): the forward check used the numpy reference backend")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m edge_runtime.launch`` (what ``launch.sh`` runs)."""
    parser = argparse.ArgumentParser(prog="launch.sh", description="Check or start an sflam device bundle.")
    parser.add_argument("--bundle", type=Path, default=Path("."), help="bundle directory (default: here)")
    parser.add_argument("--check", action="store_true", help="verify hashes and run one forward, then exit")
    parser.add_argument("--backend", default="auto", choices=("auto", "litert", "onnx", "numpy"))
    args, rest = parser.parse_known_args(argv)
    if args.check:
        if rest:
            parser.error(f"--check takes no other options: {' '.join(rest)}")
        return run_check(args.bundle, args.backend)
    if not rest:
        parser.error("give the device options (--broker URL --device-id ID --data SPEC), or --check")
    # The device loop lives behind the sflam front door; run it in place of this process.
    command = [sys.executable, "-m", "sflam", "device", "--bundle", str(args.bundle), "--backend", args.backend, *rest]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
