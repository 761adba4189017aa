"""Per-round metrics: a JSON-lines log, an opt-in Prometheus endpoint and a progress line.

The daemon writes one :class:`~server_runtime.round_record.RoundRecord` per round attempt
(``record.to_dict()``, one compact JSON line); its schema is the dataclasses of
``server_runtime/round_record.py``, shown in docs/server.md (Metrics). Other events (``"event"``
other than ``"round"``) may share the log; those that carry a ``"plan_round"`` are kept or dropped
with it on resume, which is what resuming keys on: after ``--resume`` the log holds every plan
round up to the checkpoint's exactly once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from server_runtime.round_record import DeviceRoundRecord, RoundRecord

log = logging.getLogger(__name__)

_BYTE_UNITS = ("kB", "MB", "GB", "TB", "PB")


class MetricsError(ValueError):
    """A metrics file line that is not a JSON object; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# JSON lines


def _parse_lines(path: Path, strict: bool) -> list[dict]:
    """Records of ``path``; bad lines raise (``strict``) or are dropped with a warning."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = exc
            if isinstance(record, dict):
                records.append(record)
                continue
            if strict:
                raise MetricsError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
            log.warning("%s:%d: dropping a malformed metrics line: %r", path, number, line[:80])
    return records


def read_metrics(path: str | Path, *, strict: bool = True) -> list[dict]:
    """All records of a metrics file, in order (``strict=False`` skips torn or bad lines)."""
    return _parse_lines(Path(path), strict)


def read_round_records(path: str | Path, *, strict: bool = True) -> list[RoundRecord]:
    """The ``"event": "round"`` lines of a metrics file as RoundRecords (RoundRecordError on a bad key).

    ``strict=False`` skips lines that are not JSON objects (a torn last line); a round line that
    does not match the type raises either way.
    """
    return [RoundRecord.from_dict(r) for r in _parse_lines(Path(path), strict) if r.get("event") == "round"]


RESUME_KEY = "plan_round"  # unique per round attempt, monotonic across restarts


def _round_of(record: Mapping[str, Any]) -> int | None:
    value = record.get(RESUME_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kept_for_resume(records: Iterable[dict], resume_after: int) -> list[dict]:
    """Records up to plan round ``resume_after``, only the last one per (event, plan round), in file order."""
    last_index: dict[tuple[Any, int], int] = {}
    kept: list[dict | None] = []
    for record in records:
        number = _round_of(record)
        if record.get(RESUME_KEY) is not None and number is None:
            log.warning("dropping a metrics record with a non-integer %s: %r", RESUME_KEY, record.get(RESUME_KEY))
            continue
        if number is not None and number > resume_after:
            continue
        if number is not None:
            key = (record.get("event"), number)
            if key in last_index:
                kept[last_index[key]] = None
            last_index[key] = len(kept)
        kept.append(record)
    return [record for record in kept if record is not None]


def _has_round(records: Iterable[dict], number: int) -> bool:
    return any(r.get("event") == "round" and _round_of(r) == number for r in records)


def _replace_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temp file, a rename and a directory fsync."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _dump(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


class MetricsLog:
    """An append-only JSON-lines file of round records, each line fsynced as it is written."""

    def __init__(
        self, path: str | Path, *, resume_after: int | None = None, last_record: dict | None = None
    ) -> None:
        """Start ``path`` afresh, or with ``resume_after=P`` cut it back to plan rounds <= P."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            self._rewrite_for_resume(resume_after, last_record)
            mode = "a"
        else:
            mode = "w"
        self._handle: IO[str] | None = open(self.path, mode, encoding="utf-8")

    def _rewrite_for_resume(self, resume_after: int, last_record: dict | None) -> None:
        if resume_after < 0:
            raise ValueError(f"resume_after must be >= 0, got {resume_after}")
        if last_record is not None and _round_of(last_record) != resume_after:
            raise ValueError(f"last_record is for plan round {last_record.get(RESUME_KEY)!r}, not {resume_after}")
        records = _parse_lines(self.path, strict=False) if self.path.is_file() else []
        kept = _kept_for_resume(records, resume_after)
        if last_record is not None and not _has_round(kept, resume_after):
            kept.append(last_record)
        _replace_durably(self.path, "".join(_dump(record) + "\n" for record in kept))
        log.info("metrics log %s resumed after plan round %d (%d records kept)", self.path, resume_after, len(kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one compact JSON line and make it durable."""
        if self._handle is None:
            raise ValueError(f"metrics log {self.path} is closed")
        self._handle.write(_dump(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file; further writes raise."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Prometheus


class PrometheusExporter:
    """An HTTP /metrics endpoint on its own registry, fed one round record at a time."""

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve on ``addr:port`` (1..65535); an OSError when the port is taken."""
        from prometheus_client import CollectorRegistry, start_http_server

        if not 1 <= port <= 65535:
            raise ValueError(f"Prometheus port must be in 1..65535, got {port}")
        self.registry = CollectorRegistry(auto_describe=True)
        self._make_metrics()
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)

    def _make_metrics(self) -> None:
        from prometheus_client import Counter, Gauge

        reg = self.registry
        self._round = Gauge("sflam_round", "Training rounds completed and counted", registry=reg)
        self._accuracy = Gauge("sflam_accuracy", "Test accuracy (fraction) after the last round", registry=reg)
        self._test_loss = Gauge("sflam_test_loss", "Test loss after the last round", registry=reg)
        self._train_loss = Gauge("sflam_train_loss", "Mean training loss of the last round", registry=reg)
        self._duration = Gauge("sflam_round_duration_seconds", "Wall time of the last round", registry=reg)
        self._phase = Gauge("sflam_phase_seconds", "Wall time per phase of the last round", ["phase"], registry=reg)
        self._rounds = Counter("sflam_rounds_total", "Rounds finished", ["counted"], registry=reg)
        self._bytes_up = Counter("sflam_bytes_up_total", "Bytes received from a device", ["device"], registry=reg)
        self._bytes_down = Counter("sflam_bytes_down_total", "Bytes sent to a device", ["device"], registry=reg)
        self._energy = Counter(
            "sflam_device_energy_joules_total", "Energy a device reported", ["device"], registry=reg
        )
        self._steps = Counter("sflam_steps_total", "Training steps of a device", ["device"], registry=reg)
        self._online = Gauge("sflam_devices_online", "Devices currently online", registry=reg)
        self._messages = Gauge("sflam_messages", "Cumulative message counts by kind", ["kind"], registry=reg)
        for unknown_yet in (self._accuracy, self._test_loss, self._train_loss):
            unknown_yet.set(math.nan)  # not 0 before the first evaluation

    def observe_round(self, record: RoundRecord) -> None:
        """Update every metric from one round record; None values leave a metric as it is."""
        if record.counted:
            self._round.set(record.round)
        for gauge, value in (
            (self._accuracy, record.accuracy),
            (self._test_loss, record.test_loss),
            (self._train_loss, record.train_loss),
            (self._duration, record.duration_s),
        ):
            if value is not None:
                gauge.set(value)
        for phase, seconds in record.phases_s.to_dict().items():  # checkpoint: absent until it is known
            self._phase.labels(phase=phase).set(seconds)
        self._rounds.labels(counted="true" if record.counted else "false").inc()
        for device, figures in record.devices.items():
            self._observe_device(device, figures)
        self.set_counters(record.counters)

    def _observe_device(self, device: str, figures: DeviceRoundRecord) -> None:
        for counter, name, value in (
            (self._bytes_up, "bytes_up", figures.bytes_up),
            (self._bytes_down, "bytes_down", figures.bytes_down),
            (self._energy, "energy_j", figures.energy_j),
            (self._steps, "steps", figures.steps),
        ):
            if value is None:
                continue
            if value < 0:
                log.warning("device %s reported %s=%r < 0; not counted", device, name, value)
                continue
            counter.labels(device=device).inc(value)

    def set_online(self, count: int) -> None:
        """Set the number of devices online now."""
        self._online.set(count)

    def set_counters(self, counters: Mapping[str, int]) -> None:
        """Set the cumulative message counts (accepted, rejected, duplicate, ...) by kind."""
        for kind, count in counters.items():
            self._messages.labels(kind=str(kind)).set(count)

    def close(self) -> None:
        """Stop the HTTP server and free its port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        self._server = None


# ---------------------------------------------------------------------------------------------
# Progress line


def format_bytes(n: int) -> str:
    """A byte count in decimal units: "512 B", "1.2 kB", "3.4 MB", "1.1 GB"."""
    if n < 0:
        raise ValueError(f"byte count must be >= 0, got {n}")
    if n < 1000:
        return f"{int(n)} B"
    value = float(n)
    for unit in _BYTE_UNITS:
        value /= 1000.0
        if round(value, 1) < 1000:
            break
    return f"{value:.1f} {unit}"


def _fixed(value: float | None, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def _device_sum(record: RoundRecord, figure: Callable[[DeviceRoundRecord], float | None]) -> tuple[float, int]:
    """Sum of ``figure`` over the devices that report it, and how many do."""
    values = [value for value in map(figure, record.devices.values()) if value is not None]
    return sum(values), len(values)


def _energy_text(record: RoundRecord) -> str:
    total_j, known = _device_sum(record, lambda d: d.energy_j)
    if known == 0:
        return "energy -"
    partial = f" ({known}/{len(record.devices)} devices)" if known < len(record.devices) else ""
    return f"energy {total_j:.1f} J{partial}"


def progress_line(record: RoundRecord, total_rounds: int) -> str:
    """One readable line for a round record ("up"/"down" sum the devices' own bytes)."""
    width = max(3, len(str(total_rounds)))
    parts = [
        f"round {record.round:>{width}}/{total_rounds}",
        f"acc {_fixed(record.accuracy, 2, 100.0, '%')}",
        f"test loss {_fixed(record.test_loss, 3)}",
        f"train loss {_fixed(record.train_loss, 3)}",
        f"{len(record.completed)}/{len(record.selected)} devices",
        f"up {format_bytes(int(_device_sum(record, lambda d: d.bytes_up)[0]))}",
        f"down {format_bytes(int(_device_sum(record, lambda d: d.bytes_down)[0]))}",
        _energy_text(record),
        f"{_fixed(record.duration_s, 1)} s",
    ]
    if record.failed:
        parts.append("failed: " + ", ".join(f"{device} ({reason})" for device, reason in record.failed.items()))
    if not record.counted:
        parts.append("not counted")
    return "  ".join(parts)
