"""Device memory against shard size: peak RSS of ``sflam device`` training one round on a 224 x 224
JPEG folder shard (``--data folder:``) of N images, against the same images as an in-memory npz.

A ``vit_base_patch32_224`` bundle for ``jetson-orin-nano`` (ONNX, batch 8) is exported into a
temporary folder, or ``--bundle`` is used. For each N in ``--sizes`` (default 500 and 2000) a
folder shard of N JPEG images (smooth random scenes, about 10 KB each, 10 classes) and an npz of
the same pixels are written; a fresh ``sflam device`` process trains one round on each against a
scripted server over a local mosquitto (bench_edge_footprint.ScriptedServer: one plan, a random
gradient per step). Each row is the device's own peak RSS (VmHWM) from its summary line. All runs
are side by side in one process, one at a time. The folder rows should not grow with N (a decode
cache bounded in bytes, ``--data-cache-mb``, default 16), and neither should the npz rows, which are read image by
image from the file (an in-memory shard would grow by N x 150 KB).

    .venv/bin/python benchmarks/bench_device_data.py [--sizes 500,2000] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_edge_footprint import ROOT, ScriptedServer

SIZE, CLASSES, BATCH = 224, 10, 8


def scene(rng: np.random.Generator) -> np.ndarray:
    """A smooth random 224 x 224 RGB image (JPEG-compressible, like a photo rather than noise)."""
    coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    rows = np.linspace(0, 7, SIZE)
    lo, frac = np.floor(rows).astype(int), (rows - np.floor(rows))[:, None]
    hi = np.minimum(lo + 1, 7)
    vertical = coarse[lo] * (1 - frac[..., None]) + coarse[hi] * frac[..., None]
    image = vertical[:, lo] * (1 - frac[None, :, :]) + vertical[:, hi] * frac[None, :, :]
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def write_shards(folder: Path, count: int) -> tuple[Path, Path]:
    """A folder shard (classes.txt + <class>/<k>.jpg) and an npz of the same decoded pixels."""
    from PIL import Image

    rng = np.random.default_rng(count)
    root = folder / f"shard-{count}"
    (root).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(CLASSES)))
    images, labels = np.empty((count, SIZE, SIZE, 3), np.uint8), np.arange(count) % CLASSES
    for k in range(count):
        path = root / f"c{labels[k]}" / f"{k:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(scene(rng)).save(path, quality=90)
        with Image.open(path) as decoded:
            images[k] = np.asarray(decoded.convert("RGB"))
    npz = folder / f"shard-{count}.npz"
    np.savez(npz, images=images, labels=labels)
    return root, npz


def export(bundle: Path) -> None:
    code = ("import sys; from pathlib import Path; from export.bundle import export_bundle; "
            f"export_bundle('vit_base_patch32_224', 'jetson-orin-nano', Path(sys.argv[1]), batch={BATCH}, formats=('onnx',))")
    subprocess.run([sys.executable, "-c", code, str(bundle)], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def device_round(bundle: Path, data: str, broker_url: str, run_id: str, cache_mb: float) -> dict:
    """One round of ``sflam device`` on ``data``; its summary line plus the wall time."""
    server = ScriptedServer(broker_url, bundle, run_id, "dev-0", 0, 8)
    server.start()
    thread = threading.Thread(target=server.serve, args=(1800.0,), daemon=True)
    thread.start()
    cmd = [sys.executable, "-m", "sflam", "device", "--bundle", str(bundle), "--broker", broker_url,
           "--device-id", "dev-0", "--data", data, "--backend", "onnx", "--run-id", run_id, "--rounds", "1",
           "--meter", "estimate", "--data-cache-mb", str(cache_mb)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=1800)
    seconds = time.perf_counter() - start
    thread.join(30)
    if proc.returncode != 0 or server.update is None:
        raise SystemExit(f"the device round on {data} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("sflam-device-summary "))
    return {**json.loads(line.split(" ", 1)[1]), "seconds": seconds, "steps": server.update.telemetry.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000", help="shard sizes, comma separated")
    parser.add_argument("--bundle", type=Path, help="an exported ViT-B/32 bundle (default: export one)")
    parser.add_argument("--data-cache-mb", type=float, default=16.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from sflam.broker import start_local_broker

    with tempfile.TemporaryDirectory(prefix="sflam-device-data-") as tmp:
        tmp_path = Path(tmp)
        bundle = args.bundle or tmp_path / "bundle"
        if args.bundle is None:
            print("exporting vit_base_patch32_224 for jetson-orin-nano (onnx, batch 8) ...", flush=True)
            export(bundle)
        broker = start_local_broker(tmp_path / "broker")
        rows = []
        try:
            for count in sizes:
                print(f"writing {count} JPEG images ...", flush=True)
                folder, npz = write_shards(tmp_path, count)
                megabytes = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20
                for label, data in (("folder", f"folder:{folder}"), ("npz", f"npz:{npz}")):
                    print(f"training one round on {label} ({count} images) ...", flush=True)
                    summary = device_round(bundle, data, broker.url, f"data{count}{label}", args.data_cache_mb)
                    rows.append((label, count, megabytes, summary))
        finally:
            broker.stop()
    print(f"\npeak RSS of `sflam device` (onnx, ViT-B/32, batch {BATCH}) training one round, by shard size")
    print(f"{'source':<8}{'images':>8}{'files MB':>10}{'steps':>7}{'peak RSS MB':>13}{'s/round':>9}{'torch':>7}")
    for label, count, megabytes, s in rows:
        print(f"{label:<8}{count:>8}{megabytes if label == 'folder' else 0:>10.1f}{s['steps']:>7}"
              f"{s['peak_rss_mib']:>13.1f}{s['seconds']:>9.1f}{'yes' if s['torch_loaded'] else 'no':>7}")
    for label in ("folder", "npz"):
        peaks = [s["peak_rss_mib"] for name, _, _, s in rows if name == label]
        if len(peaks) > 1:
            print(f"{label}: largest minus smallest shard's peak = {peaks[-1] - peaks[0]:+.1f} MB")


if __name__ == "__main__":
    main()
