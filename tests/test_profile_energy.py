"""``sflam profile-energy``: a small bundle metered here, written as a profile that loads back."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from edge_runtime.energy import RaplMeter
from edge_runtime.profile_energy import calibrated, cmd_profile_energy, measure_bundle, profile_toml
from firmware_profiles import list_profiles, load_profile
from firmware_profiles.schema import Calibration

PRESET = "vit_quick_patch4_16"
BASE = "raspberry-pi-5"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("energy") / "bundle"
    return export_bundle(PRESET, BASE, out, batch=2, formats=("onnx",))


def run_cli(bundle: Path, out: Path, meter: str, root: Path | None = None, base: str | None = None) -> int:
    args = argparse.Namespace(bundle=str(bundle), meter=meter, samples=8, backend="auto", out=str(out),
                              base=base, sysfs_root=root)
    return cmd_profile_energy(args)


def test_estimate_writes_a_profile_that_loads(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "calibrated.toml"
    assert run_cli(bundle, out, "estimate") == 0
    profile = load_profile(out)
    cycles = profile.calibration.cycles_per_sample[PRESET]
    energy = profile.calibration.energy_j_per_sample[PRESET]
    assert cycles > 0 and energy > 0
    assert profile.energy_j_per_sample(PRESET, 1.0) == energy  # the allocator now sees the measurement
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("estimated with the estimate meter" in line for line in header)
    assert dataclasses.replace(profile, calibration=Calibration()) == load_profile(BASE)  # the rest is a copy
    captured = capsys.readouterr()
    assert "4/4 batches" in captured.err and "J per sample" in captured.out


def test_rapl_fixture_gives_measured_figures(bundle: Path, tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    counter = zone / "energy_uj"
    counter.write_text("1000\n")

    def burn_one_joule_per_batch(done: int, total: int) -> None:
        counter.write_text(f"{1000 + done * 1_000_000}\n")

    measurement = measure_bundle(bundle, RaplMeter(tmp_path), samples=8, progress=burn_one_joule_per_batch)
    assert measurement.reading.kind == "measured" and measurement.samples == 8
    assert measurement.energy_j_per_sample == pytest.approx(4.0 / 8)  # 4 batches of 2, 1 J each
    profile = calibrated(load_profile(BASE), measurement)
    out = tmp_path / "measured.toml"
    out.write_text(profile_toml(profile, ["measured with rapl"]))
    loaded = load_profile(out)
    assert loaded.calibration.energy_j_per_sample[PRESET] == pytest.approx(0.5)
    expected_cycles = measurement.seconds_per_sample * loaded.compute.cpu_freq_hz
    assert loaded.calibration.cycles_per_sample[PRESET] == pytest.approx(expected_cycles)


def test_cli_with_a_still_rapl_counter_refuses_a_zero(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    zone = tmp_path / "root/sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("5\n")
    (zone / "max_energy_range_uj").write_text("1000\n")
    assert run_cli(bundle, tmp_path / "out.toml", "rapl", root=tmp_path / "root") == 2
    assert "no energy counted" in capsys.readouterr().err
    assert not (tmp_path / "out.toml").exists()


def test_existing_calibration_is_kept_and_base_path_accepted(bundle: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.toml"
    base = load_profile(BASE)
    other = dataclasses.replace(base, calibration=Calibration({"vit_other": 1e6}, {"vit_other": 0.25}))
    first.write_text(profile_toml(other))
    out = tmp_path / "second.toml"
    assert run_cli(bundle, out, "estimate", base=str(first)) == 0
    calibration = load_profile(out).calibration
    assert calibration.energy_j_per_sample["vit_other"] == 0.25 and PRESET in calibration.energy_j_per_sample



@pytest.mark.parametrize("name", list_profiles())
def test_every_bundled_profile_round_trips_through_the_writer(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    path = tmp_path / "copy.toml"
    path.write_text(profile_toml(profile, ["a copy"]))
    assert load_profile(path) == profile
