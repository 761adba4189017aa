"""Device step latency per backend, side by side in one run, as ratios to torch.

A device step is what a device does per batch: forward (patch embedding + in-graph quantizer),
packing the codes for the wire (numpy), and train_step once the gradient is back. Backends:
torch (the export graphs run eagerly), ONNX Runtime, LiteRT fp32, LiteRT int8 (frozen: forward
only). Also printed: the ratio of (forward + quantize) to forward alone per backend (goal <= 1.2)
and the artifact sizes.

    .venv/bin/python benchmarks/bench_device_step.py [--preset vit_base_patch32_224] [--batch 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge_runtime.backends.litert_backend import LiteRTBackend
from edge_runtime.backends.onnx_backend import OnnxBackend
from edge_runtime.quantize import pack_codes
from export.graphs import EmbedGraph, ForwardGraph, TrainStepGraph
from export.onnx_export import export_onnx
from export.tflite_export import export_tflite, export_tflite_int8
from server_runtime.presets import get_preset
from server_runtime.vit import VisionTransformer


class TorchBackend:
    """The export graphs run eagerly in torch: the baseline of every ratio."""

    name = "torch"
    trainable = True

    def embed(self, images, weight, bias):
        with torch.no_grad():
            return EmbedGraph()(*map(torch.from_numpy, (images, weight, bias))).numpy()

    def forward(self, images, weight, bias, noise, levels, per_token):
        args = (images, weight, bias, noise, np.float32(levels).reshape(1), np.float32(per_token).reshape(1))
        with torch.no_grad():
            return tuple(t.numpy() for t in ForwardGraph()(*map(torch.from_numpy, args)))

    def train_step(self, weight, bias, mw, mb, images, grad, lr, momentum):
        args = (weight, bias, mw, mb, images, grad, np.float32(lr).reshape(1), np.float32(momentum).reshape(1))
        with torch.no_grad():
            return tuple(t.numpy() for t in TrainStepGraph()(*map(torch.from_numpy, args)))


def best_ms(call: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` timings of one call, in milliseconds (after one warm-up)."""
    call()
    return min(timeit.repeat(call, number=1, repeat=repeat)) * 1e3


def measure(backend, inputs: dict[str, np.ndarray], bits: int, repeat: int) -> dict[str, float]:
    """embed, forward, pack, train_step and whole-step times of one backend."""
    i = inputs
    levels = float(2**bits - 1)
    embed = best_ms(lambda: backend.embed(i["images"], i["weight"], i["bias"]), repeat)
    forward = best_ms(lambda: backend.forward(i["images"], i["weight"], i["bias"], i["noise"], levels, False), repeat)
    codes = backend.forward(i["images"], i["weight"], i["bias"], i["noise"], levels, False)[0]
    pack = best_ms(lambda: pack_codes(codes.astype(np.uint8), bits), repeat)
    train = float("nan")
    if getattr(backend, "trainable", True):
        step = lambda: backend.train_step(  # noqa: E731
            i["weight"], i["bias"], i["mw"], i["mb"], i["images"], i["grad"], 0.01, 0.9)
        train = best_ms(step, repeat)
    return {"embed": embed, "forward": forward, "pack": pack, "train_step": train,
            "step": forward + pack + (0.0 if np.isnan(train) else train)}


def make_inputs(preset: str, batch: int) -> dict[str, np.ndarray]:
    config = get_preset(preset)
    torch.manual_seed(0)
    proj = VisionTransformer(config.replace(depth=1)).patch_embed.proj
    rng = np.random.default_rng(0)
    tokens = (batch, config.num_patches, config.embed_dim)
    weight = proj.weight.detach().numpy()
    bias = proj.bias.detach().numpy()
    return {
        "images": rng.normal(size=(batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32),
        "weight": weight, "bias": bias, "mw": np.zeros_like(weight), "mb": np.zeros_like(bias),
        "noise": rng.random(tokens, dtype=np.float32), "grad": (rng.normal(size=tokens) * 1e-2).astype(np.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_base_patch32_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = get_preset(args.preset)
    inputs = make_inputs(args.preset, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print(f"exporting {args.preset} (batch {args.batch}) ...", flush=True)
        onnx = export_onnx(out, config)
        fp32 = export_tflite(out, config, args.batch)
        int8 = export_tflite_int8(out, config, args.batch, inputs["weight"], inputs["bias"])
        backends = [("torch", TorchBackend(), None), ("onnxruntime", OnnxBackend(out), sum(a.path.stat().st_size for a in onnx)),
                    ("litert fp32", LiteRTBackend(fp32.path, fp32.extra), fp32.path.stat().st_size),
                    ("litert int8", LiteRTBackend(int8.path, int8.extra), int8.path.stat().st_size)]
        rows = [(name, measure(b, inputs, args.bits, args.repeat), size) for name, b, size in backends]
    weight_bytes = inputs["weight"].nbytes + inputs["bias"].nbytes
    base = rows[0][1]["step"]
    print(f"\n{args.preset}, batch {args.batch}, q={args.bits}, per tensor; best of {args.repeat}, ms")
    print(f"{'backend':<13}{'embed':>8}{'fwd+q':>8}{'pack':>7}{'train':>8}{'step':>8}{'step/torch':>11}{'(fwd+q)/fwd':>12}{'artifact B':>12}")
    for name, r, size in rows:
        size_text = "-" if size is None else f"{size:,}"
        print(f"{name:<13}{r['embed']:>8.2f}{r['forward']:>8.2f}{r['pack']:>7.2f}{r['train_step']:>8.2f}{r['step']:>8.2f}"
              f"{r['step'] / base:>11.2f}{r['forward'] / r['embed']:>12.2f}{size_text:>12}")
    print(f"\nfp32 artifacts take the weights as inputs ({weight_bytes:,} B of float32 weights travel beside them);"
          " the int8 artifact bakes int8 weights in and has no train_step (frozen embedding), so its step is"
          " forward + pack only. Goal: (fwd+q)/fwd <= 1.2.")


if __name__ == "__main__":
    main()
