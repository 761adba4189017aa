"""The federated-learning baseline: the trainer's ``fl`` mode and ``sflam fl-device`` in a simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server_runtime.config import parse_config
from server_runtime.run_state import load_run_state
from server_runtime.trainer import StepError
from test_trainer import batch, device_upload, make_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_fl_mode_averages_whole_models_by_samples_and_trains_nothing_itself() -> None:
    # Prepare: the "device part" is the whole model
    trainer = make_trainer("fl")
    whole = trainer.device_weights()
    assert "head.weight" in whole and "patch_embed.proj.weight" in whole and "blocks.0.attn.qkv.weight" in whole
    uploads = {d: device_upload(trainer, i) for i, d in enumerate(("a", "b"))}
    trainer.begin_round(("a", "b"))
    # Execute and assert: no activations in FL
    with pytest.raises(StepError, match="whole model"):
        trainer.step("a", *batch(trainer, 0), 32)
    trainer.finish_round({"a": (uploads["a"], 25), "b": (uploads["b"], 75)})
    state = trainer.device_weights()
    for key, value in state.items():
        expected = (25 * uploads["a"][key].astype(np.float64) + 75 * uploads["b"][key]) / 100.0
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(StepError, match="device weights must be"):  # a split device's upload is refused
        trainer.check_device_weights({k: v for k, v in whole.items() if k.startswith("patch_embed")})


def test_the_config_accepts_mode_fl() -> None:
    assert parse_config('[training]\nmode = "fl"\n').training.mode == "fl"
    with pytest.raises(ValueError, match="training.mode"):
        parse_config('[training]\nmode = "federated"\n')


@pytest.mark.broker
def test_a_tiny_fl_simulation_trains_whole_models_over_the_broker(tmp_path: Path) -> None:
    # Execute: 3 fl-device processes, 2 per round, 2 rounds; average pooling (timm's fc_norm layout),
    # which the devices read from the bundle's manifest to build the model the server sends them
    out = tmp_path / "fl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sflam", "simulate", "--scheme", "fl", "--devices", "3", "--per-round", "2",
         "--rounds", "2", "--local-epochs", "1", "--batch-size", "16", "--global-pool", "avg", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Assert
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert {k: manifest["config"][k] for k in ("global_pool", "class_token", "fc_norm")} == {
        "global_pool": "avg", "class_token": True, "fc_norm": True}
    assert "fc_norm.weight" in load_run_state(out / "server").model
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheme"] == "fl" and summary["rounds"] == 2
    from server_runtime.metrics import read_round_records

    records = read_round_records(out / "metrics.jsonl")
    assert [r.mode for r in records] == ["fl", "fl"] and all(r.counted for r in records)
    from server_runtime.checkpoint import create_model

    model_bytes = 4 * sum(t.numel() for t in create_model("vit_quick_patch4_16", num_classes=10).parameters())
    for record in records:
        for figures in record.devices.values():
            assert figures.bytes_up > model_bytes  # the whole model went up
            assert figures.steps == 0  # no activation steps served: the devices trained alone
            assert figures.compute_time_s > 0 and figures.energy_j > 0
