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

import numpy as np

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
from edge_runtime.memory import return_large_blocks
from edge_runtime.quantize import pack_codes

return_large_blocks()  # as `sflam device` does

bundle, backend_name, steps, bits = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dev = json.loads((bundle / "device.json").read_text())
start = time.perf_counter()
backend = open_backend(bundle, backend_name)
weights = load_weights(bundle)
weight, bias = weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"]
mw, mb = np.zeros_like(weight), np.zeros_like(bias)
b, n, d = dev["batch_size"], dev["num_patches"], dev["embed_dim"]
rng = np.random.default_rng(0)
images = rng.standard_normal((b, dev["in_chans"], dev["image_size"], dev["image_size"]), dtype=np.float32)
levels = float(2**bits - 1)
load_s = time.perf_counter() - start
start = time.perf_counter()
for _ in range(steps):
    noise = rng.random((b, n, d), dtype=np.float32)
    codes, lo, hi = backend.forward(images, weight, bias, noise, levels, False)
    payload = pack_codes(np.asarray(codes).astype(np.uint8), bits)
    grad = rng.standard_normal((b, n, d), dtype=np.float32) * np.float32(1e-2)
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

class ScriptedServer:
    """The server's half of one round, scripted: retained model + plan selecting one device, a
    quantized random gradient for every step's activations, and the device's RoundUpdate."""

    def __init__(self, broker_url: str, bundle: Path, run_id: str, device_id: str, steps: int, bits: int) -> None:
        from edge_runtime import protocol as p
        from edge_runtime.bundle import load_weights
        from edge_runtime.mqtt import LinkConfig, MqttLink

        self.p, self.run_id, self.device_id, self.bits = p, run_id, device_id, bits
        dev = json.loads((bundle / "device.json").read_text())
        self.batch, self.shape = dev["batch_size"], (dev["batch_size"], dev["num_patches"], dev["embed_dim"])
        self.weights, self.steps = load_weights(bundle), steps
        self.topics, self.receiver = p.Topics(run_id), p.Receiver(run_id)
        self.link = MqttLink(broker_url, LinkConfig(client_id=f"bench-server-{run_id}"))
        self.update = None
        self.parts = 0
        self.rng = np.random.default_rng(1)

    def start(self) -> None:
        p = self.p
        self.link.subscribe([self.topics.up(self.device_id)])
        self.link.start()
        env = p.Envelope(self.run_id, 1, "server")
        allocation = p.Allocation(self.device_id, self.bits, self.bits, 0.1, 1e6, False)
        model = p.ModelWeights(env, 1, p.weights_from_numpy(self.weights))
        frames = p.split(model, self.link.config.max_frame_bytes)
        for index, frame in enumerate(frames):  # retained chunk by chunk, as the server does
            self.link.publish(self.topics.retained_part("model", index), frame, retain=True)
        self.parts = len(frames)
        self.link.send(self.topics.plan(), p.RoundPlan(env, 1, 600.0, 1, self.batch, 0.01, (allocation,)), retain=True)

    def serve(self, timeout_s: float) -> None:
        from edge_runtime.quantize import quantize

        p, deadline = self.p, time.monotonic() + timeout_s
        while self.update is None and time.monotonic() < deadline:
            incoming = self.link.get(0.2)
            try:
                message = incoming and self.receiver.accept(incoming.payload, incoming.topic)
            except p.ProtocolError as exc:
                print(f"scripted server: refused a message ({exc})", file=sys.stderr)
                continue
            if isinstance(message, p.Activations):
                grad = (self.rng.standard_normal(message.tensor.shape, dtype=np.float32) * 1e-3)
                env = p.Envelope(self.run_id, 1, self.device_id, message.envelope.step)
                self.link.send(self.topics.down(self.device_id), p.Gradient(env, quantize(grad, self.bits), 0.0))
            elif isinstance(message, p.RoundUpdate):
                self.update = message
        for topic in [self.topics.plan(), *(self.topics.retained_part("model", i) for i in range(self.parts))]:
            self.link.publish(topic, b"", retain=True)  # leave nothing retained on a shared broker
        self.link.close()


