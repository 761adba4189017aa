"""Metrics: JSON lines with resume, typed round records, the Prometheus endpoint and the progress line."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from server_runtime.metrics import (
    MetricsError,
    MetricsLog,
    PrometheusExporter,
    format_bytes,
    progress_line,
    read_metrics,
    read_round_records,
)
from server_runtime.round_record import RoundRecord, RoundRecordError


def sample_record(round_: int, **changes: object) -> dict:
    """A round line as the daemon writes it (every key of RoundRecord), with ``changes`` applied."""
    record = {
        "event": "round", "round": round_, "plan_round": round_, "counted": True, "mode": "v2",
        "time": 1_700_000_000.0 + round_, "selected": ["dev-a", "dev-b"], "completed": ["dev-a", "dev-b"],
        "failed": {}, "accuracy": 0.872, "test_loss": 0.4123, "train_loss": 0.53, "samples": 512,
        "duration_s": 12.34,
        "phases_s": {"wait_devices": 1.0, "train": 9.0, "aggregate": 0.5, "evaluate": 1.5, "checkpoint": 0.3},
        "bytes_broadcast": 10_000,
        "devices": {
            "dev-a": {"bytes_up": 1234, "bytes_down": 400_000, "steps": 8, "server_time_s": 0.2,
                      "downlink_time_s": 0.1, "compute_time_s": 3.0, "uplink_time_s": 0.4, "device_steps": 8,
                      "energy_j": 1.5, "energy_source": "measured",
                      "allocation": {"bits_up": 8, "bits_down": 8, "tx_power_w": 0.1, "bandwidth_hz": 1e6}},
            "dev-b": {"bytes_up": 1_198_766, "bytes_down": 500_000, "steps": 8, "server_time_s": 0.2,
                      "downlink_time_s": 0.1, "compute_time_s": None, "uplink_time_s": None, "device_steps": None,
                      "energy_j": 1.9, "energy_source": "estimated",
                      "allocation": {"bits_up": 4, "bits_down": 8, "tx_power_w": 0.2, "bandwidth_hz": 2e6}},
        },
        "counters": {"rejected_stale": 2, "duplicate": 1},
        "allocator": None,
    }
    record.update(changes)
    return record


def typed_record(round_: int, **changes: object) -> RoundRecord:
    """``sample_record`` read through the type."""
    return RoundRecord.from_dict(sample_record(round_, **changes))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` and a server may bind it (as servers do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "metrics.jsonl"
    with MetricsLog(path) as metrics:
        metrics.write(sample_record(1))
        metrics.write({"event": "start", "config": {"rounds": 3}})

    lines = path.read_text().splitlines()

    assert read_metrics(path) == [sample_record(1), {"event": "start", "config": {"rounds": 3}}]
    assert len(lines) == 2 and ": " not in lines[0]  # compact, one record a line


def test_fresh_log_truncates(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(sample_record(1)) + "\n")

    MetricsLog(path).close()

    assert read_metrics(path) == []


def test_write_after_close_raises(tmp_path: Path) -> None:
    metrics = MetricsLog(tmp_path / "m.jsonl")
    metrics.close()

    with pytest.raises(ValueError, match="closed"):
        metrics.write(sample_record(1))


def test_resume_keeps_each_round_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [sample_record(1), sample_record(2), sample_record(3, accuracy=0.1),
               {"event": "start", "plan_round": 3, "round": 3}, sample_record(3, accuracy=0.2), {"event": "note"},
               sample_record(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "round", "rou')

    with MetricsLog(path, resume_after=3) as metrics:
        metrics.write(sample_record(4, accuracy=0.9))
    kept = read_metrics(path)

    assert [(r.get("event"), r.get("round")) for r in kept] == [
        ("round", 1), ("round", 2), ("start", 3), ("round", 3), ("note", None), ("round", 4)
    ]
    assert kept[3]["accuracy"] == 0.2
    assert kept[5]["accuracy"] == 0.9


def test_resume_appends_last_record_when_round_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(sample_record(1)) + "\n")

    MetricsLog(path, resume_after=2, last_record=sample_record(2)).close()
    MetricsLog(path, resume_after=2, last_record=sample_record(2, accuracy=0.0)).close()

    assert [r["round"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(path)[1]["accuracy"] == 0.872  # present already: not appended again
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_rejects_last_record_of_another_round(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plan round 5"):
        MetricsLog(tmp_path / "m.jsonl", resume_after=4, last_record=sample_record(5))


def test_read_metrics_strict_and_lenient(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(sample_record(1)) + "\n[1, 2]\n")

    with pytest.raises(MetricsError, match="m.jsonl:2"):
        read_metrics(path)
    assert read_metrics(path, strict=False) == [sample_record(1)]


def test_read_round_records_types_the_round_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    lines = [sample_record(1), {"event": "start", "plan_round": 1}, sample_record(2, counted=False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "round", "rou')

    records = read_round_records(path, strict=False)

    assert [(r.round, r.counted) for r in records] == [(1, True), (2, False)]
    assert records[0].devices["dev-b"].allocation.bits_up == 4
    assert records[0].phases_s.checkpoint == 0.3 and records[0].allocator is None


def test_read_round_records_refuses_an_undeclared_key_even_when_lenient(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(sample_record(1, bytes_sent=5)) + "\n")

    with pytest.raises(RoundRecordError, match="unknown key bytes_sent"):
        read_round_records(path, strict=False)


def test_prometheus_endpoint_serves_round_metrics() -> None:
    port = _free_port()
    exporter = PrometheusExporter(port)
    try:
        exporter.observe_round(typed_record(1, accuracy=0.9, test_loss=None))
        exporter.observe_round(typed_record(2, counted=False, accuracy=None, test_loss=None))
        exporter.set_online(3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        exporter.close()

    for line in (
        "sflam_round 1.0",  # round 2 did not count
        "sflam_accuracy 0.9",
        'sflam_bytes_up_total{device="dev-a"} 2468.0',
        'sflam_bytes_down_total{device="dev-b"} 1e+06',
        'sflam_device_energy_joules_total{device="dev-a"} 3.0',
        'sflam_steps_total{device="dev-b"} 16.0',
        'sflam_rounds_total{counted="true"} 1.0',
        'sflam_rounds_total{counted="false"} 1.0',
        'sflam_phase_seconds{phase="train"} 9.0',
        "sflam_round_duration_seconds 12.34",
        "sflam_devices_online 3.0",
        'sflam_messages{kind="rejected_stale"} 2.0',
    ):
        assert line in text.splitlines(), line
    assert "sflam_test_loss NaN" in text.splitlines()  # never set: None values are skipped
    assert _port_is_free(port)


def test_prometheus_rejects_port_zero() -> None:
    with pytest.raises(ValueError, match="port"):
        PrometheusExporter(0)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (512, "512 B"), (1234, "1.2 kB"), (999_960, "1.0 MB"), (3_400_000, "3.4 MB"),
     (1_100_000_000, "1.1 GB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_progress_line_full_record() -> None:
    line = progress_line(typed_record(3), total_rounds=10)

    assert line == (
        "round   3/10  acc 87.20%  test loss 0.412  train loss 0.530  2/2 devices"
        "  up 1.2 MB  down 900.0 kB  energy 3.4 J  12.3 s"
    )


def test_progress_line_with_none_and_failures() -> None:
    record = typed_record(
        4, accuracy=None, test_loss=None, counted=False, completed=["dev-a"], failed={"dev-b": "deadline"},
        devices={"dev-a": {**sample_record(4)["devices"]["dev-a"], "energy_j": None}},
    )

    line = progress_line(record, total_rounds=10)

    assert line.startswith("round   4/10  acc -  test loss -  train loss 0.530  1/2 devices  up 1.2 kB")
    assert "energy -" in line
    assert line.endswith("failed: dev-b (deadline)  not counted")
