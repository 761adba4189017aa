"""MQTT topics are exactly docs/protocol.md's table, and the receiver filters what arrives on them."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from edge_runtime.protocol import (
    Activations,
    BadMagicError,
    Chunk,
    Envelope,
    ForeignRunError,
    Gradient,
    Hello,
    IntegrityError,
    Message,
    ModelWeights,
    ProtocolError,
    Reassembler,
    Receiver,
    RoundPlan,
    RoundUpdate,
    SERVER_ID,
    StaleMessageError,
    Status,
    Telemetry,
    Tensor,
    TopicError,
    Topics,
    decode,
    encode,
    parse_topic,
    split,
    weights_from_numpy,
)
from edge_runtime.protocol.receive import ALLOWED_ON, Deduplicator
from edge_runtime.protocol.topics import TopicRef
from edge_runtime.quantize import quantize
from test_protocol_roundtrip import EXAMPLES

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
        (lambda t: t.retained_part("plan", 0), TopicRef("run-1", "plan", None, part=0)),
        (lambda t: t.retained_part("model", 3), TopicRef("run-1", "model", None, part=3)),
        (lambda t: t.retained_part("model", 65535), TopicRef("run-1", "model", None, part=65535)),
        (lambda t: t.retained_part("model", 999_999), TopicRef("run-1", "model", None, part=999_999)),
    ],
    ids=["plan", "model", "up", "down", "status", "plan part 0", "model part 3", "model part 65535", "model part 999999"],
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
        ("plan part", topics.retained_part("plan", 1)), ("model part", topics.retained_part("model", 0)),
    ]}
    assert retained == {
        "plan": True, "model": True, "up": False, "down": False, "status": True, "plan part": True, "model part": True,
    }


def test_chunks_of_a_retained_message_are_retained_on_numbered_sub_topics() -> None:
    topics = Topics("exp-7")
    assert topics.retained_part("model", 3) == "sflam/v1/exp-7/model/c/3"
    assert topics.retained_part("plan", 0) == "sflam/v1/exp-7/plan/c/0"
    assert parse_topic("sflam/v1/exp-7/model/c/3") == TopicRef("exp-7", "model", None, part=3)
    assert parse_topic(topics.model()).part is None and parse_topic(topics.up("d")).part is None


def test_the_retained_filter_covers_the_message_and_its_chunks() -> None:
    topics = Topics("exp-7")
    assert topics.retained_filter("model") == "sflam/v1/exp-7/model/#"
    assert topics.retained_filter("plan") == "sflam/v1/exp-7/plan/#"
    # '#' also matches its parent level, so the filter covers model itself and model/c/{i}
    prefix = topics.retained_filter("model")[: -len("/#")]
    assert topics.model() == prefix
    assert all(topics.retained_part("model", i).startswith(prefix + "/") for i in (0, 7, 123))


@pytest.mark.parametrize("kind", ["up", "down", "status", "", "PLAN", "models", "+", "#"])
def test_only_plan_and_model_have_retained_parts(kind: str) -> None:
    with pytest.raises(TopicError, match="only plan and model are chunked onto sub-topics"):
        Topics("run").retained_part(kind, 0)
    with pytest.raises(TopicError, match="retained kinds are plan and model"):
        Topics("run").retained_filter(kind)


@pytest.mark.parametrize("index", [-1, True, False, 1.0, "3", None, 1_000_000])
def test_a_retained_part_index_must_be_a_non_negative_integer(index: object) -> None:
    with pytest.raises(TopicError, match=r"chunk index must be an integer in \[0, 1000000\)"):
        Topics("run").retained_part("model", index)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "part",
    ["-1", "03", "00", "x", "3a", "", " 3", "+", "#", "1234567", "0x3", "３", "3.0", "1e3"],
)
@pytest.mark.parametrize("kind", ["plan", "model"])
def test_a_bad_chunk_sub_topic_is_refused(kind: str, part: str) -> None:
    with pytest.raises(TopicError, match="not an sflam topic"):
        parse_topic(f"sflam/v1/run/{kind}/c/{part}")


def test_every_retained_part_topic_parses_back() -> None:
    # The builder's range is exactly the parser's: the largest index round-trips, the next is refused.
    topics = Topics("run")
    assert topics.parse(topics.retained_part("model", 999_999)).part == 999_999
    with pytest.raises(TopicError, match="chunk index must be an integer"):
        topics.retained_part("model", 1_000_000)


@pytest.mark.parametrize(
    "topic",
    [
        "sflam/v1/run/model/c",
        "sflam/v1/run/model/c/3/4",
        "sflam/v1/run/model/x/3",
        "sflam/v1/run/model/C/3",
        "sflam/v1/run/up/c/3",
        "sflam/v1/run/status/c/3",
        "sflam/v1/run/d/dev/up/c/3",
        "sflam/v1/run/c/3",
    ],
)
def test_chunk_sub_topics_exist_only_under_plan_and_model(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


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


def _hello(round_: int = 0, run_id: str = RUN, created_at: float = 1.0) -> Hello:
    return Hello(Envelope(run_id, round_, "dev", 0, created_at), "pi", "onnx", "0.1", 10, heartbeat=True)


def _update(round_: int, num_bytes: int = 6000, run_id: str = RUN, device_id: str = "dev") -> RoundUpdate:
    weights = weights_from_numpy({"w": np.arange(num_bytes // 4, dtype=np.float32)})
    telemetry = Telemetry(1.0, 0.5, 2.0, "estimated", 100, 200, 4)
    return RoundUpdate(Envelope(run_id, round_, device_id, 9, 1.0), 1, 64, weights, telemetry)


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


def test_each_new_heartbeat_is_accepted() -> None:
    receiver = Receiver(RUN)
    assert receiver.accept(encode(_hello(created_at=1.0))) is not None
    assert receiver.accept(encode(_hello(created_at=2.0))) is not None
    assert receiver.counters["accepted.Hello"] == 2


def test_a_replayed_hello_is_a_duplicate_and_an_older_one_is_stale() -> None:
    # Prepare
    receiver = Receiver(RUN)
    receiver.accept(encode(_hello(created_at=1.0)))
    receiver.accept(encode(_hello(created_at=5.0)))
    # Execute / Assert
    assert receiver.accept(encode(_hello(created_at=5.0))) is None
    with pytest.raises(StaleMessageError, match="Hello from 'dev' made at 1.000, older than the last one"):
        receiver.accept(encode(_hello(created_at=1.0)))
    assert receiver.counters["duplicates"] == 1
    assert receiver.counters["rejected.StaleMessageError"] == 1
    assert receiver.counters["accepted.Hello"] == 2


def _status(online: bool, created_at: float, step: int = 0, device_id: str = "dev") -> Status:
    return Status(Envelope(RUN, 0, device_id, step, created_at), online, "" if online else "connection lost")


def test_a_connection_s_will_supersedes_its_online_status_and_cannot_be_replayed() -> None:
    # Prepare: connection 1 (epoch 10): online, then its will; connection 2 (epoch 20): online
    receiver = Receiver(RUN)
    online_1, will_1, online_2 = _status(True, 10.0), _status(False, 10.0, step=1), _status(True, 20.0)
    # Execute
    accepted = [receiver.accept(encode(m)) for m in (online_1, will_1, online_2)]
    # Assert: connection 1's will, replayed now, would take the device offline: refused
    assert accepted == [online_1, will_1, online_2]
    with pytest.raises(StaleMessageError):
        receiver.accept(encode(will_1))
    with pytest.raises(StaleMessageError):
        receiver.accept(encode(online_1))


def test_presence_is_ordered_per_device_and_per_kind() -> None:
    receiver = Receiver(RUN)
    assert receiver.accept(encode(_status(True, 50.0, device_id="a"))) is not None
    assert receiver.accept(encode(_status(True, 10.0, device_id="b"))) is not None  # another device
    assert receiver.accept(encode(_hello(created_at=1.0))) is not None  # a Hello is not a Status


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
    with pytest.raises(ForeignRunError, match="message for run 'run-0', this is run 'run-1'"):
        receiver.accept(encode(_hello(run_id="run-0")))
    assert receiver.counters == {"rejected.ForeignRunError": 1}


def test_another_run_is_not_a_stale_message() -> None:
    # Distinct classes, so a daemon can tell a misrouted run from a late round.
    assert not issubclass(ForeignRunError, StaleMessageError)
    assert issubclass(ForeignRunError, ProtocolError)


def test_chunks_of_another_run_take_no_buffer_space() -> None:
    # Prepare
    receiver = Receiver(RUN)
    frames = split(_update(round_=2, run_id="run-0"), 2000)
    # Execute: the run is checked on each chunk frame, before the reassembler sees it
    for frame in frames:
        with pytest.raises(ForeignRunError):
            receiver.accept(frame)
    # Assert
    assert receiver.counters == {"rejected.ForeignRunError": len(frames)}
    assert receiver.reassembler.pending_sets == 0 and receiver.reassembler.buffered_bytes == 0


def test_a_foreign_run_is_refused_whatever_the_round() -> None:
    receiver = Receiver(RUN)
    receiver.min_round = 5
    with pytest.raises(ForeignRunError):
        receiver.accept(encode(_activations(round_=1, run_id="run-0")))
    assert receiver.counters == {"rejected.ForeignRunError": 1}


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


def test_a_round_update_re_sent_in_chunks_is_delivered_once() -> None:
    # Prepare
    receiver = Receiver(RUN)
    frames = split(_update(round_=2), 2000)
    # Execute
    results = [receiver.accept(frame) for frame in frames + frames]
    # Assert: the re-sent set is dropped chunk by chunk (late), never reassembled a second time,
    # and counted as duplicates of the step it carries, so a server can re-answer it
    assert [r for r in results if r is not None] == [_update(round_=2)]
    assert receiver.reassembler.counters["late_chunks"] == len(frames)
    assert receiver.reassembler.counters["completed_sets"] == 1
    assert receiver.counters["chunks"] == len(frames) - 1
    assert receiver.counters["duplicates"] == len(frames)
    assert receiver.last_duplicate == _update(round_=2).envelope


def test_the_last_duplicate_names_the_step_it_repeats() -> None:
    receiver = Receiver(RUN)
    message = _update(round_=3)
    assert receiver.accept(encode(message)) == message and receiver.last_duplicate is None
    assert receiver.accept(encode(message)) is None
    assert receiver.last_duplicate == message.envelope
    assert receiver.accept(encode(_update(round_=4))) is not None and receiver.last_duplicate is None


def test_a_round_update_re_sent_whole_after_chunks_is_dropped_as_a_duplicate() -> None:
    # A different frame (not chunked) of the same step: the deduplicator catches it.
    receiver = Receiver(RUN, reassembler=Reassembler())
    message = _update(round_=2)
    for frame in split(message, 2000):
        receiver.accept(frame)
    assert receiver.accept(encode(message)) is None
    assert receiver.counters["duplicates"] == 1
    assert receiver.counters["accepted.RoundUpdate"] == 1


def test_a_chunked_message_for_a_stale_round_is_refused_when_complete() -> None:
    receiver = Receiver(RUN)
    receiver.min_round = 3
    frames = split(_update(round_=2), 2000)
    for frame in frames[:-1]:
        assert receiver.accept(frame) is None
    with pytest.raises(StaleMessageError, match="RoundUpdate for round 2"):
        receiver.accept(frames[-1])


def test_a_status_is_accepted_whatever_the_round() -> None:
    receiver = Receiver(RUN)
    receiver.min_round = 9
    status = Status(Envelope(RUN, 0, "dev", 0, 1.0), False, "last will")
    assert receiver.accept(encode(status)) == status


def _model(round_: int) -> ModelWeights:
    return ModelWeights(Envelope(RUN, round_, "server", 0, 1.0), round_,
                        weights_from_numpy({"b": np.zeros(3, np.float32)}))


def test_a_model_of_a_finished_round_is_stale_and_a_redelivered_one_a_duplicate() -> None:
    # Prepare
    receiver = Receiver(RUN)
    receiver.min_round = 9
    # Execute / Assert
    with pytest.raises(StaleMessageError, match="ModelWeights for round 8, serving round 9"):
        receiver.accept(encode(_model(8)))
    assert receiver.accept(encode(_model(9))) == _model(9)
    assert receiver.accept(encode(_model(9))) is None  # the retained copy after a reconnect
    assert receiver.counters["duplicates"] == 1


def test_the_deduplicator_forgets_beyond_its_capacity() -> None:
    dedup = Deduplicator(capacity=2)
    first, second, third = (_activations(step=i) for i in range(3))
    assert [dedup.is_duplicate(m) for m in (first, second, third)] == [False, False, False]
    assert dedup.is_duplicate(third) and dedup.is_duplicate(second)
    assert not dedup.is_duplicate(first)  # evicted: the oldest of three with room for two



# --- empty payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", bytearray(), memoryview(b"")], ids=["bytes", "bytearray", "memoryview"])
def test_an_empty_payload_clears_a_retained_topic_and_is_counted(data: bytes) -> None:
    # MQTT clears a retained message with a zero-length publish: not a frame, not an error.
    receiver = Receiver(RUN)
    assert receiver.accept(data, Topics(RUN).model()) is None
    assert receiver.accept(data) is None
    assert receiver.counters == {"empty": 2}


def test_a_one_byte_payload_is_a_frame_too_short_not_an_empty_one() -> None:
    # The control for the test above: only zero bytes are "empty".
    receiver = Receiver(RUN)
    with pytest.raises(ProtocolError):
        receiver.accept(b"\x00", Topics(RUN).model())
    assert receiver.counters == {"rejected.TruncatedError": 1}


# --- the topic a message arrived on -------------------------------------------------------------

TOPICS = Topics(RUN)


def _on(message: Message, device_id: str = "dev") -> Message:
    """``message`` re-addressed to this run (and ``device_id``)."""
    return dataclasses.replace(message, envelope=Envelope(RUN, 5, device_id, 1, 1.0))


def _topic(kind: str, device_id: str = "dev") -> str:
    return {"plan": TOPICS.plan(), "model": TOPICS.model()}.get(kind) or TOPICS.device(device_id, kind)


def test_which_message_may_arrive_on_which_topic() -> None:
    assert {kind: {cls.__name__ for cls in classes} for kind, classes in ALLOWED_ON.items()} == {
        "up": {"Hello", "Activations", "RoundUpdate", "ErrorReport"},
        "down": {"Gradient", "ErrorReport"},
        "status": {"Status"},
        "plan": {"RoundPlan"},
        "model": {"ModelWeights"},
    }


CASES = [
    (kind, cls)
    for kind in ("up", "down", "status", "plan", "model")
    for cls in EXAMPLES
    if cls is not Chunk
]


@pytest.mark.parametrize(("kind", "cls"), CASES, ids=[f"{cls.__name__}-on-{kind}" for kind, cls in CASES])
def test_a_message_is_accepted_only_on_a_topic_kind_that_carries_it(kind: str, cls: type[Message]) -> None:
    # Prepare
    receiver = Receiver(RUN)
    message = _on(EXAMPLES[cls], SERVER_ID if kind in ("plan", "model") else "dev")  # the broadcasts' sender
    allowed = cls in ALLOWED_ON[kind]
    # Execute / Assert
    if allowed:
        assert receiver.accept(encode(message), _topic(kind)) == message
        assert receiver.counters == {f"accepted.{cls.__name__}": 1}
    else:
        with pytest.raises(TopicError, match=f"{cls.__name__} does not belong on a '{kind}' topic"):
            receiver.accept(encode(message), _topic(kind))
        assert receiver.counters == {"rejected.TopicError": 1}


def test_without_a_topic_any_message_type_is_accepted() -> None:
    receiver = Receiver(RUN)
    for cls in EXAMPLES:
        if cls is not Chunk:
            assert receiver.accept(encode(_on(EXAMPLES[cls]))) is not None
    assert sum(receiver.counters.values()) == len(EXAMPLES) - 1


@pytest.mark.parametrize("kind", ["up", "down", "status"])
def test_a_device_topic_must_carry_that_devices_messages(kind: str) -> None:
    # Prepare: dev-2 publishes on dev's topic (a misconfigured client, or one spoofing another)
    receiver = Receiver(RUN)
    message = _on(EXAMPLES[{"up": Hello, "down": Gradient, "status": Status}[kind]], device_id="dev-2")
    # Execute / Assert
    with pytest.raises(TopicError, match="envelope claims device 'dev-2' on the topic of 'dev'"):
        receiver.accept(encode(message), _topic(kind, "dev"))
    assert receiver.accept(encode(message), _topic(kind, "dev-2")) == message
    assert receiver.counters == {"rejected.TopicError": 1, f"accepted.{type(message).__name__}": 1}


@pytest.mark.parametrize("kind", ["plan", "model"])
def test_plan_and_model_topics_take_only_the_server_as_sender(kind: str) -> None:
    # Another id would give a forged broadcast a key the duplicate filter has never seen.
    receiver = Receiver(RUN)
    cls = RoundPlan if kind == "plan" else ModelWeights
    with pytest.raises(TopicError, match=f"claims device 'server-2' on the broadcast '{kind}' topic"):
        receiver.accept(encode(_on(EXAMPLES[cls], device_id="server-2")), _topic(kind))
    message = _on(EXAMPLES[cls], device_id=SERVER_ID)
    assert receiver.accept(encode(message), _topic(kind)) == message


@pytest.mark.parametrize(
    "topic",
    ["sflam/v1/run-2/d/dev/up", "sflam/v1/run-2/model", "sflam/v1/run-1/d/dev/sideways", "sflam/v1/run-1/d/+/up", "not/a/topic"],
)
def test_a_topic_that_is_not_one_of_this_runs_is_refused(topic: str) -> None:
    receiver = Receiver(RUN)
    with pytest.raises(TopicError):
        receiver.accept(encode(_hello()), topic)
    assert receiver.counters == {"rejected.TopicError": 1}


def test_the_topic_is_checked_before_the_envelopes_run() -> None:
    # Another run's message on another run's topic: the topic alone tells it was misrouted.
    receiver = Receiver(RUN)
    with pytest.raises(TopicError, match="belongs to run 'run-0', not 'run-1'"):
        receiver.accept(encode(_hello(run_id="run-0")), Topics("run-0").up("dev"))
    with pytest.raises(ForeignRunError):
        receiver.accept(encode(_hello(run_id="run-0")), TOPICS.up("dev"))
    assert receiver.counters == {"rejected.TopicError": 1, "rejected.ForeignRunError": 1}


def test_chunks_on_the_wrong_devices_topic_take_no_buffer_space() -> None:
    # Prepare
    receiver = Receiver(RUN)
    frames = split(_update(round_=2, device_id="dev-2"), 2000)
    # Execute
    for frame in frames:
        with pytest.raises(TopicError, match="envelope claims device 'dev-2'"):
            receiver.accept(frame, TOPICS.up("dev"))
    # Assert
    assert receiver.reassembler.pending_sets == 0 and receiver.reassembler.buffered_bytes == 0
    assert receiver.counters == {"rejected.TopicError": len(frames)}


def test_a_chunked_message_is_checked_against_its_topic_once_reassembled() -> None:
    # Prepare: a RoundUpdate belongs on up, not down; its chunks say nothing of the type
    receiver = Receiver(RUN)
    frames = split(_update(round_=2), 2000)
    # Execute / Assert: the chunks are buffered, the reassembled message is refused
    for frame in frames[:-1]:
        assert receiver.accept(frame, TOPICS.down("dev")) is None
    with pytest.raises(TopicError, match="RoundUpdate does not belong on a 'down' topic"):
        receiver.accept(frames[-1], TOPICS.down("dev"))
    assert receiver.counters == {"chunks": len(frames) - 1, "rejected.TopicError": 1}
    assert receiver.reassembler.pending_sets == 0


def test_a_chunked_round_update_on_its_devices_up_topic_is_accepted() -> None:
    receiver = Receiver(RUN)
    message = _update(round_=2)
    results = [receiver.accept(frame, TOPICS.up("dev")) for frame in split(message, 2000)]
    assert results[-1] == message
    assert receiver.counters["accepted.RoundUpdate"] == 1


def test_a_model_chunked_onto_retained_sub_topics_is_reassembled() -> None:
    # Prepare: the server publishes each chunk retained on model/c/{index}
    model = ModelWeights(Envelope(RUN, 8, "server", 0, 1.0), 3, weights_from_numpy({"w": np.ones(3000, np.float32)}))
    frames = split(model, 4000)
    assert len(frames) == 4
    published = [(TOPICS.retained_part("model", decode(frame).index), frame) for frame in frames]
    # Execute: a late subscriber to model/# receives them (in any order)
    receiver = Receiver(RUN)
    results = [receiver.accept(frame, topic) for topic, frame in reversed(published)]
    # Assert
    assert results == [None, None, None, model]
    assert [parse_topic(topic).part for topic, _ in published] == [0, 1, 2, 3]
    assert receiver.counters == {"chunks": 3, "accepted.ModelWeights": 1}


def test_a_plan_chunked_onto_the_model_sub_topics_is_refused() -> None:
    # Prepare: a plan large enough to need chunks (60 allocations)
    plan = _on(EXAMPLES[RoundPlan], SERVER_ID)
    plan = dataclasses.replace(plan, allocations=tuple(
        dataclasses.replace(plan.allocations[0], device_id=f"dev-{i}") for i in range(60)
    ))
    frames = split(plan, 1000)
    assert len(frames) > 1
    receiver = Receiver(RUN)
    for index, frame in enumerate(frames[:-1]):
        assert receiver.accept(frame, TOPICS.retained_part("model", index)) is None
    with pytest.raises(TopicError, match="RoundPlan does not belong on a 'model' topic"):
        receiver.accept(frames[-1], TOPICS.retained_part("model", len(frames) - 1))
    assert receiver.counters == {"chunks": len(frames) - 1, "rejected.TopicError": 1}


def test_a_chunk_of_another_run_on_this_runs_topic_is_a_foreign_run() -> None:
    receiver = Receiver(RUN)
    frame = split(_update(round_=2, run_id="run-0"), 2000)[0]
    with pytest.raises(ForeignRunError):
        receiver.accept(frame, TOPICS.up("dev"))
    assert receiver.reassembler.pending_sets == 0
