"""Run checkpoints: exact round trips, bit-identical optimizer continuation, pruning, crashes."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from server_runtime.run_state import (
    RunState,
    RunStateError,
    capture_rng,
    load_run_state,
    restore_rng,
    save_run_state,
)
from test_metrics import typed_record


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))


def _state(round_: int = 1, plan_round: int = 1) -> RunState:
    model = _model()
    return RunState(
        round=round_,
        plan_round=plan_round,
        model={k: v.clone() for k, v in model.state_dict().items()},
        record=_record_before_checkpoint(round_, plan_round),
        config={"mode": "v2", "rounds": 10},
        extra={"devices": ["dev-1", "dev-2"]},
    )


def _record_before_checkpoint(round_: int, plan_round: int):
    """A round record as the daemon saves it: its checkpoint time is not known yet."""
    record = typed_record(round_, plan_round=plan_round, accuracy=0.5, failed={"dev-3": "deadline"})
    return dataclasses.replace(record, phases_s=dataclasses.replace(record.phases_s, checkpoint=None))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_empty_or_missing_directory_has_no_state(tmp_path: Path) -> None:
    assert load_run_state(tmp_path) is None
    assert load_run_state(tmp_path / "absent") is None


def test_model_record_config_extra_round_trip(tmp_path: Path) -> None:
    state = _state(round_=4, plan_round=6)
    state.model["int_buffer"] = torch.arange(5, dtype=torch.int64)
    state.model["half"] = torch.randn(3, 2).to(torch.bfloat16)
    state.model["tied"] = state.model["0.weight"]  # shared memory, which safetensors refuses as is

    path = save_run_state(tmp_path / "ckpt", state)
    loaded = load_run_state(tmp_path / "ckpt")

    assert path == tmp_path / "ckpt" / "state.json"
    assert loaded is not None
    assert (loaded.round, loaded.plan_round) == (4, 6)
    assert list(loaded.model) == list(state.model)
    for key, value in state.model.items():
        assert loaded.model[key].dtype == value.dtype
        assert torch.equal(loaded.model[key], value)
    assert (loaded.record, loaded.config, loaded.extra) == (state.record, state.config, state.extra)
    assert loaded.optimizer is None


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.8, 0.95)),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_optimizer_continues_bit_identically(tmp_path: Path, make_opt) -> None:
    model = _model(seed=1)
    opt = make_opt(model.parameters())
    for seed in range(3):
        _step(model, opt, seed)
    save_run_state(tmp_path, RunState(round=3, plan_round=3, model=model.state_dict(), optimizer=opt.state_dict()))

    loaded = load_run_state(tmp_path)
    fresh = _model(seed=2)
    fresh.load_state_dict(loaded.model)
    fresh_opt = make_opt(fresh.parameters())
    fresh_opt.load_state_dict(loaded.optimizer)
    for seed in (3, 4):
        _step(model, opt, seed)
        _step(fresh, fresh_opt, seed)

    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    if isinstance(opt, torch.optim.Adam):
        assert loaded.optimizer["state"][0]["step"].dtype == torch.float32
        assert loaded.optimizer["param_groups"][0]["betas"] == (0.8, 0.95)


def test_rng_capture_restore_repeats_draws(tmp_path: Path) -> None:
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_run_state(tmp_path, RunState(round=1, plan_round=1, model={}, rng=capture_rng()))
    first = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())

    restore_rng(load_run_state(tmp_path).rng)
    second = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())

    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_restore_rng_rejects_unknown_parts() -> None:
    with pytest.raises(ValueError, match="unknown RNG"):
        restore_rng({"jax": 1})


def test_keep_prunes_older_tensor_files(tmp_path: Path) -> None:
    for round_ in range(1, 5):
        save_run_state(tmp_path, _state(round_, round_ + 1), keep=2)

    files = sorted(p.name for p in tmp_path.glob("round-*.safetensors"))

    assert files == ["round-000003-000004.safetensors", "round-000004-000005.safetensors"]
    assert load_run_state(tmp_path).round == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupted_tensor_file_fails_sha256(tmp_path: Path) -> None:
    save_run_state(tmp_path, _state(2, 2))
    tensor_file = tmp_path / "round-000002-000002.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))

    with pytest.raises(RunStateError, match="sha256") as info:
        load_run_state(tmp_path)
    assert "round-000002-000002.safetensors" in str(info.value)


def test_truncated_state_json_is_an_error(tmp_path: Path) -> None:
    state_path = save_run_state(tmp_path, _state(2, 2))
    state_path.write_text(state_path.read_text()[:40])

    with pytest.raises(RunStateError, match="state.json"):
        load_run_state(tmp_path)


def test_wrong_format_version_is_an_error(tmp_path: Path) -> None:
    state_path = save_run_state(tmp_path, _state(2, 2))
    meta = json.loads(state_path.read_text())
    meta["format_version"] = 99
    state_path.write_text(json.dumps(meta))

    with pytest.raises(RunStateError, match="format_version"):
        load_run_state(tmp_path)


def test_crash_before_commit_loads_last_committed_round(tmp_path: Path) -> None:
    save_run_state(tmp_path, _state(3, 4))
    (tmp_path / "state.json.abc123.tmp").write_text('{"round": 4')  # torn commit
    newer = tmp_path / "round-000004-000005.safetensors"  # tensors written, state.json never was
    newer.write_bytes((tmp_path / "round-000003-000004.safetensors").read_bytes())

    loaded = load_run_state(tmp_path)

    assert (loaded.round, loaded.plan_round) == (3, 4)
    assert not list(tmp_path.glob("*.tmp"))
    assert not newer.exists()


def test_record_saved_without_its_checkpoint_time_and_read_through_the_type(tmp_path: Path) -> None:
    state_path = save_run_state(tmp_path, _state(2, 3))

    saved = json.loads(state_path.read_text())["record"]

    assert "checkpoint" not in saved["phases_s"] and saved["plan_round"] == 3
    assert load_run_state(tmp_path).record.failed == {"dev-3": "deadline"}


def test_record_with_an_undeclared_key_is_an_error(tmp_path: Path) -> None:
    state_path = save_run_state(tmp_path, _state(2, 2))
    meta = json.loads(state_path.read_text())
    meta["record"]["devices"]["dev-a"]["allocation"]["bitz_up"] = 8
    state_path.write_text(json.dumps(meta))

    with pytest.raises(RunStateError, match="devices.dev-a.allocation.bitz_up"):
        load_run_state(tmp_path)


def test_non_json_config_is_rejected(tmp_path: Path) -> None:
    state = _state()
    state.config = {"path": Path("/x")}

    with pytest.raises(ValueError, match="config"):
        save_run_state(tmp_path, state)
    assert not (tmp_path / "state.json").exists()
