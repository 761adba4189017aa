"""The round record: one line of ``metrics.jsonl`` per round attempt, as frozen dataclasses.

The daemon builds a :class:`RoundRecord` and writes ``record.to_dict()``; ``RoundRecord.from_dict``
reads a line back and refuses any key the types do not declare and any required key that is
missing, naming each by its path (``devices.dev-1.allocation.bits_up``). A field with a default
may be absent from a line and is left out of ``to_dict`` while it holds that default.
:func:`schema_markdown` renders the schema shown in docs/server.md (Metrics).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sflam_common.problems import ProblemsError

__all__ = [
    "AllocationRecord",
    "AllocatorSummary",
    "DeviceRoundRecord",
    "PhaseTimes",
    "RoundRecord",
    "RoundRecordError",
    "schema_markdown",
]

_R = TypeVar("_R", bound="_JsonRecord")


class RoundRecordError(ProblemsError):
    """A JSON object that is not a round record; ``problems`` has a line per bad key."""

    def __init__(self, problems: list[str], source: str = "not a round record") -> None:
        super().__init__(source, problems)

    def __reduce__(self) -> tuple[type, tuple[list[str], str]]:
        return type(self), (self.problems, self.source)


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with the one-line description :func:`schema_markdown` shows."""
    return field(metadata={"doc": text}, **kwargs)


class _JsonRecord:
    """``to_dict`` and the strict ``from_dict`` of every record type."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in field order."""
        return _encode(self)

    @classmethod
    def from_dict(cls: type[_R], data: Any) -> _R:
        """The record ``data`` describes; RoundRecordError naming every unknown, missing or mistyped key."""
        problems: list[str] = []
        record = _decode(cls, data, "", problems)
        if problems:
            raise RoundRecordError(problems)
        return record


@dataclass(frozen=True)
class AllocationRecord(_JsonRecord):
    """What the round's plan gave one device."""

    bits_up: int = _doc("bits per activation value the device sends")
    bits_down: int = _doc("bits per gradient value the server sends back")
    tx_power_w: float = _doc("uplink transmit power")
    bandwidth_hz: float = _doc("uplink bandwidth")


@dataclass(frozen=True)
class DeviceRoundRecord(_JsonRecord):
    """One selected device's figures for this round only (telemetry fields are null without its update)."""

    bytes_up: int = _doc("bytes the server received from the device")
    bytes_down: int = _doc("bytes the server sent to the device")
    steps: int = _doc("steps the server trained for the device (each exactly once)")
    server_time_s: float = _doc("server compute time of those steps")
    downlink_time_s: float = _doc("time the server spent sending gradients")
    compute_time_s: float | None = _doc("compute time the device reported")
    uplink_time_s: float | None = _doc("uplink time the device reported")
    device_steps: int | None = _doc("steps the device says it took")
    energy_j: float | None = _doc("energy the device reported")
    energy_source: str | None = _doc("how the device got `energy_j`: `measured` or `estimated`")
    allocation: AllocationRecord = _doc("its share of the round's plan")
    trainer_rank: int = _doc("the trainer rank that served its steps (`compute.trainers`; 0 with one)", default=0)
    outages: int = _doc("times the device was reported offline during the round (its will: a dead link)", default=0)
    offline_s: float = _doc("seconds it was offline in those outages, until it was back", default=0.0)
    repeated: int = _doc("its messages that came again (steps re-sent after a reconnect or a lost reply): "
                         "answered again, never trained twice", default=0)


@dataclass(frozen=True)
class PhaseTimes(_JsonRecord):
    """Wall time of each phase of the round attempt, in seconds."""

    wait_devices: float = _doc("until enough devices were online")
    train: float = _doc("plan published until every selected device finished or failed")
    aggregate: float = _doc("FedAvg (0 when the round does not count)")
    evaluate: float = _doc("test-set evaluation (0 when not evaluated)")
    checkpoint: float | None = _doc("run checkpoint; absent from the copy inside the checkpoint", default=None)


@dataclass(frozen=True)
class AllocatorSummary(_JsonRecord):
    """The allocator's last solve (`quant.bits = "auto"`)."""

    status: str = _doc("solver status: `optimal`, `feasible` or `infeasible` (fallback used)")
    objective: float = _doc("the objective the allocation reached (lower is better)")
    solve_time_s: float = _doc("solver wall time")
    iterations: int = _doc("block-coordinate-descent iterations")
    predicted_round_latency_s: float = _doc("round latency the system model predicts")
    predicted_energy_j: float | None = _doc("devices' energy the system model predicts for the allocation",
                                            default=None)
    fixed_objective: float | None = _doc("the objective of the fixed baseline (8 bits, max power, equal "
                                         "bandwidth) on the same round's model", default=None)
    fixed_round_latency_s: float | None = _doc("the fixed baseline's predicted round latency", default=None)
    fixed_energy_j: float | None = _doc("the fixed baseline's predicted device energy", default=None)


