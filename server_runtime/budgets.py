"""The server's chunk-reassembly budgets, sized from the model it trains (docs/protocol.md 8.3).

The largest frame a device sends the server is its ``RoundUpdate`` (the device part's float32
weights; with ``training.mode = "fl"`` the whole model's) or, in split modes, one step's
``Activations`` (batch x tokens x embed dim at the uplink bit width, a range per token, the
labels). One device may hold ``max_sets_per_device`` incomplete sets of that size, plus
``DEVICE_MARGIN_BYTES`` for its small messages; all of them together hold that for every device of
a round, at most the protocol's default (512 MiB). Beyond it the reassembler evicts the sets of the
device holding the most, so the ceiling costs a legitimate round nothing while the devices of one
round fit under it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from allocator.scenario import ModelShape, full_model_params
from edge_runtime.protocol.chunking import DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_SETS_PER_DEVICE, Reassembler
from edge_runtime.protocol.codec import DEFAULT_LIMITS
from edge_runtime.quantize import payload_nbytes
from server_runtime.config import RunConfig
from server_runtime.presets import get_preset

log = logging.getLogger(__name__)
MIB = 1024 * 1024
FRAME_OVERHEAD_BYTES = 64 * 1024  # frame header, envelope, tensor names and shapes, telemetry: a few KiB
DEVICE_MARGIN_BYTES = 1 * MIB  # a device's hellos and error reports beside its largest sets
WEIGHT_BYTES = 4  # devices upload float32 weights
RANGE_BYTES = 8  # a quantized group's (lo, hi), float32 each
LABEL_BYTES = 8  # int64 labels


def update_frame_bytes(shape: ModelShape, mode: str) -> int:
    """A RoundUpdate's frame: the device part's weights, the whole model's in FL mode.

    The head is counted at the preset's class count (a fresh model's); a dataset with more classes
    adds embed_dim x 4 bytes per class, which the margins cover for small differences."""
    params = full_model_params(shape) if mode == "fl" else int(shape.device_weight_bits) // 32
    return params * WEIGHT_BYTES + FRAME_OVERHEAD_BYTES


def activations_frame_bytes(shape: ModelShape, batch_size: int, bits: int) -> int:
    """One step's Activations frame at ``bits``, with a range per token (the larger granularity)."""
    tokens = batch_size * shape.tokens
    data = payload_nbytes(tokens * shape.embed_dim, bits) + tokens * RANGE_BYTES + batch_size * LABEL_BYTES
    return data + FRAME_OVERHEAD_BYTES


def uplink_bits(config: RunConfig) -> int:
    """The widest activation bit width the run's devices may send (the allocator's widest when auto)."""
    bits = config.quant.bits
    return max(config.allocator.allowed_bits) if bits == "auto" else int(bits)


def largest_upload_bytes(config: RunConfig) -> int:
    """The largest frame a device of this run sends the server."""
    shape = ModelShape.from_preset(get_preset(config.model.preset))
    update = update_frame_bytes(shape, config.training.mode)
    if config.training.mode == "fl":  # FL devices train the whole model: no activations travel
        return update
    return max(update, activations_frame_bytes(shape, config.training.batch_size, uplink_bits(config)))


@dataclass(frozen=True)
class ChunkBudget:
    """What the server's reassembler may hold: per device and in all, and the frame it is sized for."""

    frame_bytes: int
    per_device_bytes: int
    total_bytes: int
    sets_per_device: int = DEFAULT_MAX_SETS_PER_DEVICE

    def reassembler(self) -> Reassembler:
        return Reassembler(max_sets_per_device=self.sets_per_device, max_buffered_bytes=self.total_bytes,
                           max_bytes_per_device=self.per_device_bytes)

    def describe(self) -> str:
        return (f"chunk reassembly {self.total_bytes / MIB:,.1f} MiB in all, {self.per_device_bytes / MIB:,.1f} MiB "
                f"per device ({self.sets_per_device} sets of the largest upload, {self.frame_bytes / MIB:,.2f} MiB)")


def chunk_budget(config: RunConfig, ceiling_bytes: int = DEFAULT_MAX_BUFFERED_BYTES) -> ChunkBudget:
    """The budgets of the module doc's rule; neither exceeds ``ceiling_bytes``."""
    frame = largest_upload_bytes(config)
    per_device = min(frame * DEFAULT_MAX_SETS_PER_DEVICE + DEVICE_MARGIN_BYTES, ceiling_bytes)
    total = min(per_device * max(config.training.devices_per_round, 1), ceiling_bytes)
    return ChunkBudget(frame, per_device, total)


def server_reassembler(config: RunConfig) -> Reassembler:
    """The reassembler a server (or a trainer rank) receives with, sized by :func:`chunk_budget`."""
    budget = chunk_budget(config)
    log.info("%s for %s (%s)", budget.describe(), config.model.preset, config.training.mode)
    if budget.frame_bytes > DEFAULT_LIMITS.max_frame_bytes:
        log.warning("the largest upload of %s in mode %s (%.0f MiB) exceeds the decoder's frame limit (%.0f MiB): "
                    "no device can deliver it", config.model.preset, config.training.mode, budget.frame_bytes / MIB,
                    DEFAULT_LIMITS.max_frame_bytes / MIB)
    return budget.reassembler()
