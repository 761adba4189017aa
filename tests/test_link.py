"""The system model's uplink rate, path loss, and the token bucket on simulated time."""

from __future__ import annotations

import math

import pytest

from edge_runtime.link import (
    NOISE_PSD_W_PER_HZ,
    TokenBucket,
    channel_gain_from_distance,
    dbm_per_hz_to_w_per_hz,
    path_loss_db,
    uplink_rate_bps,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_noise_psd_default() -> None:
    # -174 dBm/Hz = 10^(-17.4) mW/Hz = 10^(-20.4) W/Hz
    assert NOISE_PSD_W_PER_HZ == pytest.approx(3.981e-21, rel=1e-3)
    assert dbm_per_hz_to_w_per_hz(30.0) == pytest.approx(1.0)


def test_rate_against_hand_computation() -> None:
    # B = 1 MHz, p = 0.1 W, h = 1e-12, N0 = 1e-20 W/Hz: SNR = 1e-13 / 1e-14 = 10
    assert uplink_rate_bps(1e6, 0.1, 1e-12, 1e-20) == pytest.approx(1e6 * math.log2(11.0))
    # default N0: SNR = 0.1 * 1e-12 / (3.981e-21 * 1e6) = 25.12 -> log2(26.12) = 4.707
    assert uplink_rate_bps(1e6, 0.1, 1e-12) == pytest.approx(4.707e6, rel=1e-3)


def test_path_loss_at_100_m_and_1_km() -> None:
    assert path_loss_db(1000.0) == pytest.approx(128.1)
    assert path_loss_db(100.0) == pytest.approx(128.1 - 37.6)
    assert channel_gain_from_distance(1000.0) == pytest.approx(10 ** -12.81)
    assert channel_gain_from_distance(100.0) == pytest.approx(10 ** -9.05)


@pytest.mark.parametrize("args", [(0, 0.1, 1e-12), (1e6, 0, 1e-12), (1e6, 0.1, -1), (1e6, 0.1, 1e-12, 0.0),
                                  (float("nan"), 0.1, 1e-12)])
def test_rate_rejects_non_positive(args) -> None:
    with pytest.raises(ValueError):
        uplink_rate_bps(*args)


def test_distance_and_bucket_reject_non_positive() -> None:
    with pytest.raises(ValueError, match="distance_m"):
        channel_gain_from_distance(0)
    with pytest.raises(ValueError, match="rate_bps"):
        TokenBucket(0, 8)
    with pytest.raises(ValueError, match="burst_bits"):
        TokenBucket(1e3, -1)
    with pytest.raises(ValueError, match="nbytes"):
        TokenBucket(1e3, 8).pace(-1)


def test_bucket_delays_a_burst_by_the_right_simulated_time() -> None:
    t = FakeTime()
    bucket = TokenBucket(rate_bps=8000.0, burst_bits=8000.0, clock=t.clock, sleep=t.sleep)  # 1 kB/s, 1 kB burst
    start = t.now
    airtimes = [bucket.pace(500) for _ in range(6)]  # 3000 bytes: 1000 free, 2000 at 1 kB/s
    assert airtimes == [pytest.approx(0.5)] * 6
    assert t.now - start == pytest.approx(2.0)
    assert bucket.total_airtime_s == pytest.approx(3.0)
    # idle refills the bucket, but never above the burst
    t.now += 60.0
    bucket.pace(1000)
    assert t.now - start == pytest.approx(62.0)
    bucket.pace(1)
    assert bucket.last_delay_s == pytest.approx(8 / 8000.0)


def test_bucket_message_larger_than_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(rate_bps=1000.0, burst_bits=100.0, clock=t.clock, sleep=t.sleep)
    assert bucket.pace(100) == pytest.approx(0.8)  # 800 bits, 100 in the bucket: wait 0.7 s
    assert t.now - 100.0 == pytest.approx(0.7)
    bucket.pace(100)  # the bucket is empty: the next 800 bits take 0.8 s, not more
    assert t.now - 100.0 == pytest.approx(1.5)


def test_mqtt_auth_options_reach_the_client(tmp_path, monkeypatch) -> None:
    import paho.mqtt.client as paho

    from edge_runtime.mqtt import LinkConfig, MqttLink, read_password_file

    calls = []
    monkeypatch.setattr(paho.Client, "username_pw_set", lambda self, u, pw=None: calls.append((u, pw)))
    secret = tmp_path / "pw"
    secret.write_text("s3cret word\nsecond line ignored\n")
    password = read_password_file(secret)
    assert password == "s3cret word"
    config = LinkConfig(client_id="c", username="alice", password=password, ca_file="/x/ca.pem")
    assert "s3cret" not in repr(config)
    link = MqttLink("mqtt://127.0.0.1:1", config)
    assert calls == [("alice", "s3cret word")]
    assert link.config.ca_file == "/x/ca.pem"
    MqttLink("mqtt://127.0.0.1:1", LinkConfig(client_id="d"))
    assert len(calls) == 1  # no username: no auth set
    with pytest.raises(ValueError, match="needs a username"):
        MqttLink("mqtt://127.0.0.1:1", LinkConfig(client_id="e", password="x"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_password_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_password_file(tmp_path / "missing")


def test_cli_device_auth_meter_and_link_options(tmp_path) -> None:
    from sflam.cli import build_parser

    base = ["device", "--bundle", "b", "--broker", "mqtts://h", "--device-id", "d", "--data", "npz:x"]
    args = build_parser().parse_args([*base, "--username", "u", "--password-file", "pw", "--ca-file", "ca.pem",
                                      "--meter", "rapl", "--emulate-link", "--distance-m", "500"])
    assert (args.username, args.password_file, args.ca_file) == ("u", "pw", "ca.pem")
    assert (args.meter, args.emulate_link, args.distance_m, args.channel_gain) == ("rapl", True, 500.0, None)
    assert build_parser().parse_args(base).meter == "auto"
    for bad in (["--password", "x"], ["--distance-m", "1", "--channel-gain", "1e-9"], ["--meter", "nope"],
                ["--distance-m", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])


def test_device_compute_energy_falls_back_to_the_estimate_on_meter_error() -> None:
    from collections import Counter

    from edge_runtime.device import DeviceClient, PowerModel, RoundStats
    from edge_runtime.energy import MeterError, Reading

    class Broken:
        name, kind = "rapl", "measured"

        def start(self) -> None:
            pass

        def stop(self) -> Reading:
            raise MeterError("rapl: no energy counted")

    class Good(Broken):
        def stop(self) -> Reading:
            return Reading(3.0, 1.0, "measured", "rapl: package-0")

    client = DeviceClient.__new__(DeviceClient)
    client.counters, client.power = Counter(), PowerModel(cpu_power_w=2.0, tx_power_w=0.1)
    stats = RoundStats(compute_time_s=0.5, cpu_time_s=0.25)
    client.compute_meter = Broken()
    assert client._start_meter() is True
    assert client._compute_energy(True, stats) == (pytest.approx(0.5), "estimated")
    assert client.counters["meter_errors"] == 1
    client.compute_meter = Good()
    assert client._compute_energy(client._start_meter(), stats) == (3.0, "measured")
    client.compute_meter = None
    energy, source = client._compute_energy(client._start_meter(), RoundStats())
    assert energy > 0 and source == "estimated"  # never a silent 0
