"""Trainer ranks (torch.distributed, gloo) against a real mosquitto and real device processes.

Equivalence: two ranks train four devices for two rounds (V1, fp32 both ways) to the model one
rank trains on the same schedule, every tensor within 1e-5. Failures: a rank SIGKILLed mid-round
fails its own devices with a reason, the round completes with the other rank's devices, and the
next round runs on the survivor; rank 0 killed stops the other rank with a clear error, and
``--resume`` on both ranks continues the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
from test_server import ROOT, config_text, start_device, stop, wait_for, write_shards

from server_runtime.checkpoint import create_model
from server_runtime.config import parse_config
from server_runtime.metrics import read_round_records
from server_runtime.presets import TOKEN_LAYOUT
from server_runtime.rank_worker import rank_model
from server_runtime.ranks import RankError, RankLaunch, assign_ranks, config_digest, free_port, tensor_shapes
from server_runtime.run_state import load_run_state

pytestmark = pytest.mark.broker


def ranks_config(tmp_path: Path, broker_url: str, name: str, trainers: int, **overrides: object) -> Path:
    settings = {"training__rounds": 2, "training__devices_per_round": 4, "training__batch_size": 8,
                "quant__bits": 32, "quant__gradient_bits": 32, "compute__workers": 2, "compute__trainers": trainers,
                "round__deadline_s": 90.0, "round__min_completed": 0.5, **overrides}
    path = tmp_path / f"{name}.toml"
    path.write_text(config_text(broker_url, tmp_path / name, **settings))
    return path


def start_rank(config: Path, rank: int, world: int, port: int, *extra: str) -> subprocess.Popen:
    """``sflam server`` as one rank of a manual (multi-machine style) launch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sflam", "server", "--config", str(config), *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_fleet(bundle: Path, broker_url: str, config: Path, shards: list[Path], rounds: int) -> dict:
    """A server (``compute.trainers`` ranks, launched by itself) and its devices, to the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "sflam", "server", "--config", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    devices = [start_device(bundle, broker_url, f"dev-{i}", shard, seed=i, rounds=rounds)
               for i, shard in enumerate(shards)]
    try:
        out, _ = server.communicate(timeout=240)
    finally:
        stop([server, *devices])
    assert server.returncode == 0, out[-4000:]
    cfg = parse_config(config.read_text())
    return {"state": load_run_state(cfg.checkpoint_dir).model, "records": read_round_records(cfg.metrics_path),
            "log": out}


def test_two_gloo_ranks_train_what_one_rank_trains(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare: four devices, two rounds, fp32 both ways, the same seeds; once with 1 rank, once with 2
    shards = write_shards(tmp_path, 4, 24)
    one = run_fleet(quick_bundle, broker.url, ranks_config(tmp_path, broker.url, "one", 1), shards, 2)
    two = run_fleet(quick_bundle, broker.url, ranks_config(tmp_path, broker.url, "two", 2), shards, 2)
    # Assert: both counted both rounds with every device, the ranks shared the devices two and two
    for run in (one, two):
        assert [r.counted for r in run["records"]] == [True, True]
        assert all(r.completed == ("dev-0", "dev-1", "dev-2", "dev-3") for r in run["records"])
    for record in two["records"]:
        ranks = sorted(d.trainer_rank for d in record.devices.values())
        assert ranks == [0, 0, 1, 1], ranks
        assert all(d.steps == 3 and d.server_time_s > 0 for d in record.devices.values())
    assert "2 trainer ranks" in two["log"]
    # ... every tensor of the final model within 1e-5, and training moved it
    start = load_run_state(tmp_path / "one").model  # same file: compare the two runs' final models
    assert set(one["state"]) == set(two["state"]) == set(start)
    for name, value in one["state"].items():
        np.testing.assert_allclose(two["state"][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    assert one["records"][-1].train_loss == pytest.approx(two["records"][-1].train_loss, rel=1e-5)


def _lines_into(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    thread.start()
    return thread


def test_a_rank_killed_mid_round_fails_only_its_devices(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare: two ranks launched by hand (RANK, WORLD_SIZE, MASTER_*), four devices, three rounds
    shards = write_shards(tmp_path, 4, 48)
    # 4 local epochs (24 steps a device): rank 1's round outlasts the test's reaction to its log line,
    # so the kill lands mid-round (with 6 steps it could finish first and nothing would fail)
    config = ranks_config(tmp_path, broker.url, "kill", 2, training__rounds=3, training__local_epochs=4,
                          compute__rank_timeout_s=2.0)
    port = free_port()
    rank0, rank1 = start_rank(config, 0, 2, port), start_rank(config, 1, 2, port)
    out0, out1 = [], []
    readers = [_lines_into(rank0, out0), _lines_into(rank1, out1)]
    devices = [start_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i, rounds=3)
               for i, shard in enumerate(shards)]
    try:
        # Execute: SIGKILL rank 1 once it trains its devices of round 2
        wait_for(lambda: any("round 2 (plan round 2): rank 1 trains" in line for line in out1), 180,
                   "rank 1 to train in round 2")
        rank1.send_signal(signal.SIGKILL)
        rank0.wait(timeout=240)
    finally:
        stop([rank0, rank1, *devices])
        for reader in readers:
            reader.join(5)
    assert rank0.returncode == 0, "".join(out0)[-4000:]
    # Assert: round 2 counted with rank 0's devices; rank 1's failed with the reason; round 3 on rank 0 only
    records = read_round_records(tmp_path / "kill" / "metrics.jsonl")
    assert [r.round for r in records if r.counted] == [1, 2, 3]
    second = next(r for r in records if r.round == 2)
    lost = {d for d, rec in second.devices.items() if rec.trainer_rank == 1}
    assert len(lost) == 2 and set(second.failed) == lost
    assert all(second.failed[d] == "trainer rank 1 lost" for d in lost)
    assert set(second.completed) == set(second.devices) - lost
    third = records[-1]
    assert third.completed == ("dev-0", "dev-1", "dev-2", "dev-3")
    assert {d.trainer_rank for d in third.devices.values()} == {0}
    assert any("trainer rank 1 lost" in line for line in out0)


def test_rank_0_killed_stops_the_other_rank_and_resume_continues(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare: two ranks by hand and two devices; kill rank 0 after round 1 was checkpointed
    shards = write_shards(tmp_path, 2, 16)
    # (a device caught mid-round by the kill re-announces itself once its round deadline passed)
    config = ranks_config(tmp_path, broker.url, "coord", 2, training__rounds=3, training__devices_per_round=2,
                          round__deadline_s=20.0, round__wait_for_devices_s=120.0)
    port = free_port()
    rank0, rank1 = start_rank(config, 0, 2, port), start_rank(config, 1, 2, port)
    devices = [start_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i) for i, shard in enumerate(shards)]
    try:
        wait_for(lambda: len(read_round_records(tmp_path / "coord" / "metrics.jsonl")) >= 1
                   if (tmp_path / "coord" / "metrics.jsonl").exists() else False, 180, "round 1")
        rank0.send_signal(signal.SIGKILL)
        out1, _ = rank1.communicate(timeout=60)
        # Assert: rank 1 stops with a clear error
        assert rank1.returncode == 2, out1[-3000:]
        assert "rank 0 (the coordinator) is gone" in out1 and "--resume" in out1
        # Execute: both ranks again with --resume; the run finishes its three rounds
        port = free_port()
        rank0, rank1 = start_rank(config, 0, 2, port, "--resume"), start_rank(config, 1, 2, port, "--resume")
        out0, _ = rank0.communicate(timeout=240)
        assert rank0.returncode == 0, out0[-4000:]
        rank1.communicate(timeout=30)
        assert rank1.returncode == 0
    finally:
        stop([rank0, rank1, *devices])
    counted = [r.round for r in read_round_records(tmp_path / "coord" / "metrics.jsonl") if r.counted]
    assert sorted(set(counted)) == [1, 2, 3] and counted[-1] == 3


# -- units -----------------------------------------------------------------------------------------


def test_devices_are_balanced_over_ranks_by_predicted_load() -> None:
    loads = {"a": 4.0, "b": 3.0, "c": 3.0, "d": 2.0, "e": 2.0}
    out = assign_ranks(loads, [0, 1])
    totals = [sum(loads[d] for d, r in out.items() if r == rank) for rank in (0, 1)]
    assert set(out) == set(loads) and sum(totals) == 14.0
    assert max(totals) - min(totals) <= max(loads.values())  # greedy largest-first: within one device's load
    assert assign_ranks({"a": 4.0, "b": 2.0, "c": 2.0}, [0, 1]) == {"a": 0, "b": 1, "c": 1}
    assert set(assign_ranks(loads, [1]).values()) == {1}  # only the survivor
    assert assign_ranks({"a": 1.0, "b": 1.0}, [0, 1]) == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="no trainer rank"):
        assign_ranks(loads, [])


def test_launch_variables_are_read_the_torchrun_way_and_bad_ones_listed() -> None:
    assert RankLaunch.from_env({}) is None
    launch = RankLaunch.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                                  "LOCAL_RANK": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert launch == RankLaunch(1, 2, "10.0.0.1", 29500, 1, True)
    with pytest.raises(RankError) as err:
        RankLaunch.from_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_PORT": ""})
    assert "RANK must be" in str(err.value) and "MASTER_PORT" in str(err.value) and "MASTER_ADDR" in str(err.value)
    with pytest.raises(RankError, match="not below WORLD_SIZE"):
        RankLaunch.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_ranks_with_another_configuration_are_told_apart() -> None:
    base = parse_config("[compute]\ntrainers = 2\n").to_dict()
    other = parse_config("[compute]\ntrainers = 2\n[training]\nlr = 0.5\n").to_dict()
    elsewhere = parse_config("[compute]\ntrainers = 2\n[broker]\nurl = \"mqtt://10.0.0.2:1883\"\n").to_dict()
    assert config_digest(base) != config_digest(other)
    assert config_digest(base) == config_digest(elsewhere)  # each machine may reach the broker its own way


def test_a_rank_whose_model_differs_from_rank_0s_stops_at_once_naming_the_tensors() -> None:
    # Prepare: rank 0's start message for an average-pooled model (fc_norm instead of norm)
    config = parse_config("[compute]\ntrainers = 2\n")
    rank0 = create_model(config.model.preset, num_classes=10, layout={"global_pool": "avg"})
    start = {"num_classes": 10, "layout": rank0.config.layout, "shapes": tensor_shapes(rank0)}
    # Execute / Assert: the layout it was sent builds rank 0's model
    assert tensor_shapes(rank_model(config, start)) == start["shapes"]
    # ... a rank that builds another model (an sflam before layouts) names the tensors that differ
    with pytest.raises(RankError, match=r"differs from rank 0's in fc_norm\.bias, fc_norm\.weight, norm\.bias, norm\.weight"):
        rank_model(config, {**start, "layout": TOKEN_LAYOUT})
    with pytest.raises(RankError, match="cannot build rank 0's model: .*needs class_token"):
        rank_model(config, {**start, "layout": {"global_pool": "token", "class_token": False}})


def test_simulate_with_two_trainer_ranks_runs_end_to_end(tmp_path: Path) -> None:
    from test_checkpoint_layouts import timm_state
    from test_simulate import TINY, _children_of, _learning_args

    # Prepare: a headless backbone without a class token (average pooling, fc_norm), which only
    # rank 0 reads: the other rank builds that layout from rank 0's start message
    backbone = tmp_path / "backbone.safetensors"
    save_file(timm_state(classes=0, class_token=False, fc_norm=True), str(backbone))
    # Execute: the tiny simulation from it, every device selected, served by two trainer ranks
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "sflam", "simulate", *TINY, "--per-round", "4", "--bits", "8",
                           "--trainers", "2", "--checkpoint", str(backbone), "--out", str(out),
                           *_learning_args(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Assert: it completed, the summary says two trainers, both ranks served devices every round
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = load_run_state(out / "server")
    assert state.extra["layout"] == {"global_pool": "avg", "class_token": False, "fc_norm": True}
    assert "cls_token" not in state.model and state.model["head.weight"].shape == (10, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainers"] == 2 and summary["rounds"] == 2 and summary["status"] == "completed"
    records = read_round_records(out / "metrics.jsonl")
    assert all(sorted(d.trainer_rank for d in r.devices.values()) == [0, 0, 1, 1] for r in records)
    assert all(len(r.completed) == 4 for r in records)
    assert _children_of(out) == []  # broker, both ranks and the devices are gone
