"""Quantizer throughput as a ratio to ``np.copy`` of the same float32 array (docs/protocol.md section 5).

For a ViT-B/32 device output (B, 49, 768) and each bit-width and granularity, times the numpy
reference ``quantize`` (noise drawn + codes + packing) and ``dequantize`` (unpacking + decoding)
next to ``np.copy`` of the same input (interleaved timeit runs, best of several), and prints
throughput ratios: 1.0 means as fast as copying the float32 tensor once.

    .venv/bin/python benchmarks/bench_quantize.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_runtime.quantize import QuantizedTensor, dequantize, quantize

TOKENS, EMBED_DIM = 49, 768  # vit_base_patch32_224: (224 / 32)^2 patches of 768 features
BITS = (1, 2, 4, 8, 16, 32)
GRANULARITIES = ("tensor", "token")


@dataclass(frozen=True)
class Cell:
    """Best seconds per call of copy, quantize and dequantize for one (batch, per, bits)."""

    batch: int
    per: str
    bits: int
    copy_s: float
    quantize_s: float
    dequantize_s: float


def loops_for(fn: Callable[[], object], target_s: float) -> int:
    """How many calls of ``fn`` take about ``target_s`` (after one warm-up call)."""
    fn()
    number = 1
    while (elapsed := timeit.timeit(fn, number=number)) < target_s:
        number = max(number * 2, int(number * target_s / max(elapsed, 1e-9)))
    return number


def best_seconds(fns: dict[str, Callable[[], object]], repeat: int, target_s: float) -> dict[str, float]:
    """Best seconds per call of each function; runs interleave so all see the same machine state."""
    loops = {name: loops_for(fn, target_s) for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit.timeit(fn, number=loops[name]) / loops[name])
    return best


def measure(x: np.ndarray, bits: int, per: str, repeat: int, target_s: float, seed: int) -> Cell:
    """Time copy, quantize and dequantize of ``x`` side by side."""
    rng = np.random.default_rng(seed)
    packed: QuantizedTensor = quantize(x, bits, per=per, rng=rng)
    best = best_seconds(
        {
            "copy": lambda: np.copy(x),
            "quantize": lambda: quantize(x, bits, per=per, rng=rng),
            "dequantize": lambda: dequantize(packed),
        },
        repeat,
        target_s,
    )
    return Cell(x.shape[0], per, bits, best["copy"], best["quantize"], best["dequantize"])


def print_table(cells: list[Cell]) -> None:
    """One row per cell; ratio = copy time / operation time (throughput relative to np.copy)."""
    header = (
        f"{'B':>4} {'per':>6} {'q':>3} {'MB in':>7} {'copy ms':>9} {'quant ms':>9} {'quant/copy':>11}"
        f" {'dequant ms':>11} {'dequant/copy':>13} {'quant MB/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for c in cells:
        mb = c.batch * TOKENS * EMBED_DIM * 4 / 1e6
        print(
            f"{c.batch:>4} {c.per:>6} {c.bits:>3} {mb:>7.2f} {c.copy_s * 1e3:>9.3f} {c.quantize_s * 1e3:>9.3f}"
            f" {c.copy_s / c.quantize_s:>11.4f} {c.dequantize_s * 1e3:>11.3f} {c.copy_s / c.dequantize_s:>13.4f}"
            f" {mb / c.quantize_s:>11.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse options, measure every (batch, granularity, bits) cell and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8 only, 3 repeats")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8 128)")
    parser.add_argument("--repeat", type=int, default=None, help="timing repeats, best is kept (default 5)")
    parser.add_argument("--target-ms", type=float, default=20.0, help="length of one timed run (default 20 ms)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 128])
    repeat = args.repeat or (3 if args.quick else 5)

    print(f"quantize (stochastic, noise drawn by numpy default_rng) and dequantize, numpy {np.__version__}")
    print(f"input: float32 (B, {TOKENS}, {EMBED_DIM}) ~ N(0, 1); per figure the best of {repeat} interleaved")
    print(f"timeit runs of about {args.target_ms:g} ms each (at least one call)")
    print("ratio = np.copy time / operation time on the same array (1.0 = as fast as one copy)\n")
    rng = np.random.default_rng(args.seed)
    cells = []
    for batch in batches:
        x = rng.standard_normal((batch, TOKENS, EMBED_DIM), dtype=np.float32)
        for per in GRANULARITIES:
            cells.extend(measure(x, bits, per, repeat, args.target_ms / 1e3, args.seed) for bits in BITS)
    print_table(cells)


if __name__ == "__main__":
    main()
