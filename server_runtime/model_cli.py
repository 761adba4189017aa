"""Handlers of ``sflam models list`` and ``sflam models check``."""

from __future__ import annotations

import argparse
import time

import torch

from server_runtime.checkpoint import create_model
from server_runtime.presets import ViTConfig, get_preset, preset_names
from server_runtime.split import split
from server_runtime.vit import VisionTransformer


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _describe(model: VisionTransformer) -> dict[str, object]:
    halves = split(model)
    config = model.config
    return {
        "preset": config.name,
        "img": config.img_size,
        "patch": config.patch_size,
        "dim": config.embed_dim,
        "depth": config.depth,
        "heads": config.num_heads,
        "classes": config.num_classes,
        "device_params": _count(halves.device),
        "server_params": _count(halves.server),
        "activation": f"{config.num_patches}x{config.embed_dim}",
    }


def _pooling(config: ViTConfig) -> str:
    """The layout in words, e.g. ``avg (no class token, fc_norm)``."""
    token = "class token" if config.class_token else "no class token"
    return f"{config.global_pool} ({token}, {'fc_norm' if config.fc_norm else 'norm'})"


def cmd_list(args: argparse.Namespace) -> int:
    """One line per preset with the size of each half of the split."""
    columns = ("preset", "img", "patch", "dim", "depth", "heads", "classes", "device_params", "server_params", "activation")
    rows = []
    for name in preset_names():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            rows.append(_describe(VisionTransformer(get_preset(name))))
    widths = {c: max(len(c), *(len(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        cells = (f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns)
        print("  ".join(cell.ljust(widths[c]) for cell, c in zip(cells, columns)))
    print("\nactivation = tokens x embed dim a device sends per sample (before quantization)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Build a preset (optionally from a checkpoint) and prove server(device(x)) == model(x)."""
    model = create_model(args.preset, checkpoint=args.checkpoint, num_classes=args.num_classes, img_size=args.img_size,
                         layout={"global_pool": args.global_pool})
    model.eval()
    info = _describe(model) | {"pooling": _pooling(model.config)}
    for key, value in info.items():
        print(f"{key:>14}: {value:,}" if isinstance(value, int) else f"{key:>14}: {value}")
    config = model.config
    x = torch.randn(2, config.in_chans, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
    halves = split(model)
    with torch.no_grad():
        start = time.perf_counter()
        whole = model(x)
        elapsed = time.perf_counter() - start
        error = (halves(x) - whole).abs().max().item()
    print(f"{'split parity':>14}: max |server(device(x)) - model(x)| = {error:.3g} (batch 2, {elapsed * 1e3:.0f} ms)")
    return 0 if error <= 1e-6 else 1
