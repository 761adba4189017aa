"""Device-sized receive buffers (edge_runtime.memory, docs/reliability.md "Device-sized buffers").

A device buffers at most 1/16 of its RAM for received messages: RAM/32 in the link inbox (and per
topic), RAM/32 in the chunk reassembler, each clamped to [16 MiB, the server-sized default]. A
512 MiB board therefore gets 16 MiB + 16 MiB, and must still receive a ViT-B/32 round whole. The
server's reassembler is sized from its model instead (server_runtime.budgets), tested at the end.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as p
from edge_runtime.inbox import Inbox, InboxLimits, Incoming
from edge_runtime.memory import (
    BUFFER_FLOOR_BYTES,
    DEFAULT_REASSEMBLY_BYTES,
    MIB,
    DeviceBuffers,
    check_fits,
    device_buffer_limits,
)
from edge_runtime.quantize import dequantize, quantize

GIB = 1024 * MIB
RUN, DEVICE = "run-buffers", "pi-512"
FRAME = 256 * 1024  # DEFAULT_MAX_FRAME_BYTES
PROFILES = Path(__file__).resolve().parents[1] / "firmware_profiles" / "profiles"
# ViT-B/32's device weights and one step's gradient (batch 8, 7 x 7 patches, 768 wide)
WEIGHT_SHAPE, GRADIENT_SHAPE, STEPS = (768, 3, 32, 32), (8, 49, 768), 10


def profile_with_ram(tmp_path: Path, ram_bytes: int, name: str = "pi-512") -> Path:
    """raspberry-pi-5.toml with another name and ``ram_bytes`` of RAM, as a profile file."""
    text = (PROFILES / "raspberry-pi-5.toml").read_text()
    text, names = re.subn(r"(?m)^name = .*$", f'name = "{name}"', text)
    text, rams = re.subn(r"(?m)^ram_bytes = .*$", f"ram_bytes = {ram_bytes}", text)
    assert (names, rams) == (1, 1), "raspberry-pi-5.toml no longer has one name and one ram_bytes line"
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def put_all(inbox: Inbox, frames: list[tuple[str, bytes, bool]]) -> None:
    for topic, frame, retained in frames:
        assert inbox.put(Incoming(topic, frame, retained)), f"{topic} refused: {dict(inbox.counters)}"


# -- the rule -------------------------------------------------------------------------------------


def test_512_mib_of_ram_gets_16_mib_inbox_and_16_mib_reassembly() -> None:
    # Execute
    buffers = device_buffer_limits(512 * MIB)

    # Verify
    assert (buffers.inbox.max_bytes, buffers.inbox.max_source_bytes, buffers.reassembly_bytes) == (16 * MIB,) * 3
    assert buffers.ram_bytes == 512 * MIB


@pytest.mark.parametrize(("ram", "inbox", "per_source", "reassembly"), [
    (4 * GIB, 128 * MIB, 64 * MIB, 128 * MIB),  # jetson-nano
    (8 * GIB, 256 * MIB, 64 * MIB, 256 * MIB),  # raspberry-pi-5: the inbox reaches its ceiling
    (12 * GIB, 256 * MIB, 64 * MIB, 384 * MIB),  # android-flagship
    (64 * GIB, 256 * MIB, 64 * MIB, 512 * MIB),  # everything at the server-sized ceiling
    (1 * GIB, 32 * MIB, 32 * MIB, 32 * MIB),
], ids=["4GiB", "8GiB", "12GiB", "64GiB", "1GiB"])
def test_budgets_are_a_32nd_of_ram_each_up_to_the_server_defaults(ram: int, inbox: int, per_source: int,
                                                                   reassembly: int) -> None:
    # Execute
    buffers = device_buffer_limits(ram)

    # Verify
    assert (buffers.inbox.max_bytes, buffers.inbox.max_source_bytes, buffers.reassembly_bytes) == (
        inbox, per_source, reassembly)


def test_unknown_ram_gets_the_server_defaults() -> None:
    # Execute
    buffers = device_buffer_limits(None)

    # Verify
    assert buffers.inbox == InboxLimits()
    assert buffers.reassembly_bytes == DEFAULT_REASSEMBLY_BYTES == p.Reassembler().max_buffered_bytes
    assert buffers.ram_bytes is None


@pytest.mark.parametrize("ram", [1, 1024 * 1024, 8_912_896, 511 * MIB], ids=["1B", "stm32h7", "esp32-s3", "511MiB"])
def test_tiny_ram_gets_the_floor(ram: int) -> None:
    # Execute
    buffers = device_buffer_limits(ram)

    # Verify
    assert buffers.inbox.max_bytes == buffers.inbox.max_source_bytes == buffers.reassembly_bytes == BUFFER_FLOOR_BYTES


def test_other_inbox_limits_stay_at_their_defaults_and_bad_ram_is_refused() -> None:
    # Execute
    inbox = device_buffer_limits(512 * MIB).inbox

    # Verify
    assert (inbox.max_source_messages, inbox.expiry_s) == (InboxLimits().max_source_messages, InboxLimits().expiry_s)
    with pytest.raises(ValueError, match="RAM must be > 0"):
        device_buffer_limits(0)


def test_per_source_never_exceeds_the_inbox() -> None:
    # Setup
    rams = [None, *(int(x) for x in np.geomspace(1, 1 << 40, 400)), *(k * MIB + d for k in (512, 1024, 2048, 8192)
                                                                       for d in (-1, 0, 1))]

    # Execute / Verify (InboxLimits itself raises when max_source_bytes > max_bytes)
    for ram in rams:
        buffers = device_buffer_limits(ram)
        assert BUFFER_FLOOR_BYTES <= buffers.inbox.max_source_bytes <= buffers.inbox.max_bytes, ram
        assert BUFFER_FLOOR_BYTES <= buffers.reassembly_bytes <= DEFAULT_REASSEMBLY_BYTES, ram


def test_every_shipped_profile_gets_buffers_that_hold_a_vit_b32_weights_message() -> None:
    from firmware_profiles import load_all

    # Setup
    model_bytes = int(np.prod(WEIGHT_SHAPE)) * 4 + 768 * 4

    # Execute / Verify
    for profile in load_all():
        check_fits(device_buffer_limits(profile.memory.total_ram_bytes), model_bytes)


# -- check_fits ------------------------------------------------------------------------------------


def test_check_fits_says_the_ram_the_budgets_the_size_and_what_to_do() -> None:
    # Setup
    buffers = device_buffer_limits(512 * MIB)

    # Execute
    with pytest.raises(ValueError) as caught:
        check_fits(buffers, 20 * MIB, "the model weights message")

    # Verify
    text = str(caught.value)
    for part in ("the model weights message (20.0 MiB)", "512 MiB RAM", "inbox 16 MiB (16 MiB per topic)",
                 "chunk reassembly 16 MiB", "at least 640 MiB of RAM"):
        assert part in text, text


def test_check_fits_says_when_no_ram_is_enough() -> None:
    # Execute
    with pytest.raises(ValueError, match="no device gets more than 64 MiB for one message: export a smaller preset"):
        check_fits(device_buffer_limits(64 * GIB), 100 * MIB)


def test_check_fits_accepts_a_message_exactly_at_the_budget() -> None:
    # Setup
    buffers = DeviceBuffers(InboxLimits(max_bytes=32 * MIB, max_source_bytes=32 * MIB), 16 * MIB)

    # Execute / Verify: the smaller of the per-topic and reassembly budgets decides
    check_fits(buffers, 16 * MIB)
    with pytest.raises(ValueError, match="chunk reassembly 16 MiB"):
        check_fits(buffers, 16 * MIB + 1)


# -- a ViT-B/32 round through the budgets of a 512 MiB device --------------------------------------


def vit_b32_round() -> tuple[dict[str, np.ndarray], list[np.ndarray], p.ModelWeights, p.RoundPlan, list[p.Gradient]]:
    """A ViT-B/32 round's arrays and the messages that carry them: the device weights, the plan,
    and STEPS gradients at 32 bits."""
    rng = np.random.default_rng(0)
    server = p.Envelope(RUN, 1, p.SERVER_ID)
    weights = {"patch_embed.proj.weight": rng.standard_normal(WEIGHT_SHAPE, dtype=np.float32),
               "patch_embed.proj.bias": rng.standard_normal(768, dtype=np.float32)}
    grads = [rng.standard_normal(GRADIENT_SHAPE, dtype=np.float32) for _ in range(STEPS)]
    model = p.ModelWeights(server, 1, p.weights_from_numpy(weights))
    plan = p.RoundPlan(server, 1, 600.0, 1, 8, 0.01, (p.Allocation(DEVICE, 8, 32, 0.1, 1e6),))
    gradients = [p.Gradient(p.Envelope(RUN, 1, DEVICE, step), quantize(g, 32), 0.5) for step, g in enumerate(grads)]
    return weights, grads, model, plan, gradients


def test_a_512_mb_device_gets_bounded_buffers_and_still_completes_a_vit_b32_round(tmp_path: Path) -> None:
    from firmware_profiles import load_profile

    # Setup: the buffers of a 512 MiB profile; a round's real frames as the broker delivers them
    buffers = device_buffer_limits(load_profile(profile_with_ram(tmp_path, 512 * MIB)).memory.total_ram_bytes)
    inbox = Inbox(buffers.inbox)
    receiver = p.Receiver(RUN, reassembler=buffers.reassembler())
    topics = p.Topics(RUN)
    weights, grads, model, plan, gradients = vit_b32_round()
    model_frames = [(topics.retained_part("model", i), f, True) for i, f in enumerate(p.split(model, FRAME))]
    gradient_frames = [[(topics.down(DEVICE), f, False) for f in p.split(g, FRAME)] for g in gradients]
    assert len(model_frames) == 37 and all(len(g) == 5 for g in gradient_frames)  # chunked, as on the wire
    peak = {"inbox": 0, "reassembler": 0}

    def drain_watching() -> list[p.Message]:
        out = []
        while (item := inbox.get(0)) is not None:
            message = receiver.accept(item.payload, item.topic)
            peak["reassembler"] = max(peak["reassembler"], receiver.reassembler.buffered_bytes)
            out += [message] if message is not None else []
        return out

    # Execute: (1) the device is busy when the round starts, so the retained model and plan and the
    # first step's gradient all queue before it reads any; (2) the device stays busy while the other
    # nine steps' gradients arrive (the protocol has one step in flight; this is nine times worse)
    put_all(inbox, [*model_frames, (topics.plan(), p.encode(plan), True), *gradient_frames[0]])
    peak["inbox"] = inbox.buffered_bytes
    received = drain_watching()
    put_all(inbox, [frame for frames in gradient_frames[1:] for frame in frames])
    peak["inbox"] = max(peak["inbox"], inbox.buffered_bytes)
    received += drain_watching()

    # Verify: everything intact, nothing dropped, and the budgets held
    by_type = {t: [m for m in received if isinstance(m, t)] for t in (p.ModelWeights, p.RoundPlan, p.Gradient)}
    assert len(received) == 1 + 1 + STEPS
    assert by_type[p.RoundPlan] == [plan]
    (got_model,) = by_type[p.ModelWeights]
    got = p.weights_to_numpy(got_model.weights)
    assert got.keys() == weights.keys() and all(np.array_equal(got[k], weights[k]) for k in weights)
    assert [g.envelope.step for g in by_type[p.Gradient]] == list(range(STEPS))
    assert all(np.array_equal(dequantize(g.tensor), sent) for g, sent in zip(by_type[p.Gradient], grads))
    assert not [k for k in inbox.counters if k.startswith(("dropped", "expired"))], inbox.counters
    assert inbox.counters["queued"] == len(model_frames) + 1 + sum(map(len, gradient_frames))
    assert not [k for k in receiver.counters if k.startswith("rejected")], receiver.counters
    assert not {"rejected_chunks", "evicted_sets", "evicted_for_space", "expired_sets"} & set(
        receiver.reassembler.counters)
    assert 9_000_000 < peak["inbox"] <= buffers.inbox.max_bytes
    assert 9_000_000 < peak["reassembler"] <= buffers.reassembly_bytes
    assert inbox.buffered_bytes == receiver.reassembler.buffered_bytes == 0


def test_a_flood_on_one_topic_is_dropped_at_the_per_topic_budget(tmp_path: Path) -> None:
    from firmware_profiles import load_profile

    # Setup: 20 re-sends of a 1.2 MB gradient (24 MB) at a device whose topic budget is 16 MiB
    buffers = device_buffer_limits(load_profile(profile_with_ram(tmp_path, 512 * MIB)).memory.total_ram_bytes)
    inbox = Inbox(buffers.inbox)
    topic = p.Topics(RUN).down(DEVICE)
    *_, gradients = vit_b32_round()
    frames = [f for _ in range(2) for g in gradients for f in p.split(g, FRAME)]

    # Execute
    accepted, peak = 0, 0
    for frame in frames:
        accepted += inbox.put(Incoming(topic, frame, False))
        peak = max(peak, inbox.buffered_bytes)

    # Verify
    assert inbox.counters["dropped_source_full"] == len(frames) - accepted > 0
    assert peak <= buffers.inbox.max_source_bytes
    assert buffers.inbox.max_source_bytes - peak < FRAME  # it filled up to the budget, not less
    # on a 512 MiB device one topic's share is the whole inbox: until the device drains the flood,
    # another topic's publish is refused too, and counted
    assert not inbox.put(Incoming(p.Topics(RUN).plan(), bytes(FRAME), True))
    assert inbox.counters["dropped_full"] == 1


def test_a_chunk_set_larger_than_the_reassembly_budget_is_refused_not_buffered() -> None:
    # Setup: a 20 MiB weights message at a reassembler holding 16 MiB
    buffers = device_buffer_limits(512 * MIB)
    receiver = p.Receiver(RUN, reassembler=buffers.reassembler())
    big = p.ModelWeights(p.Envelope(RUN, 1, p.SERVER_ID), 1,
                         p.weights_from_numpy({"w": np.ones(5 * MIB, np.float32)}))
    topics = p.Topics(RUN)
    frames = p.split(big, FRAME)

    # Execute
    refused = 0
    for index, frame in enumerate(frames):
        try:
            assert receiver.accept(frame, topics.retained_part("model", index)) is None
        except p.LimitError:
            refused += 1

    # Verify
    assert refused > 0 and receiver.reassembler.counters["rejected_chunks"] == refused
    assert receiver.counters["rejected.LimitError"] == refused
    assert receiver.reassembler.buffered_bytes <= buffers.reassembly_bytes
    assert receiver.counters["accepted.ModelWeights"] == 0


# -- DeviceClient --------------------------------------------------------------------------------


def test_device_client_takes_its_buffers_from_its_profile(quick_bundle: Path, tmp_path: Path) -> None:
    from edge_runtime.data import DeviceData, Preprocess
    from edge_runtime.device import DeviceClient

    # Setup
    profile = profile_with_ram(tmp_path, 512 * MIB)
    device_json = json.loads((quick_bundle / "device.json").read_text())
    size = device_json["image_size"]
    data = DeviceData(np.zeros((8, size, size, 3), np.uint8), np.zeros(8, np.int64),
                      Preprocess.from_device_json(device_json))
    threads = set(threading.enumerate())

    # Execute: a client is built without connecting (start() connects)
    client = DeviceClient(quick_bundle, "mqtt://127.0.0.1:1", "dev-512", data, backend="numpy", run_id=RUN,
                          profile=str(profile))
    default = DeviceClient(quick_bundle, "mqtt://127.0.0.1:1", "dev-pi", data, backend="numpy", run_id=RUN)

    # Verify
    assert client.buffers == device_buffer_limits(512 * MIB)
    assert client.link.inbox.limits.max_bytes == client.link.inbox.limits.max_source_bytes == 16 * MIB
    assert client.receiver.reassembler.max_buffered_bytes == 16 * MIB
    assert client.receiver.reassembler.device_budget_bytes == 16 * MIB  # one sender: the server
    # the bundle's own profile (raspberry-pi-5, 8 GiB)
    assert client.link.inbox.limits is not default.link.inbox.limits
    assert default.link.inbox.limits.max_bytes == 256 * MIB
    assert default.receiver.reassembler.max_buffered_bytes == 256 * MIB
    assert default.receiver.reassembler.device_budget_bytes == 256 * MIB  # not the server-side 128 MiB
    assert set(threading.enumerate()) == threads  # nothing was started, so nothing is left running


def test_device_client_refuses_a_profile_too_small_for_its_weights_message(
        quick_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime.device as device
    from edge_runtime.data import DeviceData, Preprocess

    # Setup: pretend the bundle's weights message is 20 MiB (a 512 MiB device holds 16 MiB)
    monkeypatch.setattr(device, "weights_message_bytes", lambda bundle, manifest: 20 * MIB)
    device_json = json.loads((quick_bundle / "device.json").read_text())
    data = DeviceData(np.zeros((1, 16, 16, 3), np.uint8), np.zeros(1, np.int64),
                      Preprocess.from_device_json(device_json))

    # Execute / Verify
    with pytest.raises(ValueError, match=r"the model weights message \(20.0 MiB\) does not fit .*512 MiB RAM"):
        device.DeviceClient(quick_bundle, "mqtt://127.0.0.1:1", "dev-512", data, backend="numpy", run_id=RUN,
                            profile=str(profile_with_ram(tmp_path, 512 * MIB)))


# -- the server's reassembler, sized from its model (server_runtime.budgets) ----------------------


def round_update(preset_name: str, device: str, seed: int) -> p.RoundUpdate:
    """The RoundUpdate a split device sends: the preset's patch-embedding weights, float32."""
    from server_runtime.presets import get_preset

    preset = get_preset(preset_name)
    rng = np.random.default_rng(seed)
    shape = (preset.embed_dim, preset.in_chans, preset.patch_size, preset.patch_size)
    weights = {"patch_embed.proj.weight": rng.standard_normal(shape, dtype=np.float32),
               "patch_embed.proj.bias": rng.standard_normal(preset.embed_dim, dtype=np.float32)}
    telemetry = p.Telemetry(12.5, 3.25, 40.0, "estimated", 10**7, 10**7, 250)
    return p.RoundUpdate(p.Envelope(RUN, 3, device, 250), 2, 8000, p.weights_from_numpy(weights), telemetry)


