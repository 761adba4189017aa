"""The server daemon against a real mosquitto and real device processes.

Equivalence: one round, one device, fp32, SFL-V2 over the broker gives the weights centralized
training of the unsplit model gives on the same batches with the same optimizer. Integration:
a server process and three device processes train digits for three rounds. Resume: the server
is SIGKILLed mid-run and restarted with ``--resume``; every round is counted exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.data import Preprocess, load_data
from server_runtime.checkpoint import create_model
from server_runtime.config import config_toml, parse_config
from server_runtime.data import write_digits_shards
from server_runtime.metrics import read_round_records
from server_runtime.round_record import RoundRecord
from server_runtime.run_state import load_run_state

ROOT = Path(__file__).resolve().parents[1]
PRESET = "vit_quick_patch4_16"
pytestmark = pytest.mark.broker


def write_shards(tmp_path: Path, devices: int, per_device: int, seed: int = 0) -> list[Path]:
    """Disjoint random digits training shards as the npz files ``sflam device --data`` reads."""
    return write_digits_shards(tmp_path, devices, per_device, seed)


def config_text(broker_url: str, ckpt: Path, **overrides: object) -> str:
    """A run.toml for the quick preset on digits; ``section__key=value`` overrides."""
    sections: dict[str, dict[str, object]] = {
        "model": {"preset": PRESET},
        "data": {"eval": "digits", "eval_batch_size": 512},
        "training": {"rounds": 3, "devices_per_round": 3, "local_epochs": 1, "batch_size": 16, "mode": "v1",
                     "lr": 0.05, "momentum": 0.9},
        "quant": {"bits": 8, "gradient_bits": 32},
        "round": {"deadline_s": 60.0, "min_completed": 0.5, "wait_for_devices_s": 60.0},
        "broker": {"url": broker_url, "run_id": "srv"},
        "security": {},
        "checkpoint": {"dir": str(ckpt)},
        "metrics": {"progress": True},
        "compute": {"device": "cpu", "amp": "off", "workers": 3},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        sections[section][name] = value
    return config_toml(sections, seed=0)


def start_device(bundle: Path, broker_url: str, device_id: str, data: Path, seed: int,
                 rounds: int | None = None, run_id: str = "srv", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sflam", "device", "--bundle", str(bundle), "--broker", broker_url,
           "--device-id", device_id, "--data", f"npz:{data}", "--backend", "numpy", "--run-id", run_id,
           "--seed", str(seed), "--meter", "estimate", *extra]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_server(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "sflam", "server", "--config", str(config), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 0.0), (0.5, 1e-4)])
def test_split_round_equals_centralized_training(quick_bundle: Path, broker, tmp_path: Path, momentum: float,
                                                 weight_decay: float) -> None:
    from server_runtime.daemon import ServerDaemon

    # Prepare: one device, fp32 both ways, SFL-V2, SGD with this momentum and weight decay on
    # both sides (the plan carries them to the device)
    (data,) = write_shards(tmp_path, 1, 40)
    lr, batch, seed = 0.05, 8, 11
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=1,
                                   training__mode="v2", training__batch_size=batch, training__lr=lr,
                                   training__momentum=momentum, training__weight_decay=weight_decay,
                                   quant__bits=32, quant__gradient_bits=32, metrics__prometheus_port=free_port()))
    scraped: list[str] = []

    def scrape(record: RoundRecord) -> None:  # the daemon's Prometheus endpoint, read while the run is live
        url = f"http://127.0.0.1:{cfg.metrics.prometheus_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            scraped.append(response.read().decode())

    daemon = ServerDaemon(cfg, on_round=scrape)
    start = daemon.trainer.state_dict()
    # Execute: the round over the broker
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    device = start_device(quick_bundle, broker.url, "dev-0", data, seed, rounds=1)
    out, err = device.communicate(timeout=120)
    runner.join(60)
    assert device.returncode == 0, err[-3000:]
    assert not runner.is_alive()
    split_state = daemon.trainer.state_dict()
    # ... and centrally, on the device's batches (its documented shuffle seeding, plan round 1)
    model = create_model(PRESET, num_classes=10)
    model.load_state_dict(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    spec = Preprocess(model.config.img_size, model.config.mean, model.config.std)
    device_data = load_data(f"npz:{data}", spec)
    for images, labels in device_data.batches(batch, np.random.default_rng((seed, 1, 0, 0))):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Assert: every tensor, device part and server part, agrees to 1e-5
    central = model.state_dict()
    assert set(central) == set(split_state)
    moved = 0.0
    for name, value in central.items():
        np.testing.assert_allclose(split_state[name].numpy(), value.detach().numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-3  # training really changed the weights
    lines = scraped[0].splitlines()
    assert "sflam_round 1.0" in lines and 'sflam_rounds_total{counted="true"} 1.0' in lines
    assert any(line.startswith('sflam_bytes_up_total{device="dev-0"}') for line in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def issued_plan_round(ckpt: Path) -> int:
    """The last plan round the server leased (``issued.json``), 0 before the first."""
    try:
        return json.loads((ckpt / "issued.json").read_text())["plan_round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def counted_rounds(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [r.round for r in read_round_records(path) if r.counted]


def test_server_and_three_devices_train_digits(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare
    shards = write_shards(tmp_path, 3, 320)
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.toml"
    # Adam on the server side: a ViT from scratch barely leaves chance level in 3 rounds of SGD
    config.write_text(config_text(broker.url, ckpt, training__local_epochs=2, training__optimizer="adam",
                                  training__lr=0.002))
    # Execute
    server = start_server(config)
    devices = [start_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i, rounds=3)
               for i, shard in enumerate(shards)]
    try:
        out, err = server.communicate(timeout=240)
    finally:
        stop(devices)
    # Assert
    assert server.returncode == 0, err[-3000:]
    records = read_round_records(ckpt / "metrics.jsonl")
    assert [r.round for r in records] == [1, 2, 3] and all(r.counted for r in records)
    accuracy = [r.accuracy for r in records]
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy
    for record in records:
        assert record.completed == ("dev-0", "dev-1", "dev-2") and record.failed == {}
        for stats in record.devices.values():
            assert stats.bytes_up > 0 and stats.bytes_down > 0 and stats.steps == 2 * 20
            assert stats.energy_j > 0 and stats.allocation.bits_up == 8
    assert "round   3/3" in out or "round 3/3" in out
    summary = json.loads(next(l for l in out.splitlines() if l.startswith("sflam-server-summary ")).split(" ", 1)[1])
    assert summary["rounds"] == 3


def test_resume_restores_the_checkpointed_model_and_training_continues_from_it(quick_bundle: Path, broker,
                                                                                tmp_path: Path) -> None:
    from edge_runtime.quantize import quantize
    from server_runtime.daemon import ServerDaemon

    # Prepare: two rounds of SFL-V2 (its shared optimizer is checkpointed too) with a real device
    (shard,) = write_shards(tmp_path, 1, 48)
    ckpt = tmp_path / "ckpt"

    def config(rounds: int, directory: Path = ckpt):
        return parse_config(config_text(broker.url, directory, training__rounds=rounds, training__devices_per_round=1,
                                        training__mode="v2"))

    first = ServerDaemon(config(2))
    fresh = first.trainer.state_dict()
    runner = threading.Thread(target=first.run, daemon=True)
    runner.start()
    device = start_device(quick_bundle, broker.url, "dev-0", shard, seed=3, rounds=2)
    _, err = device.communicate(timeout=180)
    runner.join(60)
    assert device.returncode == 0 and not runner.is_alive(), err[-3000:]
    trained = first.trainer.state_dict()
    assert max(float((trained[k] - fresh[k]).abs().max()) for k in trained) > 1e-3  # the rounds moved it
    # Execute: a third round's daemon resumes from the checkpoint directory
    resumed = ServerDaemon(config(3), resume=True)
    # Assert: the model and the optimizer are the uninterrupted run's, bit for bit
    assert (resumed.round, resumed.plan_round) == (2, 2)
    restored = resumed.trainer.state_dict()
    assert set(restored) == set(trained)
    for name, value in trained.items():
        assert torch.equal(restored[name], value), name
    saved, loaded = first.trainer.optimizer_state(), resumed.trainer.optimizer_state()
    assert saved["state"] and loaded["param_groups"] == saved["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(loaded["state"][index][key]), torch.as_tensor(value)), (index, key)
    # Assert: a step after the resume is the step the uninterrupted run takes (loss and gradient),
    # and not the step a fresh model takes: the loss curve goes on instead of restarting
    rng = np.random.default_rng(5)
    tokens = quantize(rng.standard_normal((8, *first.trainer.tokens_shape)).astype(np.float32), 32)
    labels = rng.integers(0, 10, 8)
    outcomes = []
    for trainer in (first.trainer, resumed.trainer, ServerDaemon(config(3, tmp_path / "fresh")).trainer):
        trainer.begin_round(["dev-0"])
        outcomes.append([trainer.step("dev-0", tokens, labels, 32) for _ in range(2)])
    going_on, after_resume, restarted = outcomes
    assert [r.loss for r in after_resume] == [r.loss for r in going_on]
    assert all(a.gradient == b.gradient for a, b in zip(after_resume, going_on))
    assert after_resume[0].loss != restarted[0].loss


def test_sigkill_and_resume_counts_every_round_once(quick_bundle: Path, fleet, tmp_path: Path) -> None:
    # Prepare: devices that serve forever; a 4-round run; the provisioned TLS broker
    shards = write_shards(tmp_path, 2, 96)
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.toml"
    login = fleet.server_overrides()  # log in, and sign
    config.write_text(config_text(fleet.url, ckpt, training__rounds=4, training__devices_per_round=2,
                                  training__local_epochs=2, **login))
    metrics = ckpt / "metrics.jsonl"
    devices = [start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, extra=fleet.device_args(f"dev-{i}"))
               for i, shard in enumerate(shards)]
    try:
        # Execute: kill the server once round 2 is in the log and round 3 is under way
        server = start_server(config)
        wait_for(lambda: len(counted_rounds(metrics)) >= 2, 180, "two rounds")
        wait_for(lambda: issued_plan_round(ckpt) >= 3, 60, "round 3's plan")  # the lease precedes the plan
        server.send_signal(signal.SIGKILL)
        server.communicate(timeout=30)
        killed_after = counted_rounds(metrics)
        issued = issued_plan_round(ckpt)
        resumed = start_server(config, "--resume")
        out, err = resumed.communicate(timeout=240)
    finally:
        stop(devices)
    # Assert
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming after round" in out
    assert killed_after[-1] < 4
    records = read_round_records(metrics)
    assert counted_rounds(metrics) == [1, 2, 3, 4]
    plan_rounds = [r.plan_round for r in records]
    assert plan_rounds == sorted(set(plan_rounds))  # no attempt logged twice
    assert all(r.plan_round > issued for r in records[len(killed_after):])  # none reused after the kill
    state = load_run_state(ckpt)
    assert state is not None and state.round == 4
