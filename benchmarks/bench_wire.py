"""Bytes on the wire against the ideal, both directions (docs/protocol.md, docs/allocator.md).

For each direction, model, granularity, bit-width and batch size, encodes a real message with the
sflam codec: uplink an ``Activations`` (stochastically quantized activations, uint8 labels) on the
device's ``up`` topic, downlink a ``Gradient`` (the server's stochastically quantized activation
gradient and its loss) on the device's ``down`` topic. It adds the MQTT 5 PUBLISH framing of a QoS 1
publish (computed analytically, not captured from a broker) and divides by the ideal payload: d*q/8
+ 1 byte per label up, d*q/8 down.

    .venv/bin/python benchmarks/bench_wire.py [--quick]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from edge_runtime.protocol import SERVER_ID, Activations, Envelope, Gradient, Tensor, Topics, encode, split
from edge_runtime.quantize import quantize
from server_runtime.presets import get_preset

MODELS = ("vit_base_patch32_224", "vit_quick_patch4_16")
BITS = (2, 4, 8)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
GRANULARITIES = ("tensor", "token")
DIRECTIONS = ("up", "down")
GOAL_RATIO, GOAL_MIN_BATCH = 1.01, 8
EMQX_MAX_PACKET = 1024 * 1024  # EMQX's default mqtt.max_packet_size (1MB)


def varint_size(value: int) -> int:
    """Bytes of an MQTT variable byte integer (1-4)."""
    if not 0 <= value < 128**4:
        raise ValueError(f"{value} cannot be an MQTT remaining length")
    return next(n for n in range(1, 5) if value < 128**n)


def mqtt_publish_bytes(topic: str, payload_bytes: int) -> int:
    """Size of an MQTT 5 PUBLISH packet at QoS 1 with no properties.

    fixed header byte + remaining-length varint + (2-byte topic length + topic + 2-byte packet
    id + 1-byte properties length 0) + payload.
    """
    remaining = 2 + len(topic.encode("utf-8")) + 2 + 1 + payload_bytes
    return 1 + varint_size(remaining) + remaining


@dataclass(frozen=True)
class Cell:
    """Sizes for one (direction, model, per, bits, batch) message."""

    direction: str
    model: str
    per: str
    bits: int
    batch: int
    ideal: float
    frame: int
    publish: int
    chunked_publish: int | None  # all chunk publishes when one PUBLISH exceeds the packet limit

    @property
    def ratio(self) -> float:
        return self.publish / self.ideal

    @property
    def frame_ratio(self) -> float:
        return self.frame / self.ideal


def measure(
    direction: str, model: str, per: str, bits: int, batch: int, topics: Topics, device_id: str, packet_limit: int,
    seed: int,
) -> Cell:
    """Encode one Activations (up) or Gradient (down) message and size it on the wire."""
    cfg = get_preset(model)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.num_patches, cfg.embed_dim), dtype=np.float32)
    if direction == "up":
        topic, env = topics.up(device_id), Envelope(topics.run_id, 1, device_id, 0, 0.0)
        labels = Tensor.from_numpy(rng.integers(0, cfg.num_classes, batch).astype(np.uint8))
        message = Activations(env, quantize(x, bits, per=per, rng=rng), labels)
        ideal = x.size * bits / 8 + batch
    else:
        topic, env = topics.down(device_id), Envelope(topics.run_id, 1, SERVER_ID, 0, 0.0)
        message = Gradient(env, quantize(x * 1e-3, bits, per=per, rng=rng), 2.3)
        ideal = x.size * bits / 8
    frame = len(encode(message))
    publish = mqtt_publish_bytes(topic, frame)
    chunked = None
    if publish > packet_limit:
        frame_limit = packet_limit - (mqtt_publish_bytes(topic, packet_limit) - packet_limit)
        chunked = sum(mqtt_publish_bytes(topic, len(c)) for c in split(message, frame_limit))
    return Cell(direction, model, per, bits, batch, ideal, frame, publish, chunked)


def cell_text(value: float, batch: int) -> str:
    """A ratio, marked ok/MISS against the goal where the goal applies (batch >= 8)."""
    if batch < GOAL_MIN_BATCH:
        return f"{value:.4f}     "
    return f"{value:.4f} {'ok  ' if value <= GOAL_RATIO else 'MISS'}"


def print_table(cells: list[Cell], title: str, value: str) -> None:
    """Rows = batch, columns = bits, for every (model, per) pair."""
    print(f"\n{title}")
    for direction, model, per in ((d, m, g) for d in DIRECTIONS for m in MODELS for g in GRANULARITIES):
        rows = [c for c in cells if (c.direction, c.model, c.per) == (direction, model, per)]
        if rows:
            print(f"\n  {'uplink (activations)' if direction == 'up' else 'downlink (gradients)'}: {model}, per {per}")
            print("  " + f"{'batch':>6}" + "".join(f"{'q=' + str(b):>14}" for b in BITS))
            for batch in sorted({c.batch for c in rows}):
                by_bits = {c.bits: c for c in rows if c.batch == batch}
                texts = [_value_text(by_bits.get(b), value) for b in BITS]
                print("  " + f"{batch:>6}" + "".join(f"{t:>14}" for t in texts))


def _value_text(cell: Cell | None, value: str) -> str:
    """The text of one table cell: ``value`` is a Cell attribute, or "chunked"."""
    if cell is None:
        return "-"
    if value != "chunked":
        return cell_text(getattr(cell, value), cell.batch)
    if cell.chunked_publish is None:
        return "(one packet)"
    return cell_text(cell.chunked_publish / cell.ideal, cell.batch)


def print_sizes(cells: list[Cell]) -> None:
    """Absolute sizes for the largest batch of each model, as a cross-check of the ratios."""
    print("\nabsolute bytes at the largest batch (ideal / sflam frame / MQTT PUBLISH / chunked publishes)")
    largest = max(c.batch for c in cells)
    for c in cells:
        if c.batch == largest:
            chunked = "-" if c.chunked_publish is None else str(c.chunked_publish)
            sizes = f"{c.ideal:>12.0f} {c.frame:>12} {c.publish:>12} {chunked:>12}"
            print(f"  {c.direction:<4} {c.model:<22} per {c.per:<6} q={c.bits}: {sizes}")


def main(argv: list[str] | None = None) -> None:
    """Parse options, size every cell and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 8 and 32 only")
    parser.add_argument("--run-id", default="run1", help="run id in the envelope and topic (default run1)")
    parser.add_argument("--device-id", default="device-00", help="device id in the envelope and topic")
    parser.add_argument(
        "--packet-limit", type=int, default=EMQX_MAX_PACKET, help="broker max MQTT packet bytes (default 1 MiB, EMQX)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = (1, 8, 32) if args.quick else BATCHES
    topics = Topics(args.run_id)
    topic = topics.up(args.device_id)

    print("bytes on the wire / ideal, ideal = d*q/8 + 1 byte per label (uint8) up, d*q/8 down")
    print("wire = sflam Activations (up) or Gradient (down) frame (real encoder) + MQTT 5 PUBLISH framing, QoS 1:")
    print(f"  1 fixed-header byte + remaining-length varint + 2 + {len(topic)} topic bytes ({topic}, down alike)")
    print("  + 2 packet-id bytes + 1 properties-length byte; the MQTT framing is computed analytically")
    print("  (from the MQTT 5 packet layout), not captured from a broker; TCP/IP/TLS headers are not counted")
    print(f"goal: ratio <= {GOAL_RATIO} at batch >= {GOAL_MIN_BATCH}; 'ok'/'MISS' mark the cells the goal applies to")
    cells = [
        measure(direction, model, per, bits, batch, topics, args.device_id, args.packet_limit, args.seed)
        for direction in DIRECTIONS
        for model in MODELS
        for per in GRANULARITIES
        for bits in BITS
        for batch in batches
    ]
    print_table(cells, "(1) sflam frame + MQTT PUBLISH framing, one PUBLISH per message", "ratio")
    print_table(cells, "(2) sflam frame only (no MQTT framing)", "frame_ratio")
    print_table(
        cells,
        f"(3) as actually published when one PUBLISH would exceed {args.packet_limit} bytes: "
        "Chunk frames, each with its MQTT framing",
        "chunked",
    )
    print_sizes(cells)


if __name__ == "__main__":
    main()
