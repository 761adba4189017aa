"""Device footprint: peak RSS of a device process per backend against a torch client, and the
installed size of the ``edge`` extra.

(1) A bundle is exported (default ``vit_base_patch32_224`` for ``jetson-orin-nano``, batch 8,
formats tflite and onnx) into a temporary folder. For each edge backend a fresh interpreter that
imports only ``edge_runtime`` (and numpy) opens the backend on the bundle, loads the weights and
runs N device steps (forward with the in-graph quantizer, bit packing of the codes, train_step);
it reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and whether torch ever entered
``sys.modules``. (2) A fresh interpreter that imports torch runs ``export.graphs``' ForwardGraph
and TrainStepGraph eagerly on the same shapes, the torch-based client the edge runtime replaces.
All processes run side by side in one run. (3) The ``edge`` extra's pinned requirements are
installed with the project's constraints into a temporary venv, and its site-packages is summed
(pip, setuptools and their shims excluded). Goals: <= 120 MB RSS, <= 250 MB installed.

    .venv/bin/python benchmarks/bench_edge_footprint.py [--steps 5] [--skip-install-size]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_GOAL_MB = 120.0
INSTALL_GOAL_MB = 250.0
MB = 1024 * 1024

# The device side: edge_runtime and numpy only. argv: bundle backend steps bits
_EDGE_CLIENT = """
import json, resource, sys, time
import numpy as np
from pathlib import Path
from edge_runtime.bundle import load_weights, open_backend
from edge_runtime.quantize import pack_codes

bundle, backend_name, steps, bits = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dev = json.loads((bundle / "device.json").read_text())
start = time.perf_counter()
backend = open_backend(bundle, backend_name)
weights = load_weights(bundle)
weight, bias = weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"]
mw, mb = np.zeros_like(weight), np.zeros_like(bias)
b, n, d = dev["batch_size"], dev["num_patches"], dev["embed_dim"]
rng = np.random.default_rng(0)
images = rng.normal(size=(b, dev["in_chans"], dev["image_size"], dev["image_size"])).astype(np.float32)
levels = float(2**bits - 1)
load_s = time.perf_counter() - start
start = time.perf_counter()
for _ in range(steps):
    noise = rng.random((b, n, d), dtype=np.float32)
    codes, lo, hi = backend.forward(images, weight, bias, noise, levels, False)
    payload = pack_codes(np.asarray(codes).astype(np.uint8), bits)
    grad = (rng.normal(size=(b, n, d)) * 1e-2).astype(np.float32)
    weight, bias, mw, mb = backend.train_step(weight, bias, mw, mb, images, grad, dev["lr"], dev["momentum"])
step_ms = (time.perf_counter() - start) / max(steps, 1) * 1e3
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "hwm_kib": hwm[0] if hwm else 0, "backend": backend.name,
                  "torch": "torch" in sys.modules, "modules": len(sys.modules), "load_s": load_s,
                  "step_ms": step_ms, "payload": len(payload)}))
"""

# The torch-based client: the export graphs run eagerly on the same shapes. argv: bundle steps bits
_TORCH_CLIENT = """
import json, resource, sys, time
import numpy as np
import torch
from pathlib import Path
from safetensors.numpy import load_file
from edge_runtime.quantize import pack_codes
from export.graphs import ForwardGraph, TrainStepGraph

bundle, steps, bits = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev = json.loads((bundle / "device.json").read_text())
start = time.perf_counter()
w = load_file(str(bundle / "weights.safetensors"))
weight = torch.from_numpy(w["patch_embed.proj.weight"].astype(np.float32))
bias = torch.from_numpy(w["patch_embed.proj.bias"].astype(np.float32))
mw, mb = torch.zeros_like(weight), torch.zeros_like(bias)
b, n, d = dev["batch_size"], dev["num_patches"], dev["embed_dim"]
rng = np.random.default_rng(0)
images = torch.from_numpy(rng.normal(size=(b, dev["in_chans"], dev["image_size"], dev["image_size"])).astype(np.float32))
levels, per_token = torch.tensor([float(2**bits - 1)]), torch.tensor([0.0])
lr, momentum = torch.tensor([float(dev["lr"])]), torch.tensor([float(dev["momentum"])])
forward, train_step = ForwardGraph(), TrainStepGraph()
load_s = time.perf_counter() - start
start = time.perf_counter()
with torch.no_grad():
    for _ in range(steps):
        noise = torch.from_numpy(rng.random((b, n, d), dtype=np.float32))
        codes, lo, hi = forward(images, weight, bias, noise, levels, per_token)
        payload = pack_codes(codes.numpy().astype(np.uint8), bits)
        grad = torch.from_numpy((rng.normal(size=(b, n, d)) * 1e-2).astype(np.float32))
        weight, bias, mw, mb = train_step(weight, bias, mw, mb, images, grad, lr, momentum)
