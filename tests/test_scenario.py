"""Seeded allocation scenarios: reproducibility, channel statistics, hardware, JSON files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from allocator.baselines import fixed
from allocator.scenario import (
    MIN_DISTANCE_M,
    T_MAX_FACTOR,
    ScenarioError,
    dump_scenario,
    full_model_macs_per_sample,
    full_model_params,
    generate_scenario,
    infer_model,
    load_scenario,
    model_shape,
    path_gain_linear,
    place_devices,
)
from allocator.system import Problem
from firmware_profiles import load_profile
from server_runtime.presets import get_preset, preset_names


def assert_same_problem(a: Problem, b: Problem) -> None:
    assert a.params == b.params
    for field in dataclasses.fields(a.fleet):
        left, right = getattr(a.fleet, field.name), getattr(b.fleet, field.name)
        assert np.array_equal(left, right), field.name
    assert (a.subchannel_gain is None) == (b.subchannel_gain is None)
    if a.subchannel_gain is not None:
        assert np.array_equal(a.subchannel_gain, b.subchannel_gain)


def test_same_seed_same_scenario_other_seed_other() -> None:
    first, again, other = generate_scenario(20, 7), generate_scenario(20, 7), generate_scenario(20, 8)
    assert_same_problem(first, again)
    assert not np.array_equal(first.fleet.gain, other.fleet.gain)


def test_distances_fill_the_disc_and_fading_is_unit_exponential() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    # Execute
    distance_m, fading = place_devices(rng, 40_000, 500.0)
    # Assert: area-uniform radius (P(d <= R/2) = 1/4), |h|^2 ~ Exp(1) (mean 1, variance 1)
    assert distance_m.min() >= MIN_DISTANCE_M and distance_m.max() <= 500.0
    assert np.mean(distance_m <= 250.0) == pytest.approx((250**2 - 100) / (500**2 - 100), abs=0.01)
    assert np.mean(fading) == pytest.approx(1.0, abs=0.02)
    assert np.var(fading) == pytest.approx(1.0, abs=0.05)


def test_generated_gain_is_path_loss_times_fading() -> None:
    problem = generate_scenario(4000, 11)
    distance_m, _ = place_devices(np.random.default_rng(11), 4000, 500.0)  # the generator's first draws
    ratio = problem.fleet.gain / path_gain_linear(distance_m)
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.05)
    assert path_gain_linear(1000.0) == pytest.approx(10 ** -12.81)


def test_hardware_samples_and_profiles_come_from_the_firmware_profiles() -> None:
    problem = generate_scenario(6, 0, profiles=("raspberry-pi-5", "android-flagship"), local_epochs=2)
    fleet, pi = problem.fleet, load_profile("raspberry-pi-5")
    assert fleet.profiles == ("raspberry-pi-5", "android-flagship") * 3
    assert fleet.cycles_per_sample[0] == 3 * 49 * 768 * 3072 * pi.compute.cycles_per_mac
    assert (fleet.cpu_freq_hz[0], fleet.kappa[0]) == (pi.compute.cpu_freq_hz, 4 * pi.compute.effective_capacitance)
    assert fleet.max_tx_power_w[1] == load_profile("android-flagship").radio.max_tx_power_w
    assert np.all((fleet.samples >= 800) & (fleet.samples <= 1000) & (fleet.samples % 2 == 0))
    assert fleet.weight.sum() == pytest.approx(1.0)
    assert problem.params.elements_per_sample == 49 * 768
    assert problem.params.weight_bits == 32 * (768 * 3072 + 768)


def test_default_t_max_is_one_and_a_half_times_the_fixed_baseline() -> None:
    problem = generate_scenario(12, 5)
    baseline = fixed(problem).evaluation
    assert baseline.feasible
    assert problem.params.t_max_s == pytest.approx(T_MAX_FACTOR * baseline.round_latency_s, rel=1e-12)
    assert generate_scenario(12, 5, t_max_s=30.0).params.t_max_s == 30.0


def test_model_shapes_match_the_presets() -> None:
    for name in preset_names():
        shape, preset = model_shape(name), get_preset(name)
        assert shape.tokens == preset.num_patches, name
        assert shape.embed_dim == preset.embed_dim, name
        assert shape.patch_dim == preset.in_chans * preset.patch_size**2, name
        assert (shape.depth, shape.mlp_ratio, shape.num_classes) == (preset.depth, preset.mlp_ratio, preset.num_classes)
    base = model_shape("vit_base_patch32_224")
    assert full_model_params(base) == 88_224_232  # timm's vit_base_patch32_224
    assert full_model_macs_per_sample(base) == pytest.approx(4.41e9, rel=0.01)  # timm: 4.41 GMACs
    quick = model_shape("vit_quick_patch4_16")  # 16 tokens of 64, patches of 3 x 4 x 4, 3 blocks, MLP 2x
    assert (quick.tokens, quick.embed_dim, quick.patch_dim, quick.depth) == (16, 64, 48, 3)
    assert quick.device_macs_per_sample == 16 * 64 * 48


def test_every_preset_is_recognised_from_the_sizes_a_scenario_carries() -> None:
    for name in preset_names():
        params = generate_scenario(1, 0, model=name, t_max_s=10.0).params
        assert infer_model(params) == name


def test_a_mistyped_preset_gets_a_suggestion() -> None:
    with pytest.raises(ScenarioError) as caught:
        model_shape("vit_base_patch32_244")
    assert "unknown preset 'vit_base_patch32_244' (did you mean 'vit_base_patch32_224'?)" in str(caught.value)


def test_profiles_that_cannot_train_or_do_not_exist_are_refused() -> None:
    with pytest.raises(ScenarioError) as caught:
        generate_scenario(3, 0, profiles=("esp32-s3", "raspbery-pi-5"))
    text = str(caught.value)
    assert len(caught.value.problems) == 2
    assert "supports_training" in text and "did you mean 'raspberry-pi-5'" in text


def test_bad_generator_arguments_are_listed() -> None:
    with pytest.raises(ScenarioError) as caught:
        generate_scenario(0, 0, radius_m=5.0, local_epochs=0)
    assert len(caught.value.problems) == 3
    with pytest.raises(ScenarioError, match="unknown preset 'vit_huge'"):
        generate_scenario(3, 0, model="vit_huge")
    with pytest.raises(ScenarioError, match="t_max: unknown SystemParams field"):
        generate_scenario(3, 0, params={"t_max": 3.0})


@pytest.mark.parametrize("subchannels", [0, 6])
def test_json_round_trip_is_exact(tmp_path: Path, subchannels: int) -> None:
    problem = generate_scenario(9, 2, params={"subchannels": subchannels, "lambda_time": 0.5})
    path = tmp_path / "scenario.json"
    dump_scenario(problem, path)
    loaded = load_scenario(path)
    assert_same_problem(problem, loaded)
    data = json.loads(path.read_text())
    assert (data["format"], data["model"]) == (1, "vit_base_patch32_224")


def test_an_uncapped_round_survives_the_file(tmp_path: Path) -> None:
    problem = generate_scenario(2, 0, t_max_s=float("inf"))
    dump_scenario(problem, tmp_path / "s.json")
    assert load_scenario(tmp_path / "s.json").params.t_max_s == float("inf")


def test_a_hand_written_file_takes_hardware_from_profiles(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({
        "format": 1, "model": "vit_quick_patch4_16", "params": {"t_max_s": 5.0},
        "devices": [
            {"id": "pi", "profile": "raspberry-pi-5", "samples": 450, "distance_m": 1000.0, "fading": 0.5},
            {"id": "x", "samples": 100, "channel_gain": 1e-11, "cycles_per_sample": 1e6, "cpu_freq_hz": 1e9,
             "kappa": 1e-28, "max_tx_power_w": 0.3, "activation_range": 4.0},
        ],
    }))
    problem = load_scenario(path)
    fleet = problem.fleet
    assert fleet.cycles_per_sample[0] == 3 * 16 * 64 * 48 * 0.25
    assert fleet.gain[0] == pytest.approx(0.5 * 10 ** -12.81)
    assert fleet.profiles == ("raspberry-pi-5", "custom")
    assert fleet.weight == pytest.approx([450 / 550, 100 / 550])
    assert problem.params.elements_per_sample == 16 * 64 and problem.params.t_max_s == 5.0


def test_a_bad_file_lists_every_problem(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({
        "format": 2, "colour": "blue", "params": {"t_max_s": -1, "lambda_enrgy": 1},
        "devices": [
            {"id": "a", "profile": "esp32-s3", "samples": 0, "distance_m": 10, "channel_gain": 1e-9},
            {"profile": "no-such-board", "samples": 10},
            "not a device",
        ],
    }))
    # Execute
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    # Assert
    text = str(caught.value)
    for needle in (
        "colour: unknown key", "format: must be 1", "params.t_max_s", "params.lambda_enrgy",
        "devices[0].samples: must be > 0", "devices[0].distance_m | channel_gain", "devices[1].id: missing",
        "devices[1].distance_m | channel_gain", "devices[2]: must be an object", "esp32-s3", "no-such-board",
    ):
        assert needle in text, needle
    assert str(path) in text


def test_unreadable_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ScenarioError, match="not JSON"):
        load_scenario(tmp_path / "x.json")