@pytest.mark.parametrize("preset", ["vit_quick_patch4_16", "vit_base_patch32_224"])
def test_the_servers_reassembler_holds_a_round_update_in_every_set_a_device_may_open(preset: str) -> None:
    from server_runtime.budgets import chunk_budget, server_reassembler
    from server_runtime.config import ModelSection, RunConfig

    # Setup: the server of a default run of the preset (v1, 5 devices a round); as many distinct
    # updates from one device as it may have sets open, chunked into 3 or more pieces each
    config = RunConfig(model=ModelSection(preset=preset))
    budget, reassembler = chunk_budget(config), server_reassembler(config)
    updates = [round_update(preset, "dev-0", seed) for seed in range(reassembler.max_sets_per_device)]
    frame_bytes = len(p.encode(updates[0]))
    sets = [p.split(update, min(FRAME, frame_bytes // 3)) for update in updates]

    # Execute: every set opened and filled but for its last chunk, then the last chunks
    for frames in sets:
        assert [reassembler.feed(frame) for frame in frames[:-1]] == [None] * (len(frames) - 1)
    held = reassembler.buffered_bytes
    completed = [reassembler.feed(frames[-1]) for frames in sets]

    # Verify: the budgets hold one RoundUpdate frame per set, and all of them completed whole
    assert frame_bytes <= budget.frame_bytes
    assert reassembler.max_sets_per_device * frame_bytes <= budget.per_device_bytes <= budget.total_bytes
    assert (reassembler.device_budget_bytes, reassembler.max_buffered_bytes) == (
        budget.per_device_bytes, budget.total_bytes)
    assert held > (reassembler.max_sets_per_device - 1) * frame_bytes
    assert completed == updates
    assert not {"rejected_chunks", "evicted_sets", "evicted_for_space"} & set(reassembler.counters)


def test_the_server_budgets_of_the_quickstart_and_vit_b32_presets() -> None:
    from server_runtime.budgets import DEVICE_MARGIN_BYTES, FRAME_OVERHEAD_BYTES, chunk_budget
    from server_runtime.config import ModelSection, RunConfig, TrainingSection

    # Setup: default runs (v1, batch 32, 8 bits up, 5 devices a round); ViT-B/32 also with the
    # paper's batch 128 over 10 devices, and the quickstart in FL mode (the whole model goes up)
    quick, b32 = (RunConfig(model=ModelSection(preset=n)) for n in ("vit_quick_patch4_16", "vit_base_patch32_224"))
    paper = dataclasses.replace(b32, training=TrainingSection(batch_size=128, devices_per_round=10))
    quick_fl = dataclasses.replace(quick, training=TrainingSection(mode="fl"))

    # Execute
    budgets = {name: chunk_budget(config) for name, config in
               (("quick", quick), ("b32", b32), ("paper", paper), ("quick_fl", quick_fl))}

    # Verify: the quickstart's largest upload is a step's activations (32 x 16 x 64 bytes at 8 bits,
    # a range per token, the labels); ViT-B/32's is its RoundUpdate, 768 x 3 x 32 x 32 + 768 floats;
    # FL sends the whole model (105,482 parameters for the quickstart)
    device_weights = (768 * 3 * 32 * 32 + 768) * 4
    assert budgets["quick"].frame_bytes == 32 * 16 * 64 + 32 * 16 * 8 + 32 * 8 + FRAME_OVERHEAD_BYTES
    assert budgets["b32"].frame_bytes == budgets["paper"].frame_bytes == device_weights + FRAME_OVERHEAD_BYTES
    assert budgets["quick_fl"].frame_bytes == 105_482 * 4 + FRAME_OVERHEAD_BYTES
    for name, devices in (("quick", 5), ("b32", 5), ("paper", 10), ("quick_fl", 5)):
        budget = budgets[name]
        assert budget.per_device_bytes == 4 * budget.frame_bytes + DEVICE_MARGIN_BYTES, name
        assert budget.total_bytes == devices * budget.per_device_bytes <= DEFAULT_REASSEMBLY_BYTES, name
    assert 186 * MIB < budgets["b32"].total_bytes < 187 * MIB and budgets["quick"].total_bytes < 7 * MIB


def test_a_server_budget_never_exceeds_the_protocol_default() -> None:
    from server_runtime.budgets import chunk_budget
    from server_runtime.config import ModelSection, RunConfig, TrainingSection

    # Setup: ViT-S/32 in FL mode: 87 MiB uploads, 4 sets of them, 50 devices a round
    config = RunConfig(model=ModelSection(preset="vit_small_patch32_224"),
                       training=TrainingSection(mode="fl", devices_per_round=50))

    # Execute
    budget = chunk_budget(config)

    # Verify: both capped at 512 MiB, one upload still fits per device
    assert 87 * MIB < budget.frame_bytes < budget.per_device_bytes < budget.total_bytes == DEFAULT_REASSEMBLY_BYTES


def test_the_sized_frames_bound_the_real_encoded_uploads_of_the_quickstart() -> None:
    import torch

    from allocator.scenario import ModelShape
    from server_runtime.budgets import activations_frame_bytes, update_frame_bytes
    from server_runtime.presets import get_preset
    from server_runtime.vit import VisionTransformer

    # Setup: a step's activations at 8 bits with a range per token, and an FL device's whole model
    preset = get_preset("vit_quick_patch4_16")
    shape = ModelShape.from_preset(preset)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, preset.num_patches, preset.embed_dim), dtype=np.float32)
    step = p.Activations(p.Envelope(RUN, 3, "dev-0", 7), quantize(x, 8, per="token"), p.Tensor.from_numpy(
        np.zeros(32, np.int64)))
    torch.manual_seed(0)
    whole = {k: v.numpy() for k, v in VisionTransformer(preset).state_dict().items()}
    update = dataclasses.replace(round_update(preset.name, "dev-0", 0), weights=p.weights_from_numpy(whole))

    # Execute
    sizes = {"activations": len(p.encode(step)), "fl_update": len(p.encode(update))}

    # Verify: each within its bound, and the bound mostly the data (64 KiB of it is overhead)
    assert sum(v.size for v in whole.values()) == 105_482
    assert 0 < activations_frame_bytes(shape, 32, 8) - sizes["activations"] < 64 * 1024
    assert 0 < update_frame_bytes(shape, "fl") - sizes["fl_update"] < 64 * 1024