step_ms = (time.perf_counter() - start) / max(steps, 1) * 1e3
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "hwm_kib": hwm[0] if hwm else 0, "backend": "torch",
                  "torch": "torch" in sys.modules, "modules": len(sys.modules), "load_s": load_s,
                  "step_ms": step_ms, "payload": len(payload)}))
"""

# The export, in its own interpreter: this process must stay small, because Linux carries a
# process's RSS high-water mark across fork and exec into ru_maxrss, and every client is started
# from here. argv: preset profile out batch bits
_EXPORT = """
import logging, sys
logging.basicConfig(level=logging.ERROR)
from export.bundle import export_bundle
preset, profile, out, batch, bits = sys.argv[1:6]
export_bundle(preset, profile, out, batch=int(batch), formats=("tflite", "onnx"), bits=int(bits))
"""

# The floor every client pays: the interpreter plus numpy.
_FLOOR = """
import json, resource, sys
import numpy as np
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "hwm_kib": hwm[0] if hwm else 0, "backend": "-",
                  "torch": "torch" in sys.modules, "modules": len(sys.modules), "load_s": 0.0,
                  "step_ms": float("nan"), "payload": 0}))
"""

# What a venv brings along besides the packages asked for.
_TOOLING = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth")


def run_client(script: Path, args: list[str], report: bool = True) -> dict:
    """Run one client script in a fresh interpreter (cwd = repository root) and parse its report."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if report else {}


