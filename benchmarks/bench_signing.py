"""What Ed25519 message signatures cost on a ViT-B/32 step, measured side by side (docs/security.md).

(1) Codec: the q = 8, batch-8 Activations of ViT-B/32 and the q = 8 Gradient that answers it,
    split into frames as a device and the server send them (each chunk and the inner frame signed)
    and taken by a Receiver on their topic (signatures verified), against the same unsigned
    (median of ``--repeat`` runs each, alternating).
(2) Step round trip: one ``sflam device`` process (numpy backend) against the daemon over a real
    mosquitto, q = 8 both ways, batch 8: the median of ``DeviceClient._exchange`` (quantize and
    publish the activations, the server's step, the gradient back, decoded), rounds after the
    first. Unsigned and signed runs alternate (``--pairs`` pairs, the first mode alternating too);
    the overhead is signed / unsigned - 1 per pair. Goal: <= 5 %.

    .venv/bin/python benchmarks/bench_signing.py [--preset vit_base_patch32_224] [--pairs 4] [--rounds 3]
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
from edge_runtime.mqtt import DEFAULT_MAX_FRAME_BYTES
from edge_runtime.protocol.signing import SERVER_KEY_ID, public_b64, write_secret
from edge_runtime.quantize import quantize
from server_runtime.config import RunConfig, SecuritySection
from server_runtime.presets import get_preset
from sflam.broker import MosquittoBroker

from bench_server import Settings, exchange_median, run_fleet  # benchmarks/, the folder of this script

GOAL = 0.05
BITS, BATCH = 8, 8


def codec_costs(preset: str, repeat: int) -> dict[str, float]:
    """Median seconds to send and to receive one step's two frames, unsigned and signed: split into
    frames of DEFAULT_MAX_FRAME_BYTES (each chunk signed too) and taken by a Receiver on its topic."""
    config = get_preset(preset)
    tokens = (config.img_size // config.patch_size) ** 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, tokens, config.embed_dim)).astype(np.float32)
    topics = p.Topics("bench")
    device, server = p.SigningKey.generate("dev-0"), p.SigningKey.generate(SERVER_KEY_ID)
    keys = p.Keyring({"dev-0": device.public_bytes, SERVER_KEY_ID: server.public_bytes})
    figures: dict[str, float] = {}
    for name, topic, signer in (("up", topics.up("dev-0"), device), ("down", topics.down("dev-0"), server)):
        times: dict[str, list[float]] = {"send_plain": [], "send_signed": [], "receive_plain": [], "receive_signed": []}
        for i in range(repeat):
            env = p.Envelope("bench", 1, "dev-0", i, 1.0)
            if name == "up":
                message = p.Activations(env, quantize(x, BITS, rng=rng), p.Tensor.from_numpy(np.arange(BATCH, dtype=np.uint8)))
            else:
                message = p.Gradient(env, quantize(x * 1e-3, BITS, rng=rng), 2.3)
            for mode, key, ring in (("plain", None, None), ("signed", signer, keys)):
                t0 = time.perf_counter()
                frames = p.split(message, DEFAULT_MAX_FRAME_BYTES, key)
                t1 = time.perf_counter()
                receiver = p.Receiver("bench", keys=ring)
                got = [receiver.accept(f, topic) for f in frames][-1]
                t2 = time.perf_counter()
                assert got == message
                times[f"send_{mode}"].append(t1 - t0)
                times[f"receive_{mode}"].append(t2 - t1)
        figures[f"{name}_bytes"] = sum(len(f) for f in p.split(message, DEFAULT_MAX_FRAME_BYTES))
        figures[f"{name}_frames"] = len(p.split(message, DEFAULT_MAX_FRAME_BYTES))
        figures.update({f"{name}_{k}_s": statistics.median(v) for k, v in times.items()})
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
        pair = {}
        for mode in ("unsigned", "signed") if i % 2 == 0 else ("signed", "unsigned"):  # no order bias
            log.warning("pair %d/%d: %s run, %d rounds", i + 1, pairs, mode, s.rounds)
            change = q8 if mode == "unsigned" else (lambda cfg: q8(cfg).replace(security=signed_cfg))
            extra = (lambda _d: ()) if mode == "unsigned" else (lambda _d: device_args)
            _, times = run_fleet(s, url, bundle, work, f"{mode}-{i}", 1, s.per_device, s.rounds, change=change,
                                 device_extra=extra)
            pair[mode] = exchange_median(times[0])[0]
        results.append((pair["unsigned"], pair["signed"]))
    return results


def report(preset: str, codec: dict[str, float], pairs: list[tuple[float, float]], steps: int) -> bool:
    print(f"\nEd25519 signatures on {preset}, q = {BITS} both ways, batch {BATCH}")
    print("\n(1) one step's frames, split to the default frame size and received on their topic (median)")
    added = 0.0
    for name, what in (("up", "activations"), ("down", "gradient")):
        print(f"    {what}: {codec[f'{name}_bytes']:.0f} B in {codec[f'{name}_frames']:.0f} frame(s)")
        for side in ("send", "receive"):
            plain, signed = codec[f"{name}_{side}_plain_s"], codec[f"{name}_{side}_signed_s"]
            added += signed - plain
            print(f"      {side:<8} unsigned {plain * 1e3:8.3f} ms   signed {signed * 1e3:8.3f} ms   "
                  f"+{(signed - plain) * 1e3:.3f} ms")
    print(f"    one step's signing and verification, both directions: +{added * 1e3:.3f} ms")
    print(f"\n(2) device step round trip, median of {steps} steps per run (rounds after the first); the pairs"
          " alternate which mode runs first")
    overheads = []
    for i, (plain, signed) in enumerate(pairs):
        overheads.append(signed / plain - 1)
        print(f"    pair {i + 1}: unsigned {plain * 1e3:9.2f} ms   signed {signed * 1e3:9.2f} ms   "
              f"overhead {overheads[-1] * 100:+6.2f} %")
    mean = statistics.mean(overheads)
    spread = f" (min {min(overheads) * 100:+.2f} %, max {max(overheads) * 100:+.2f} %)" if len(overheads) > 1 else ""
    print(f"    mean overhead {mean * 100:+.2f} %{spread}; the codec's share of an unsigned round trip: "
          f"{added / statistics.mean(u for u, _ in pairs) * 100:.3f} %")
    met = mean <= GOAL
    print(f"\ngoal: signing + verification <= {GOAL * 100:g} % of the round trip: {'met' if met else 'missed'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_base_patch32_224", help="model preset (default ViT-B/32)")
    parser.add_argument("--pairs", type=int, default=4, help="unsigned/signed run pairs (default 4)")
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