def run_device_loop(bundle: Path, steps: int, bits: int, broker_url: str | None, workdir: Path) -> dict:
    """One round of ``steps`` steps of ``sflam device --backend onnx`` against ScriptedServer; the
    device's own summary line (peak RSS included)."""
    import threading

    dev = json.loads((bundle / "device.json").read_text())
    size, count = dev["image_size"], dev["batch_size"] * steps
    data = workdir / "device-data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), labels=rng.integers(0, 10, count))
    broker = None
    if broker_url is None:
        from sflam.broker import start_local_broker

        broker = start_local_broker(workdir / "broker")
        broker_url = broker.url
    run_id = f"footprint{os.getpid()}"
    server = ScriptedServer(broker_url, bundle, run_id, "dev-0", steps, bits)
    try:
        server.start()
        thread = threading.Thread(target=server.serve, args=(900.0,), daemon=True)
        thread.start()
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "sflam", "device", "--bundle", str(bundle), "--broker", broker_url,
               "--device-id", "dev-0", "--data", f"npz:{data}", "--backend", "onnx", "--run-id", run_id,
               "--rounds", "1", "--meter", "estimate"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - start
        thread.join(30)
    finally:
        if broker is not None:
            broker.stop()
    if proc.returncode != 0 or server.update is None:
        raise SystemExit(f"the device loop failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("sflam-device-summary "))
    summary = json.loads(line.split(" ", 1)[1])
    return {"maxrss_kib": int(summary["peak_rss_mib"] * 1024), "hwm_kib": int(summary["peak_rss_mib"] * 1024),
            "backend": summary["backend"], "torch": summary["torch_loaded"], "modules": -1, "load_s": float("nan"),
            "step_ms": seconds / steps * 1e3, "payload": server.update.telemetry.bytes_sent}


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
    """The pinned requirements of the ``edge`` extra that apply here (their markers evaluated), from
    pyproject.toml."""
    from packaging.requirements import Requirement

    with open(ROOT / "pyproject.toml", "rb") as handle:
        lines = tomllib.load(handle)["project"]["optional-dependencies"]["edge"]
    requirements = [Requirement(line) for line in lines]
    return [f"{r.name}{r.specifier}" for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


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


CLIENTS = ("floor", "litert", "onnx", "loop", "torch")
LABELS = {"floor": "python + numpy", "litert": "litert", "onnx": "onnxruntime", "loop": "sflam device (onnx)",
          "torch": "torch (eager)"}


def measure(args: argparse.Namespace, tmp_path: Path) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """Export the bundle (unless --bundle), then run each selected client; its rows and artifact sizes."""
    scripts = {}
    for name, text in (("export_bundle_step.py", _EXPORT), ("edge_client.py", _EDGE_CLIENT),
                       ("torch_client.py", _TORCH_CLIENT), ("floor.py", _FLOOR)):
        scripts[name] = tmp_path / name
        scripts[name].write_text(textwrap.dedent(text))
    bundle = args.bundle
    if bundle is None:
        print(f"exporting {args.preset} for {args.profile} (batch {args.batch}, tflite + onnx) ...", flush=True)
        bundle = tmp_path / "bundle"
        run_client(scripts["export_bundle_step.py"], [args.preset, args.profile, str(bundle), str(args.batch), str(args.bits)], report=False)
    common = [str(args.steps), str(args.bits)]
    rows = []
    for client in args.clients:
        print(f"measuring {LABELS[client]} ...", flush=True)
        if client == "floor":
            row = run_client(scripts["floor.py"], [])
        elif client in ("litert", "onnx"):
            row = run_client(scripts["edge_client.py"], [str(bundle), client, *common])
        elif client == "loop":
            row = run_device_loop(bundle, args.steps, args.bits, args.broker, tmp_path)
        else:
            row = run_client(scripts["torch_client.py"], [str(bundle), *common])
        rows.append((client, row))
    artifacts = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.suffix in (".tflite", ".onnx")}
    return rows, artifacts


def client_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLIENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"clients are a comma list of {', '.join(CLIENTS)}; got {text!r}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_base_patch32_224")
    parser.add_argument("--profile", default="jetson-orin-nano")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="device steps each client runs")
    parser.add_argument("--clients", type=client_list, default=list(CLIENTS),
                        help=f"comma list of {', '.join(CLIENTS)} (default: all)")
    parser.add_argument("--bundle", type=Path, help="measure this exported bundle instead of exporting one (no torch needed)")
    parser.add_argument("--broker", help="mqtt://host:port for the loop client (default: a local mosquitto of its own)")
    parser.add_argument("--skip-install-size", action="store_true", help="skip the (slow, networked) venv install")
    parser.add_argument("--python", default="python3", help="interpreter that creates the install-size venv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="sflam-footprint-") as tmp:
        rows, artifacts = measure(args, Path(tmp))

    reference = dict(rows).get("torch")
    print(f"\n(1, 2) peak RSS of a fresh device process, {args.preset}, batch {args.batch}, q={args.bits}, "
          f"{args.steps} steps (forward + pack + train_step; the loop client: a whole round over MQTT)")
    print(f"{'client':<22}{'VmHWM MB':>10}{'ru_maxrss':>10}{'/torch':>8}{'torch loaded':>14}{'modules':>9}{'load s':>8}{'step ms':>9}{'goal':>6}")
    for name, r in rows:
        mb = r["hwm_kib"] / 1024
        ratio = f"{r['hwm_kib'] / reference['hwm_kib']:.2f}" if reference else "-"
        goal = mark(mb, RSS_GOAL_MB) if name in ("litert", "onnx", "loop") else ""
        print(f"{LABELS[name]:<22}{mb:>10.1f}{r['maxrss_kib'] / 1024:>10.1f}{ratio:>8}{'yes' if r['torch'] else 'no':>14}"
              f"{r['modules']:>9}{r['load_s']:>8.2f}{r['step_ms']:>9.1f}{goal:>6}")
    print(f"\ngoal: device process <= {RSS_GOAL_MB:.0f} MB peak resident set (VmHWM in /proc/self/status: this process "
          "image alone, shared libraries included; ru_maxrss may carry a parent's peak across fork and exec).")
    print("artifacts (weights travel beside them): " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in artifacts.items()))
    leaked = [name for name, r in rows if r["torch"] and name != "torch"]
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