def edge_requirements() -> list[str]:
    """The pinned requirements of the ``edge`` extra, from pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["optional-dependencies"]["edge"])


def tree_bytes(path: Path) -> int:
    """Apparent size of every regular file under ``path`` (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def _is_tooling(name: str) -> bool:
    base = name.split("-")[0] if name.endswith(".dist-info") else name
    return base in _TOOLING or name in _TOOLING


def install_size(python: str) -> tuple[dict[str, int], int, float]:
    """Install the edge extra into a temporary venv; per-entry sizes (tooling excluded), tooling bytes, seconds."""
    with tempfile.TemporaryDirectory(prefix="sflam-edge-venv-") as tmp:
        venv = Path(tmp) / "venv"
        start = time.perf_counter()
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check"]
        proc = subprocess.run([*pip, "-c", str(ROOT / "requirements" / "constraints.txt"), *edge_requirements()],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"pip install of the edge extra failed:\n{proc.stderr[-4000:]}")
        seconds = time.perf_counter() - start
        site = next(venv.glob("lib/python*/site-packages"))
        sizes, tooling = {}, 0
        for entry in site.iterdir():
            size = tree_bytes(entry)
            if _is_tooling(entry.name):
                tooling += size
            else:
                sizes[entry.name] = size
        return sizes, tooling, seconds


def by_distribution(sizes: dict[str, int]) -> dict[str, int]:
    """Fold top-level site-packages entries into rough per-distribution totals (by name prefix)."""
    groups: dict[str, int] = {}
    for name, size in sizes.items():
        key = name.split("-")[0].lower().removesuffix(".libs").removesuffix(".py").lstrip("_").replace(".", "_")
        key = {"paho_mqtt": "paho", "google": "protobuf", "backports": "backports_strenum",
               "pycache": "(top-level .pyc)"}.get(key.rstrip("_"), key)
        groups[key] = groups.get(key, 0) + size
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def mark(value: float, goal: float) -> str:
    return "ok" if value <= goal else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_base_patch32_224")
    parser.add_argument("--profile", default="jetson-orin-nano")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="device steps each client runs")
    parser.add_argument("--skip-install-size", action="store_true", help="skip the (slow, networked) venv install")
    parser.add_argument("--python", default="python3", help="interpreter that creates the install-size venv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="sflam-footprint-") as tmp:
        tmp_path = Path(tmp)
        scripts = {}
        for name, text in (("export_bundle_step.py", _EXPORT), ("edge_client.py", _EDGE_CLIENT),
                           ("torch_client.py", _TORCH_CLIENT), ("floor.py", _FLOOR)):
            scripts[name] = tmp_path / name
            scripts[name].write_text(textwrap.dedent(text))
        print(f"exporting {args.preset} for {args.profile} (batch {args.batch}, tflite + onnx) ...", flush=True)
        bundle = tmp_path / "bundle"
        run_client(scripts["export_bundle_step.py"], [args.preset, args.profile, str(bundle), str(args.batch), str(args.bits)], report=False)
        common = [str(args.steps), str(args.bits)]
        rows = [
            ("python + numpy", run_client(scripts["floor.py"], [])),
            ("litert", run_client(scripts["edge_client.py"], [str(bundle), "litert", *common])),
            ("onnxruntime", run_client(scripts["edge_client.py"], [str(bundle), "onnx", *common])),
            ("torch (eager)", run_client(scripts["torch_client.py"], [str(bundle), *common])),
        ]
        artifacts = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.suffix in (".tflite", ".onnx")}

    torch_mb = rows[-1][1]["maxrss_kib"] / 1024
    print(f"\n(1, 2) peak RSS of a fresh device process, {args.preset}, batch {args.batch}, q={args.bits}, "
          f"{args.steps} steps (forward + pack + train_step)")
    print(f"{'client':<16}{'peak RSS MB':>12}{'VmHWM MB':>10}{'/torch':>8}{'torch loaded':>14}{'modules':>9}{'load s':>8}{'step ms':>9}{'goal':>6}")
    for name, r in rows:
        mb = r["maxrss_kib"] / 1024
        goal = mark(mb, RSS_GOAL_MB) if name in ("litert", "onnxruntime") else ""
        print(f"{name:<16}{mb:>12.1f}{r['hwm_kib'] / 1024:>10.1f}{mb / torch_mb:>8.2f}{'yes' if r['torch'] else 'no':>14}{r['modules']:>9}"
              f"{r['load_s']:>8.2f}{r['step_ms']:>9.1f}{goal:>6}")
    litert = rows[1][1]
    print(f"\nLiteRT RSS / torch RSS = {litert['maxrss_kib'] / rows[-1][1]['maxrss_kib']:.2f}; "
          f"goal: device process <= {RSS_GOAL_MB:.0f} MB. ru_maxrss is the peak resident set (KiB on Linux), "
          "shared libraries included; VmHWM (/proc/self/status) is the same peak for this process image alone.")
    print("artifacts (weights travel beside them): " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in artifacts.items()))
    leaked = [name for name, r in rows[:3] if r["torch"]]
    if leaked:
        raise SystemExit(f"torch entered sys.modules in the edge process(es): {', '.join(leaked)}")
    print("torch never entered sys.modules in the edge processes.")

    if args.skip_install_size:
        print("\n(3) installed size of the edge extra: skipped (--skip-install-size)")
        return
    print(f"\n(3) installing the edge extra ({', '.join(edge_requirements())}) into a temporary venv ...", flush=True)
    sizes, tooling, seconds = install_size(args.python)
    total = sum(sizes.values())
    print(f"installed in {seconds:.0f} s; site-packages by distribution, MB:")
    for name, size in by_distribution(sizes).items():
        print(f"  {name:<28}{size / MB:>8.1f}")
    print(f"  {'total':<28}{total / MB:>8.1f}  goal <= {INSTALL_GOAL_MB:.0f} MB: {mark(total / MB, INSTALL_GOAL_MB)}")
    print(f"(apparent file sizes incl. the .pyc pip compiles; pip and setuptools themselves, {tooling / MB:.1f} MB, "
          "are excluded; the sflam package itself is not installed)")


if __name__ == "__main__":
    main()
