"""Energy meters against fixture sysfs trees: units, wraparound, integration, fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_runtime.energy import (
    ESTIMATED,
    MEASURED,
    AndroidMeter,
    EstimateMeter,
    JetsonMeter,
    MeterError,
    RaplMeter,
    Reading,
    open_meter,
)
from edge_runtime.energy import base as energy_base
from edge_runtime.energy.android import battery_power_w
from edge_runtime.energy.base import trapezoid_j
from firmware_profiles import load_profile


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


# ---------------------------------------------------------------- RAPL


def rapl_tree(root: Path, packages: dict[int, int], max_uj: int = 262_143_328_850) -> None:
    base = root / "sys/class/powercap"
    for index, energy_uj in packages.items():
        zone = base / f"intel-rapl:{index}"
        write(zone / "name", f"package-{index}")
        write(zone / "energy_uj", energy_uj)
        write(zone / "max_energy_range_uj", max_uj)
        write(base / f"intel-rapl:{index}:0" / "energy_uj", 999_999_999)  # a subzone: not added
        write(base / f"intel-rapl:{index}:0" / "name", "core")


def set_rapl(root: Path, index: int, energy_uj: int) -> None:
    write(root / f"sys/class/powercap/intel-rapl:{index}/energy_uj", energy_uj)


def test_rapl_sums_packages_not_subzones(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {0: 1_000_000, 1: 5_000_000})
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.start()
    set_rapl(tmp_path, 0, 3_500_000)
    set_rapl(tmp_path, 1, 6_000_000)
    clock.now += 2.0
    reading = meter.stop()
    assert reading.energy_j == pytest.approx(3.5)
    assert reading.seconds == pytest.approx(2.0)
    assert reading.kind == MEASURED
    assert "package-0" in reading.source and "package-1" in reading.source and "core" not in reading.source


def test_rapl_wraparound_between_start_and_stop(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {0: 999_000_000}, max_uj=1_000_000_000)
    meter = RaplMeter(tmp_path, clock=FakeClock())
    meter.start()
    set_rapl(tmp_path, 0, 4_000_000)  # wrapped: 1_000_000 uJ to the top, 4_000_000 after it
    assert meter.stop().energy_j == pytest.approx(5.0)


def test_rapl_root_only_counter_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rapl_tree(tmp_path, {0: 1})
    real = energy_base.read_sysfs

    def denied(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(energy_base, "read_sysfs", denied)  # tests run as root: chmod would not bite
    with pytest.raises(MeterError, match="root-only"):
        RaplMeter(tmp_path)


def test_rapl_counter_that_did_not_move_is_an_error_not_zero(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {0: 42})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    meter.start()
    with pytest.raises(MeterError, match="no energy counted"):
        meter.stop()


def test_rapl_absent(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="no .*intel-rapl"):
        RaplMeter(tmp_path)


# ---------------------------------------------------------------- Jetson


def hwmon_dir(root: Path) -> Path:
    return root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"


def jetson_tree(root: Path, rails: dict[int, tuple[str, float, float]]) -> None:
    """rails: channel -> (label, mV, mA), JetPack 5/6 hwmon layout."""
    directory = hwmon_dir(root)
    for channel, (label, millivolts, milliamps) in rails.items():
        write(directory / f"in{channel}_label", label)
        write(directory / f"in{channel}_input", millivolts)
        write(directory / f"curr{channel}_input", milliamps)


def test_jetson_integrates_the_total_input_rail(tmp_path: Path) -> None:
    jetson_tree(tmp_path, {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 300)})
    clock = FakeClock()
    meter = JetsonMeter(tmp_path, clock=clock, threaded=False)
    meter.start()  # 5 W
    clock.now += 1.0
    jetson_tree(tmp_path, {1: ("VDD_IN", 5000, 2000)})  # 10 W
    meter.sample()
    clock.now += 1.0
    reading = meter.stop()  # still 10 W
    assert reading.energy_j == pytest.approx((5 + 10) / 2 + 10)  # trapezoid, VDD_IN only
    assert reading.seconds == pytest.approx(2.0)
    assert reading.kind == MEASURED and "VDD_IN" in reading.source and "VDD_SOC" not in reading.source


def test_jetson_sums_rails_without_a_total(tmp_path: Path) -> None:
    jetson_tree(tmp_path, {1: ("VDD_GPU", 1000, 1000), 2: ("VDD_CPU", 2000, 1000)})
    clock = FakeClock()
    meter = JetsonMeter(tmp_path, clock=clock, threaded=False)
    meter.start()
    clock.now += 4.0
    assert meter.stop().energy_j == pytest.approx(3.0 * 4.0)


def test_jetson_legacy_iio_layout(tmp_path: Path) -> None:
    directory = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write(directory / "rail_name_0", "POM_5V_IN")
    write(directory / "in_power0_input", 2500)  # mW
    write(directory / "rail_name_1", "POM_5V_GPU")
    write(directory / "in_power1_input", 700)
    clock = FakeClock()
    meter = JetsonMeter(tmp_path, clock=clock, threaded=False)
    meter.start()
    clock.now += 2.0
    assert meter.stop().energy_j == pytest.approx(5.0)


def test_jetson_threaded_sampling_integrates_constant_power(tmp_path: Path) -> None:
    jetson_tree(tmp_path, {1: ("VDD_IN", 5000, 1000)})  # 5 W
    meter = JetsonMeter(tmp_path, period_s=0.01)
    meter.start()
    sampled = energy_base.threading.Event()
    for _ in range(1000):  # until the sampling thread has taken 3 samples (a 10 s guard)
        with meter._lock:
            if len(meter._samples) >= 3:
                sampled.set()
                break
        sampled.wait(0.01)
    reading = meter.stop()
    assert sampled.is_set()
    assert reading.seconds > 0 and reading.energy_j == pytest.approx(5.0 * reading.seconds, rel=1e-6)
    assert int(reading.source.rsplit("(", 1)[1].split()[0]) >= 3  # the thread did sample


# ---------------------------------------------------------------- Android


def battery_tree(root: Path, current: object, voltage: object, status: str = "Discharging") -> None:
    directory = root / "sys/class/power_supply/battery"
    write(directory / "current_now", current)
    write(directory / "voltage_now", voltage)
    write(directory / "status", status)


def android_energy(root: Path, first: tuple, second: tuple) -> Reading:
    battery_tree(root, *first)
    clock = FakeClock()
    meter = AndroidMeter(root, clock=clock, threaded=False)
    meter.start()
    clock.now += 2.0
    battery_tree(root, *second)
    return meter.stop()


def test_android_unit_and_sign_conventions_agree(tmp_path: Path) -> None:
    micro = android_energy(tmp_path / "a", (-500_000, 4_000_000), (-1_000_000, 4_000_000))  # uA, uV, discharge < 0
    milli = android_energy(tmp_path / "b", (500, 4000), (1000, 4000))  # mA, mV, discharge > 0
    expected = 2.0 * (2.0 + 4.0) / 2  # 2 W then 4 W over 2 s
    assert micro.energy_j == pytest.approx(expected)
    assert milli.energy_j == pytest.approx(expected)
    assert micro.kind == milli.kind == MEASURED


@pytest.mark.parametrize(
    ("current", "voltage", "problem"),
    [(25_000_000, 4_000_000, "above 20 A"), (500, 9000, "outside 2.5-5"), (-500_000, 1_200_000, "outside 2.5-5")],
)
def test_android_implausible_values_rejected(tmp_path: Path, current: int, voltage: int, problem: str) -> None:
    battery_tree(tmp_path, current, voltage)
    with pytest.raises(MeterError, match=problem):
        AndroidMeter(tmp_path, threaded=False)


def test_android_charging_counts_nothing_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="charger"):
        android_energy(tmp_path, (800_000, 4_200_000, "Charging"), (800_000, 4_200_000, "Charging"))


def test_battery_power_normalization() -> None:
    assert battery_power_w(3_800_000, -250_000) == pytest.approx(0.95)
    assert battery_power_w(3800, 250) == pytest.approx(0.95)


# ---------------------------------------------------------------- estimator and auto


def test_estimate_is_kappa_cycles_f_squared() -> None:
    profile = load_profile("raspberry-pi-5")
    cpu, wall = FakeClock(), FakeClock()
    meter = EstimateMeter(profile, cpu_clock=cpu, wall_clock=wall)
    meter.start()
    cpu.now += 0.5
    wall.now += 0.25
    reading = meter.stop()
    f, kappa = profile.compute.cpu_freq_hz, profile.compute.effective_capacitance
    assert reading.energy_j == pytest.approx(kappa * (0.5 * f) * f**2)
    assert reading.seconds == pytest.approx(0.25)
    assert reading.kind == ESTIMATED


def test_estimate_on_real_cpu_time_is_positive() -> None:
    meter = EstimateMeter(load_profile("jetson-orin-nano"))
    meter.start()
    sum(i * i for i in range(200_000))
    reading = meter.stop()
    assert reading.energy_j > 0 and reading.kind == ESTIMATED and "estimate" in reading.source


def test_auto_on_an_empty_root_falls_back_to_the_estimator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_runtime.energy"):
        meter = open_meter("auto", tmp_path, load_profile("raspberry-pi-5"))
    assert meter.kind == ESTIMATED and isinstance(meter, EstimateMeter)
    assert "rapl" in meter.fallback_reason and "android" in meter.fallback_reason
    assert "falling back to the estimator" in caplog.text


def test_auto_prefers_rapl_then_jetson(tmp_path: Path) -> None:
    jetson_tree(tmp_path, {1: ("VDD_IN", 5000, 1000)})
    assert open_meter("auto", tmp_path).name == "jetson"
    rapl_tree(tmp_path, {0: 1})
    assert open_meter("auto", tmp_path).name == "rapl"


def test_named_meter_absent_raises_and_unknown_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="android"):
        open_meter("android", tmp_path)
    with pytest.raises(MeterError, match="profile"):
        open_meter("auto", tmp_path)  # no measured meter and nothing to estimate from
    with pytest.raises(ValueError, match="unknown meter"):
        open_meter("wattmeter", tmp_path)
    jetson_tree(tmp_path, {1: ("VDD_IN", 5000, 1000)})
    assert open_meter("jetson-ina3221", tmp_path).name == "jetson"  # the profiles' meter names work too


def test_reading_never_zero_and_always_labelled() -> None:
    with pytest.raises(MeterError):
        Reading(0.0, 1.0, MEASURED, "test")
    with pytest.raises(ValueError):
        Reading(1.0, 1.0, "guessed", "test")
    assert trapezoid_j([(0.0, 1.0), (1.0, 3.0)]) == pytest.approx(2.0)
