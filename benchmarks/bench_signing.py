"""What Ed25519 message signatures cost on a ViT-B/32 step, measured side by side (docs/security.md).

(1) Codec: the q = 8, batch-8 Activations frame of ViT-B/32 and the q = 8 Gradient that answers
    it, encoded unsigned and signed, decoded unsigned and with the signature verified (median of
    ``--repeat`` runs each, alternating).
(2) Step round trip: one ``sflam device`` process (numpy backend) against the daemon over a real
    mosquitto, q = 8 both ways, batch 8: the median of ``DeviceClient._exchange`` (quantize and
    publish the activations, the server's step, the gradient back, decoded), rounds after the
    first. Unsigned and signed runs alternate (``--pairs`` pairs, unsigned first); the overhead is
    signed / unsigned - 1 per pair. Goal: <= 5 %.

    .venv/bin/python benchmarks/bench_signing.py [--preset vit_base_patch32_224] [--pairs 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime import protocol as p
from edge_runtime.protocol.signing import SERVER_KEY_ID, public_b64, write_secret
from edge_runtime.quantize import quantize
from server_runtime.config import RunConfig, SecuritySection
from server_runtime.presets import get_preset
from sflam.broker import MosquittoBroker

from bench_server import Settings, exchange_median, run_fleet  # benchmarks/, the folder of this script

GOAL = 0.05
BITS, BATCH = 8, 8


def codec_costs(preset: str, repeat: int) -> dict[str, float]:
    """Median seconds of encode/decode, unsigned and signed, for one step's two frames."""
    config = get_preset(preset)
    tokens = (config.img_size // config.patch_size) ** 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, tokens, config.embed_dim)).astype(np.float32)
    env = p.Envelope("bench", 1, "dev-0", 0, 1.0)
    up = p.Activations(env, quantize(x, BITS, rng=rng), p.Tensor.from_numpy(np.arange(BATCH, dtype=np.uint8)))
    down = p.Gradient(env, quantize(x * 1e-3, BITS, rng=rng), 2.3)
    device, server = p.SigningKey.generate("dev-0"), p.SigningKey.generate(SERVER_KEY_ID)
    keys = p.Keyring({"dev-0": device.public_bytes, SERVER_KEY_ID: server.public_bytes})
    figures: dict[str, float] = {"up_bytes": len(p.encode(up)), "down_bytes": len(p.encode(down))}
    cases = {
        "encode": (lambda: p.encode(up), lambda: p.encode(up, device)),
        "decode": (lambda f=p.encode(up): p.decode(f), lambda f=p.encode(up, device): p.decode(f, keys=keys, signer="dev-0")),
        "encode_down": (lambda: p.encode(down), lambda: p.encode(down, server)),
        "decode_down": (lambda f=p.encode(down): p.decode(f),
                        lambda f=p.encode(down, server): p.decode(f, keys=keys, signer=SERVER_KEY_ID)),
    }
    for name, (plain, signed) in cases.items():
        times = {"plain": [], "signed": []}
        for _ in range(repeat):
            for mode, fn in (("plain", plain), ("signed", signed)):
                t0 = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
        figures[f"{name}_plain_s"] = statistics.median(times["plain"])
        figures[f"{name}_signed_s"] = statistics.median(times["signed"])
    return figures


@dataclasses.dataclass(frozen=True)
class Keys:
    """A one-device fleet's key files: the server's key, the key list, the device's key, the server's public key."""

    server_key: Path
    fleet_json: Path
    device_key: Path
    server_pub: Path

    @classmethod
    def write(cls, folder: Path) -> Keys:
        folder.mkdir(mode=0o700)
        server, device = p.SigningKey.generate(SERVER_KEY_ID), p.SigningKey.generate("dev-0")
        keys = cls(folder / "server.key", folder / "fleet.json", folder / "dev-0.key", folder / "server.pub")
        write_secret(keys.server_key, server.pem())
        write_secret(keys.device_key, device.pem())
        keys.server_pub.write_bytes(server.public_pem())
        keys.fleet_json.write_text(json.dumps({"server": {"public_key": public_b64(server.public_bytes)},
                                               "devices": [{"id": "dev-0", "public_key": public_b64(device.public_bytes)}]}))
        return keys


def q8(cfg: RunConfig) -> RunConfig:
    return cfg.replace(quant=dataclasses.replace(cfg.quant, bits=BITS, gradient_bits=BITS))


def round_trips(s: Settings, url: str, bundle: Path, work: Path, pairs: int, keys: Keys) -> list[tuple[float, float]]:
    """(unsigned, signed) median exchange seconds of each pair of runs."""
    signed_cfg = SecuritySection("ed25519", str(keys.server_key), str(keys.fleet_json))
    device_args = ("--signing-key", str(keys.device_key), "--server-key", str(keys.server_pub))
    log, results = logging.getLogger("bench_signing"), []
    for i in range(pairs):
        pair = []
        for mode in ("unsigned", "signed"):
            log.warning("pair %d/%d: %s run, %d rounds", i + 1, pairs, mode, s.rounds)
            change = q8 if mode == "unsigned" else (lambda cfg: q8(cfg).replace(security=signed_cfg))
            extra = (lambda _d: ()) if mode == "unsigned" else (lambda _d: device_args)
            _, times = run_fleet(s, url, bundle, work, f"{mode}-{i}", 1, s.per_device, s.rounds, change=change,
                                 device_extra=extra)
            pair.append(exchange_median(times[0])[0])
        results.append((pair[0], pair[1]))
    return results


def report(preset: str, codec: dict[str, float], pairs: list[tuple[float, float]], steps: int) -> bool:
    print(f"\nEd25519 signatures on {preset}, q = {BITS} both ways, batch {BATCH}")
    print(f"\n(1) codec, median of alternating runs ({codec['up_bytes']} B activations, {codec['down_bytes']} B gradient)")
    for name in ("encode", "decode", "encode_down", "decode_down"):
        plain, signed = codec[f"{name}_plain_s"], codec[f"{name}_signed_s"]
        print(f"    {name:<12} unsigned {plain * 1e3:8.3f} ms   signed {signed * 1e3:8.3f} ms   "
              f"+{(signed - plain) * 1e3:.3f} ms")
    added = sum(codec[f"{n}_signed_s"] - codec[f"{n}_plain_s"] for n in ("encode", "decode", "encode_down", "decode_down"))
    print(f"    one step's signing and verification, both frames: +{added * 1e3:.3f} ms")
    print(f"\n(2) device step round trip, median of {steps} steps per run (rounds after the first)")
    overheads = []
    for i, (plain, signed) in enumerate(pairs):
        overheads.append(signed / plain - 1)
        print(f"    pair {i + 1}: unsigned {plain * 1e3:9.2f} ms   signed {signed * 1e3:9.2f} ms   "
              f"overhead {overheads[-1] * 100:+6.2f} %")
    mean = statistics.mean(overheads)
    spread = f" (min {min(overheads) * 100:+.2f} %, max {max(overheads) * 100:+.2f} %)" if len(overheads) > 1 else ""
    print(f"    mean overhead {mean * 100:+.2f} %{spread}; the codec's share of a round trip: "
          f"{added / statistics.mean(u for u, _ in pairs) * 100:.3f} %")
    met = mean <= GOAL
    print(f"\ngoal: signing + verification <= {GOAL * 100:g} % of the round trip: {'met' if met else 'missed'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_base_patch32_224", help="model preset (default ViT-B/32)")
    parser.add_argument("--pairs", type=int, default=2, help="unsigned/signed run pairs (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run, the first is warm-up (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="steps per round (batches of 8 per device, default 4)")
    parser.add_argument("--repeat", type=int, default=50, help="codec repetitions (default 50)")
    args = parser.parse_args()
    if args.pairs < 1 or args.rounds < 2 or args.steps < 1 or args.repeat < 1:
        parser.error("--pairs, --steps and --repeat must be >= 1, --rounds >= 2")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    codec = codec_costs(args.preset, args.repeat)
    s = Settings(args.preset, 1, args.rounds, BATCH, BATCH * args.steps, args.rounds, BATCH * args.steps, 0,
                 1, torch.get_num_threads(), ("b",), None)
    from export.bundle import export_bundle

    with tempfile.TemporaryDirectory(prefix="sflam-bench-signing-") as tmp:
        work = Path(tmp)
        logging.getLogger("bench_signing").warning("exporting a %s bundle", args.preset)
        export_bundle(args.preset, "raspberry-pi-5", work / "bundle", batch=4, formats=("onnx",))
        with MosquittoBroker(work / "mosquitto") as broker:
            pairs = round_trips(s, broker.url, work / "bundle", work, args.pairs, Keys.write(work / "keys"))
    return 0 if report(args.preset, codec, pairs, (args.rounds - 1) * args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