@dataclass(frozen=True)
class RoundRecord(_JsonRecord):
    """One line of metrics.jsonl per round attempt; lines of other events may share the file."""

    event: Literal["round"] = _doc("what the line is")
    round: int = _doc("training round the attempt was for; advances only when a round counts")
    plan_round: int = _doc("wire round number, unique per attempt; what `--resume` keys on")
    counted: bool = _doc("the round met `round.min_completed` and was aggregated")
    mode: str = _doc("`training.mode`: `v1`, `v2` or `fl`")
    time: float = _doc("unix time the record was made")
    selected: tuple[str, ...] = _doc("devices selected, sorted")
    completed: tuple[str, ...] = _doc("devices whose update was accepted, sorted")
    failed: Mapping[str, str] = _doc("device id to why it failed")
    accuracy: float | None = _doc("test accuracy in [0, 1]; null when not evaluated")
    test_loss: float | None = _doc("test loss; null when not evaluated")
    train_loss: float | None = _doc("mean training loss of the round")
    samples: int = _doc("training samples of the completed devices")
    duration_s: float = _doc("wall time of the attempt up to the checkpoint")
    phases_s: PhaseTimes = _doc("wall time per phase")
    bytes_broadcast: int = _doc("bytes of the global model and plan, published once to all devices")
    devices: Mapping[str, DeviceRoundRecord] = _doc("device id to its figures, for every selected device")
    counters: Mapping[str, int] = _doc("protocol counters by name, cumulative over the run")
    allocator: AllocatorSummary | None = _doc("the allocator's solve; null unless `quant.bits = \"auto\"`")
    validation_accuracy: float | None = _doc(
        "accuracy on the validation set held out of the training data (`data.validation_fraction`); "
        "absent when there is none or the round was not evaluated", default=None)


# ---------------------------------------------------------------------------------------------
# JSON <-> dataclasses, driven by the annotations


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
    if isinstance(value, Mapping):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _decode(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``value`` as type ``tp``; what does not fit is appended to ``problems``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _decode(tp, value, path, problems)
    if dataclasses.is_dataclass(tp):
        return _decode_fields(tp, value, path, problems)
    if origin is tuple and isinstance(value, list):
        return tuple(_decode(args[0], item, f"{path}[{i}]", problems) for i, item in enumerate(value))
    if origin is Mapping and isinstance(value, dict):
        return {key: _decode(args[1], item, _join(path, key), problems) for key, item in value.items()}
    if not _fits(tp, value):
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r:.60}")
    return value


def _fits(tp: Any, value: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return tp in (str, bool) and isinstance(value, tp)


def _decode_fields(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path or 'record'}: expected an object ({cls.__name__}), got {value!r:.60}")
        return None
    before, hints = len(problems), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems.extend(f"unknown key {_join(path, key)}" for key in value if key not in fields)
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _decode(hints[name], value[name], _join(path, name), problems)
        elif f.default is dataclasses.MISSING:
            problems.append(f"missing key {_join(path, name)}")
    return cls(**kwargs) if len(problems) == before else None


# ---------------------------------------------------------------------------------------------
# The schema for docs/server.md


_SCHEMA_TYPES = (RoundRecord, PhaseTimes, DeviceRoundRecord, AllocationRecord, AllocatorSummary)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin is tuple:
        return f"[{_type_name(args[0])}]"
    if origin is Mapping:
        return f"{{{_type_name(args[0])}: {_type_name(args[1])}}}"
    return "null" if tp is type(None) else tp.__name__


def _table(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    rows = [f"| `{f.name}` | {_type_name(hints[f.name])} | {f.metadata['doc']} |" for f in dataclasses.fields(cls)]
    intro = (cls.__doc__ or "").strip().splitlines()[0]
    return "\n".join([f"`{cls.__name__}`: {intro}", "", "| key | type | meaning |", "|---|---|---|", *rows])


def schema_markdown() -> str:
    """The metrics.jsonl schema as Markdown tables, one per record type (pasted into docs/server.md)."""
    return "\n\n".join(_table(cls) for cls in _SCHEMA_TYPES) + "\n"


def main() -> None:
    """``python -m server_runtime.round_record``: print the schema block of docs/server.md."""
    print(schema_markdown(), end="")


if __name__ == "__main__":
    main()
