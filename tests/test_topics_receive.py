"""MQTT topics are exactly DESIGN.md's table, and the receiver filters what arrives on them."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from edge_runtime.protocol import (
    Activations,
    BadMagicError,
    Envelope,
    Gradient,
    Hello,
    IntegrityError,
    ModelWeights,
    Receiver,
    RoundUpdate,
    StaleMessageError,
    Status,
    Telemetry,
    Tensor,
    TopicError,
    Topics,
    encode,
    parse_topic,
    split,
    weights_from_numpy,
)
from edge_runtime.protocol.receive import Deduplicator
from edge_runtime.protocol.topics import TopicRef
from edge_runtime.quantize import quantize

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "server_runtime", "export", "allocator", "firmware_profiles", "sflam")


# --- topics --------------------------------------------------------------------------------------


def test_topic_builders_match_the_design_table() -> None:
    topics = Topics("exp-7")
    assert topics.plan() == "sflam/v1/exp-7/plan"
    assert topics.model() == "sflam/v1/exp-7/model"
    assert topics.up("pi_4.b") == "sflam/v1/exp-7/d/pi_4.b/up"
    assert topics.down("pi_4.b") == "sflam/v1/exp-7/d/pi_4.b/down"
    assert topics.status("pi_4.b") == "sflam/v1/exp-7/d/pi_4.b/status"
    assert topics.device("pi_4.b", "up") == topics.up("pi_4.b")


def test_subscription_filters_cover_every_device() -> None:
    topics = Topics("run")
    assert topics.all_devices("up") == "sflam/v1/run/d/+/up"
    assert topics.all_devices("status") == "sflam/v1/run/d/+/status"
    assert topics.shared("group", "up") == "$share/group/sflam/v1/run/d/+/up"


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda t: t.plan(), TopicRef("run-1", "plan")),
        (lambda t: t.model(), TopicRef("run-1", "model")),
        (lambda t: t.up("dev"), TopicRef("run-1", "up", "dev")),
        (lambda t: t.down("dev"), TopicRef("run-1", "down", "dev")),
        (lambda t: t.status("dev"), TopicRef("run-1", "status", "dev")),
    ],
    ids=["plan", "model", "up", "down", "status"],
)
def test_parse_topic_inverts_the_builders(build, expected: TopicRef) -> None:  # type: ignore[no-untyped-def]
    topics = Topics("run-1")
    topic = build(topics)
    assert parse_topic(topic) == expected
    assert topics.parse(topic) == expected


def test_retained_topics_are_plan_model_and_status() -> None:
    topics = Topics("run")
    retained = {kind: parse_topic(topic).retained for kind, topic in [
        ("plan", topics.plan()), ("model", topics.model()), ("up", topics.up("d")),
        ("down", topics.down("d")), ("status", topics.status("d")),
    ]}
    assert retained == {"plan": True, "model": True, "up": False, "down": False, "status": True}


BAD_IDS = ["+", "#", "dev/1", "", "x" * 65, "dev 1", "$SYS", "dév", "dev\x00", "d+", "a#b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_that_cannot_be_one_topic_level_are_refused(bad: str) -> None:
    with pytest.raises(TopicError, match="must be 1-64 characters"):
        Topics("run").up(bad)
    with pytest.raises(TopicError, match="run id must be 1-64 characters"):
        Topics(bad)
    with pytest.raises(TopicError):
        Topics("run").shared(bad, "up")


def test_an_id_of_64_characters_is_accepted() -> None:
    long_id = "a" * 64
    assert parse_topic(Topics(long_id).up(long_id)) == TopicRef(long_id, "up", long_id)


@pytest.mark.parametrize("bad", ["dev\n", "run-1\n"])
def test_an_id_with_a_trailing_newline_is_refused(bad: str) -> None:
    # A regular expression ending in "$" used with re.match lets one trailing newline through.
    with pytest.raises(TopicError):
        Topics("run").up(bad)
    with pytest.raises(TopicError):
        Topics(bad)
    with pytest.raises(TopicError):
        parse_topic(f"sflam/v1/run/d/{bad}/up")


@pytest.mark.parametrize("kind", ["", "UP", "plan", "+", "upload"])
def test_unknown_device_topic_kinds_are_refused(kind: str) -> None:
    with pytest.raises(TopicError, match="device topic kind must be one of"):
        Topics("run").device("dev", kind)
    with pytest.raises(TopicError, match="device topic kind must be one of"):
        Topics("run").all_devices(kind)


@pytest.mark.parametrize(
    "topic",
    [
        "sflam/v2/run/plan",
        "sflam/v1/run",
        "sflam/v1/run/",
        "sflam/v1/run/plan/",
        "sflam/v1/run/plan/extra",
        "sflam/v1/run/d/dev",
        "sflam/v1/run/d/dev/sideways",
        "sflam/v1/run/d/+/up",
        "sflam/v1/run/d/#",
        "sflam/v1/+/plan",
        "sflam/v1//plan",
        "sflam/v1/run/x/dev/up",
        "other/v1/run/plan",
        "/sflam/v1/run/plan",
        "$share/g/sflam/v1/run/d/+/up",
        "",
    ],
)
def test_topics_outside_the_layout_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_a_topic_of_another_run_is_refused_by_this_runs_topics() -> None:
    mine, theirs = Topics("run-a"), Topics("run-b")
    with pytest.raises(TopicError, match="belongs to run 'run-b', not 'run-a'"):
        mine.parse(theirs.up("dev"))
    assert parse_topic(theirs.up("dev")).run_id == "run-b"


def test_no_topic_string_is_formatted_outside_topics_py() -> None:
    # Prepare
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "sflam/v1" in path.read_text(encoding="utf-8"):
                offenders.append(path.relative_to(REPO).as_posix())
    # Assert: the root is spelled once, in the module that owns the layout
    assert offenders == ["edge_runtime/protocol/topics.py"]


# --- receiver ------------------------------------------------------------------------------------

RUN = "run-1"


def _activations(round_: int = 3, step: int = 0, device_id: str = "dev", run_id: str = RUN) -> Activations:
    tensor = quantize(np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4), 4, rng=np.random.default_rng(0))
    labels = Tensor.from_numpy(np.array([1, 2], np.int64))
    return Activations(Envelope(run_id, round_, device_id, step, 1.0), tensor, labels)


def _hello(round_: int = 0, run_id: str = RUN) -> Hello:
    return Hello(Envelope(run_id, round_, "dev", 0, 1.0), "pi", "onnx", "0.1", 10, heartbeat=True)


def _update(round_: int, num_bytes: int = 6000) -> RoundUpdate:
    weights = weights_from_numpy({"w": np.arange(num_bytes // 4, dtype=np.float32)})
    telemetry = Telemetry(1.0, 0.5, 2.0, "estimated", 100, 200, 4)
    return RoundUpdate(Envelope(RUN, round_, "dev", 9, 1.0), 1, 64, weights, telemetry)


def test_a_message_is_accepted_and_counted() -> None:
    receiver = Receiver(RUN)
    message = _activations()
    assert receiver.accept(encode(message)) == message
    assert receiver.counters == {"accepted.Activations": 1}


def test_an_exact_duplicate_of_a_step_is_dropped_and_counted() -> None:
    # Prepare
    receiver = Receiver(RUN)
    frame = encode(_activations(step=4))
    # Execute
    first, second = receiver.accept(frame), receiver.accept(frame)
    # Assert
    assert first == _activations(step=4)
    assert second is None
    assert receiver.counters["duplicates"] == 1
    assert receiver.counters["accepted.Activations"] == 1


def test_a_different_step_device_or_type_is_not_a_duplicate() -> None:
    receiver = Receiver(RUN)
    receiver.accept(encode(_activations(step=4)))
    assert receiver.accept(encode(_activations(step=5))) is not None
    assert receiver.accept(encode(_activations(step=4, device_id="dev-2"))) is not None
    assert receiver.accept(encode(_activations(round_=4, step=4))) is not None
    gradient = Gradient(_activations(step=4).envelope, _activations().tensor, 0.5)
    assert receiver.accept(encode(gradient)) is not None
    assert receiver.counters["duplicates"] == 0


def test_repeated_heartbeats_are_not_dropped_as_duplicates() -> None:
    receiver = Receiver(RUN)
    frame = encode(_hello())
    assert receiver.accept(frame) is not None
    assert receiver.accept(frame) is not None
    assert receiver.counters["accepted.Hello"] == 2


def test_a_stale_round_is_refused_and_counted() -> None:
    # Prepare
    receiver = Receiver(RUN)
    receiver.min_round = 5
    # Execute / Assert
    with pytest.raises(StaleMessageError, match="Activations for round 4, serving round 5"):
        receiver.accept(encode(_activations(round_=4)))
    assert receiver.counters["rejected.StaleMessageError"] == 1
    assert receiver.accept(encode(_activations(round_=5))) is not None


def test_a_hello_from_an_older_round_is_still_accepted() -> None:
    # A device joining late announces itself with the round it last saw; that is not work.
    receiver = Receiver(RUN)
    receiver.min_round = 5
    assert receiver.accept(encode(_hello(round_=1))) is not None


def test_another_run_is_refused_and_counted() -> None:
    receiver = Receiver(RUN)
    with pytest.raises(StaleMessageError, match="message for run 'run-0', serving 'run-1'"):
        receiver.accept(encode(_hello(run_id="run-0")))
    assert receiver.counters["rejected.StaleMessageError"] == 1


def test_refusals_are_counted_by_error_class() -> None:
    # Prepare
    receiver = Receiver(RUN)
    corrupted = bytearray(encode(_hello()))
    corrupted[-1] ^= 1
    # Execute
    for data in (b"not a frame at all", b"MQTT" + bytes(20), bytes(corrupted)):
        with pytest.raises((BadMagicError, IntegrityError)):
            receiver.accept(data)
    # Assert
    assert receiver.counters == {"rejected.BadMagicError": 2, "rejected.IntegrityError": 1}
    assert receiver.accept(encode(_hello())) is not None  # and it keeps serving


def test_a_partial_chunk_set_returns_none_and_the_last_chunk_the_message() -> None:
    # Prepare
    receiver = Receiver(RUN)
    message = _update(round_=2)
    frames = split(message, 2000)
    assert len(frames) == 4
    # Execute
    results = [receiver.accept(frame) for frame in frames]
    # Assert
    assert results == [None, None, None, message]
    assert receiver.counters["chunks"] == 3
    assert receiver.counters["accepted.RoundUpdate"] == 1


def test_a_round_update_re_sent_in_chunks_is_dropped_as_a_duplicate() -> None:
    receiver = Receiver(RUN)
    frames = split(_update(round_=2), 2000)
    results = [receiver.accept(frame) for frame in frames + frames]
    assert [r for r in results if r is not None] == [_update(round_=2)]
    assert receiver.counters["duplicates"] == 1


def test_a_chunked_message_for_a_stale_round_is_refused_when_complete() -> None:
    receiver = Receiver(RUN)
    receiver.min_round = 3
    frames = split(_update(round_=2), 2000)
    for frame in frames[:-1]:
        assert receiver.accept(frame) is None
    with pytest.raises(StaleMessageError, match="RoundUpdate for round 2"):
        receiver.accept(frames[-1])


def test_a_status_or_model_is_accepted_whatever_the_round() -> None:
    receiver = Receiver(RUN)
    receiver.min_round = 9
    status = Status(Envelope(RUN, 0, "dev", 0, 1.0), False, "last will")
    model = ModelWeights(Envelope(RUN, 8, "server", 0, 1.0), 3, weights_from_numpy({"b": np.zeros(3, np.float32)}))
    assert receiver.accept(encode(status)) == status
    assert receiver.accept(encode(model)) == model


def test_the_deduplicator_forgets_beyond_its_capacity() -> None:
    dedup = Deduplicator(capacity=2)
    first, second, third = (_activations(step=i) for i in range(3))
    assert [dedup.is_duplicate(m) for m in (first, second, third)] == [False, False, False]
    assert dedup.is_duplicate(third) and dedup.is_duplicate(second)
    assert not dedup.is_duplicate(first)  # evicted: the oldest of three with room for two

