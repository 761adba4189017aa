"""The FL baseline through the split daemon: ``training.mode = "fl"`` and ``sflam fl-device``.

Unit: the trainer averages whole-model uploads by sample count and serves no activations; the
config and the CLI know the mode and the command. Integration: a ``sflam server`` process in
mode fl and two ``sflam fl-device`` processes over mosquitto; a third client listens on the
wire, so the test checks the round's global model against what the devices actually uploaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime import protocol as p
from edge_runtime.data import Preprocess, preprocess
from edge_runtime.mqtt import LinkConfig, MqttLink
from server_runtime.checkpoint import create_model
from server_runtime.config import ConfigError, parse_config
from server_runtime.data import load_dataset
from server_runtime.metrics import read_round_records
from server_runtime.run_state import load_run_state
from server_runtime.trainer import StepError
from sflam.cli import build_parser
from test_server import PRESET, ROOT, config_text, start_server, stop, write_shards
from test_trainer import batch, device_upload, make_trainer

RUN_ID = "srv"  # config_text's broker.run_id


# ------------------------------------------------------------------------------------ unit


def test_fl_trainer_fedavgs_whole_models_by_samples_and_refuses_activations() -> None:
    # Prepare: the device part is the whole model, under the model's own state_dict names
    trainer = make_trainer("fl")
    whole = trainer.device_weights()
    assert set(whole) == set(trainer.model.state_dict())
    uploads = {"a": device_upload(trainer, 1), "b": device_upload(trainer, 2)}
    counts = {"a": 30, "b": 10}
    # Execute
    trainer.begin_round(("a", "b"))
    assert trainer.copies == {}  # no server compute in FL
    with pytest.raises(StepError, match="mode fl"):
        trainer.step("a", *batch(trainer, 0), 32)  # well-formed activations are still refused
    trainer.finish_round({d: (uploads[d], counts[d]) for d in uploads})
    # Assert: every tensor of the global model (what checkpoints save) is the weighted mean
    state = trainer.state_dict()
    for name, value in state.items():
        expected = (30 * uploads["a"][name].astype(np.float64) + 10 * uploads["b"][name]) / 40.0
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert not np.allclose(state["head.weight"].numpy(), whole["head.weight"])


def test_uploads_of_the_other_kind_are_refused() -> None:
    fl, v1 = make_trainer("fl"), make_trainer("v1")
    with pytest.raises(StepError, match="device weights must be"):  # a split device's patch embedding
        fl.check_device_weights(v1.device_weights())
    with pytest.raises(StepError, match="device weights must be"):  # a whole model sent to a split server
        v1.check_device_weights(fl.device_weights())
    bad = fl.device_weights()
    bad["head.weight"] = bad["head.weight"][:5]
    with pytest.raises(StepError, match="head.weight: shape"):
        fl.check_device_weights(bad)


def test_config_accepts_mode_fl_but_not_with_auto_bits() -> None:
    assert parse_config('[training]\nmode = "fl"\n[quant]\nbits = 32\n').training.mode == "fl"
    with pytest.raises(ConfigError, match="quant.bits: 'auto' allocates for split activations"):
        parse_config('[training]\nmode = "fl"\n[quant]\nbits = "auto"\n')


def test_fl_device_subcommand_takes_the_device_options() -> None:
    parser = build_parser()
    common = ["--bundle", "b", "--broker", "mqtt://127.0.0.1:1883", "--device-id", "d0", "--data", "npz:x.npz"]
    fl = parser.parse_args(["fl-device", *common, "--emulate-link", "--distance-m", "50"])
    split = parser.parse_args(["device", *common, "--emulate-link", "--distance-m", "50"])
    assert fl.handler == "sflam.fl_device:cmd_fl_device"
    assert {k: v for k, v in vars(fl).items() if k not in ("command", "handler")} == \
           {k: v for k, v in vars(split).items() if k not in ("command", "handler")}


# ----------------------------------------------------------------------------- integration


def start_fl_device(bundle: Path, broker_url: str, device_id: str, data: Path, seed: int,
                    rounds: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sflam", "fl-device", "--bundle", str(bundle), "--broker", broker_url,
           "--device-id", device_id, "--data", f"npz:{data}", "--run-id", RUN_ID, "--seed", str(seed),
           "--meter", "estimate", "--rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sniffed(link: MqttLink) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, dict[str, p.RoundUpdate]]]:
    """The model versions and the round updates (by plan round, then device) seen on the wire."""
    receiver = p.Receiver(RUN_ID)
    models: dict[int, dict[str, np.ndarray]] = {}
    updates: dict[int, dict[str, p.RoundUpdate]] = {}
    while (incoming := link.get(0.5)) is not None:
        message = receiver.accept(incoming.payload, incoming.topic)
        if isinstance(message, p.ModelWeights):
            models[message.version] = p.weights_to_numpy(message.weights)
        elif isinstance(message, p.RoundUpdate):
            updates.setdefault(message.envelope.round, {})[message.envelope.device_id] = message
    return models, updates


def weighted_mean(round_updates: dict[str, p.RoundUpdate]) -> dict[str, np.ndarray]:
    """FedAvg of the uploads, in float64."""
    total = sum(u.num_samples for u in round_updates.values())
    out: dict[str, np.ndarray] = {}
    for update in round_updates.values():
        for name, value in p.weights_to_numpy(update.weights).items():
            out[name] = out.get(name, 0.0) + value.astype(np.float64) * (update.num_samples / total)
    return out


@pytest.mark.broker
def test_server_in_fl_mode_averages_what_two_fl_devices_upload(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare: shards of unequal size, so that the weighting shows; a listener on the wire
    shards = write_shards(tmp_path, 2, 64)
    small = tmp_path / "dev-1-small.npz"
    with np.load(shards[1]) as data:
        np.savez(small, images=data["images"][:32], labels=data["labels"][:32])
    ckpt, config = tmp_path / "ckpt", tmp_path / "run.toml"
    config.write_text(config_text(broker.url, ckpt, training__rounds=2, training__devices_per_round=2,
                                  training__mode="fl", training__batch_size=16, training__lr=0.05,
                                  quant__bits=32))
    topics = p.Topics(RUN_ID)
    listener = MqttLink(broker.url, LinkConfig(client_id="fl-test-listener", max_frame_bytes=1 << 22))
    listener.subscribe([topics.retained_filter("model"), topics.all_devices("up")])
    listener.start(timeout_s=10)
    # Execute
    server = start_server(config)
    devices = [start_fl_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i, rounds=2)
               for i, shard in enumerate((shards[0], small))]
    try:
        out, err = server.communicate(timeout=180)
        device_out = [d.communicate(timeout=60) for d in devices]
    finally:
        stop([proc for proc in (server, *devices) if proc.poll() is None])
        models, updates = sniffed(listener)
        listener.close()
    # Assert: both kinds of process ended cleanly, two counted rounds
    assert server.returncode == 0, err[-3000:]
    assert "FL (FedAvg baseline)" in out
    for proc, (_, device_err) in zip(devices, device_out):
        assert proc.returncode == 0, device_err[-3000:]
    records = read_round_records(ckpt / "metrics.jsonl")
    assert [r.round for r in records] == [1, 2] and all(r.counted for r in records)
    assert [r.mode for r in records] == ["fl", "fl"]
    model_bytes = 4 * sum(t.numel() for t in create_model(PRESET, num_classes=10).state_dict().values())
    for record in records:
        assert record.completed == ("dev-0", "dev-1") and record.failed == {}, (record.selected, record.failed)
        for figures in record.devices.values():
            assert figures.bytes_up >= model_bytes and figures.steps == 0
            assert figures.compute_time_s > 0 and figures.energy_j > 0
    # Assert: the devices trained (their uploads differ from the model they were sent) with their
    # sample counts, and the next model version is the sample-weighted mean of their uploads
    first, second = (records[0].plan_round, records[1].plan_round)
    assert {d: u.num_samples for d, u in updates[first].items()} == {"dev-0": 64, "dev-1": 32}
    start = models[first]
    for update in updates[first].values():
        uploaded = p.weights_to_numpy(update.weights)
        assert set(uploaded) == set(start)
        assert not np.allclose(uploaded["head.weight"], start["head.weight"])
        assert update.telemetry.steps == -(-update.num_samples // 16)  # 1 epoch of batches of 16
    expected = weighted_mean(updates[first])
    for name, value in models[second].items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    final = load_run_state(ckpt)
    assert final is not None and final.round == 2
    expected = weighted_mean(updates[second])
    for name, value in final.model.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # Assert: the accuracy logged for round 2 is the final averaged model's on the held-out digits
    assert records[-1].accuracy == pytest.approx(held_out_accuracy(final.model), abs=1e-9)


def held_out_accuracy(state: dict[str, torch.Tensor]) -> float:
    """Accuracy of a global model on the digits test split, computed here, not by the server."""
    model = create_model(PRESET, num_classes=10)
    model.load_state_dict(state)
    model.eval()
    test = load_dataset("digits", seed=0).test
    spec = Preprocess(model.config.img_size, tuple(model.config.mean), tuple(model.config.std))
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(test.images, spec)))
    return float((logits.argmax(dim=1).numpy() == test.labels).mean())
