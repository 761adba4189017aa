"""The typed round record: what the daemon writes parses strictly and round-trips, undeclared or
missing keys are refused by their path, and docs/server.md shows the generated schema."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from edge_runtime import protocol as p
from server_runtime.config import parse_config
from server_runtime.daemon import ServerDaemon
from server_runtime.round_record import RoundRecord, RoundRecordError, schema_markdown
from test_metrics import sample_record
from test_server import config_text
from test_server_concurrency import ScriptedDevice

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_BEGIN, SCHEMA_END = "<!-- round-record-schema:begin -->\n", "<!-- round-record-schema:end -->"


@pytest.mark.broker
@pytest.mark.parametrize("bits", [8, "auto"])
def test_every_round_line_the_daemon_writes_parses_strictly_and_round_trips(broker, tmp_path: Path,
                                                                             bits: int | str) -> None:
    # Prepare: two scripted devices in a one-round run; "b" never answers, so it fails at the deadline
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=2,
                                   quant__bits=bits, round__deadline_s=4.0))
    seen: list[RoundRecord] = []
    daemon = ServerDaemon(cfg, on_round=seen.append)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    daemon.link.wait_connected(30)  # subscribed before the devices' Hellos, which are not retained
    a, b = ScriptedDevice(broker.url, "a"), ScriptedDevice(broker.url, "b")
    try:
        # Execute: "a" trains one step and sends its update
        plan = a.wait_for(p.RoundPlan, 30)
        assert plan is not None
        a.train_one_step(plan, daemon)
        runner.join(60)
    finally:
        for device in (a, b):
            device.link.close()
    # Assert: every round line is exactly a RoundRecord, and on_round got the record the log has
    assert not runner.is_alive()
    lines = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    rounds = [line for line in lines if line.get("event") == "round"]
    assert len(rounds) == 1
    for line in rounds:
        assert RoundRecord.from_dict(line).to_dict() == line
    (record,) = seen
    assert record.to_dict() == rounds[0]
    assert record.counted and record.completed == ("a",) and set(record.failed) == {"b"}
    assert record.devices["a"].device_steps == 1 and record.devices["b"].energy_j is None
    assert record.phases_s.checkpoint is not None
    assert (record.allocator is not None) == (bits == "auto")


def test_a_full_record_round_trips_and_reads_as_attributes() -> None:
    line = sample_record(3)

    record = RoundRecord.from_dict(line)

    assert record.to_dict() == line and list(record.to_dict()) == list(line)
    assert record.devices["dev-a"].allocation.tx_power_w == 0.1 and record.selected == ("dev-a", "dev-b")


def test_the_checkpoint_time_may_be_absent_and_stays_absent() -> None:
    line = sample_record(3)
    del line["phases_s"]["checkpoint"]  # the copy saved inside the checkpoint

    record = RoundRecord.from_dict(line)

    assert record.phases_s.checkpoint is None and record.to_dict() == line


@pytest.mark.parametrize("path", [("extra",), ("devices", "dev-a", "bytes_sent"), ("phases_s", "upload"),
                                  ("devices", "dev-b", "allocation", "bitz_up")])
def test_an_undeclared_key_is_refused_by_its_path(path: tuple[str, ...]) -> None:
    line = sample_record(1)
    _at(line, path[:-1])[path[-1]] = 1

    with pytest.raises(RoundRecordError) as caught:
        RoundRecord.from_dict(line)

    assert caught.value.problems == [f"unknown key {'.'.join(path)}"]


@pytest.mark.parametrize("path", [("counters",), ("devices", "dev-a", "device_steps"),
                                  ("devices", "dev-a", "allocation", "bits_up"), ("phases_s", "train")])
def test_a_missing_key_is_refused_by_its_path(path: tuple[str, ...]) -> None:
    line = sample_record(1)
    del _at(line, path[:-1])[path[-1]]

    with pytest.raises(RoundRecordError) as caught:
        RoundRecord.from_dict(line)

    assert caught.value.problems == [f"missing key {'.'.join(path)}"]


def test_every_problem_is_named_at_once() -> None:
    line = sample_record(1, event="start", samples="512", bogus=True)
    line["devices"]["dev-a"]["allocation"]["bitz_up"] = line["devices"]["dev-a"]["allocation"].pop("bits_up")

    with pytest.raises(RoundRecordError) as caught:
        RoundRecord.from_dict(line)

    text = str(caught.value)
    for problem in ("unknown key bogus", "event: expected \"round\"", "samples: expected int",
                    "unknown key devices.dev-a.allocation.bitz_up", "missing key devices.dev-a.allocation.bits_up"):
        assert problem in text, text
    assert len(caught.value.problems) == 5


def test_a_record_is_frozen() -> None:
    record = RoundRecord.from_dict(sample_record(1))

    with pytest.raises(dataclasses.FrozenInstanceError):
        record.round = 2  # type: ignore[misc]


def test_docs_show_the_schema_the_types_generate() -> None:
    text = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    assert SCHEMA_BEGIN in text and SCHEMA_END in text, "docs/server.md lost its round-record-schema markers"

    block = text.split(SCHEMA_BEGIN, 1)[1].split(SCHEMA_END, 1)[0]

    assert block == schema_markdown(), (
        "docs/server.md's metrics.jsonl schema is not the one server_runtime/round_record.py generates: run "
        "`python -m server_runtime.round_record` and paste its output between the round-record-schema markers")


def _at(line: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        line = line[key]
    return line
