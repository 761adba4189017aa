"""Every message type survives encode -> decode unchanged, and the frame bytes are pinned.

``EXAMPLES`` holds one representative of every message type; the completeness test makes a new
message type without an encoder, a decoder and an example fail the suite. The fuzz tests reuse
these examples as seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib

import numpy as np
import pytest

from edge_runtime.protocol import (
    Activations,
    Allocation,
    Chunk,
    Envelope,
    ErrorReport,
    Gradient,
    Hello,
    MalformedError,
    Message,
    ModelWeights,
    RoundPlan,
    RoundUpdate,
    Status,
    Telemetry,
    Tensor,
    VERSION,
    classes_digest,
    decode,
    encode,
    weights_from_numpy,
    weights_to_numpy,
)
from edge_runtime.protocol import codec, messages
from edge_runtime.quantize import dequantize, quantize

CREATED_AT = 1_700_000_123.456789  # not representable in float32: a lossy field would show


def _env(device_id: str = "jetson-07", round_: int = 12, step: int = 3, run_id: str = "run-2024.a") -> Envelope:
    return Envelope(run_id, round_, device_id, step, CREATED_AT)


def _activation_batch(shape: tuple[int, ...] = (4, 3, 5)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.normal(0.0, 2.0, size=shape).astype(np.float32)


def _activations(bits: int, per: str, shape: tuple[int, ...] = (4, 3, 5)) -> Activations:
    tensor = quantize(_activation_batch(shape), bits, per=per, rng=np.random.default_rng(bits))
    labels = Tensor.from_numpy(np.arange(shape[0], dtype=np.int64) % 10)
    return Activations(_env(), tensor, labels)


def _mixed_weights() -> tuple[tuple[str, Tensor], ...]:
    """Named tensors of every wire dtype, of different ranks (including a scalar)."""
    rng = np.random.default_rng(3)
    return weights_from_numpy(
        {
            "patch_embed.proj.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
            "patch_embed.proj.bias": rng.normal(size=4).astype(np.float16),
            "pos_embed": rng.normal(size=(1, 5, 4)).astype(np.float64),
            "counts": np.array([0, -1, 2**40], dtype=np.int64),
            "index": np.array([[1, -2], [3, 2**31 - 1]], dtype=np.int32),
            "mask": np.array([0, 255, 7], dtype=np.uint8),
            "offsets": np.array([-128, 127], dtype=np.int8),
            "ids": np.array([65535, 0], dtype=np.uint16),
            "scale": np.array(0.5, dtype=np.float32),
        }
    )


def _chunk_payload() -> bytes:
    return encode(ErrorReport(_env(), "late", "x" * 40))[:32]


# lr, tx_power_w and loss travel as float64: the examples use values float32 cannot represent
# (0.1, 1e-3, ln 10), so a field narrowed on the wire would fail every round trip below.
EXAMPLES: dict[type[Message], Message] = {
    Hello: Hello(
        _env(step=0), "raspberry-pi-4", "onnxruntime", "0.3.1", 5_000, heartbeat=True,
        last_telemetry=Telemetry(12.5, 3.25, 41.0625, "estimated", 2_000_000, 30_000, 40), skipped_samples=17,
    ),
    Status: Status(_env(step=0), online=False, reason="last will: connection lost"),
    RoundPlan: RoundPlan(
        _env(device_id="server", step=0),
        model_version=41,
        deadline_s=90.5,
        local_epochs=2,
        batch_size=32,
        lr=1e-3,
        allocations=(
            Allocation("jetson-07", bits_up=3, bits_down=8, tx_power_w=0.1, bandwidth_hz=1.25e6, per_token=True),
            Allocation("pi-01", bits_up=1, bits_down=16, tx_power_w=0.2, bandwidth_hz=2.0e5),
            Allocation("phone-3", bits_up=32, bits_down=32, tx_power_w=0.0, bandwidth_hz=0.0),
        ),
        num_classes=1000,
        classes_digest=hashlib.sha256(b"".join(f"class-{i}\n".encode() for i in range(1000))).digest(),
        crop_padding=4,
        hflip=True,
    ),
    ModelWeights: ModelWeights(_env(device_id="server", step=0), version=41, weights=_mixed_weights()),
    Activations: _activations(3, "token"),
    Gradient: Gradient(_env(device_id="server"), quantize(_activation_batch(), 8, rng=np.random.default_rng(1)), loss=2.302585092994046),
    RoundUpdate: RoundUpdate(
        _env(step=40),
        model_version=41,
        num_samples=1_280,
        weights=_mixed_weights()[:3],
        telemetry=Telemetry(
            compute_time_s=12.75,
            uplink_time_s=3.1,
            energy_j=47.25,
            energy_source="measured",
            bytes_sent=2**40 + 3,
            bytes_received=123_456,
            steps=40,
        ),
    ),
    ErrorReport: ErrorReport(_env(device_id="server"), "stale_round", "round 11 is over; serving round 12"),
    Chunk: Chunk(_env(step=40), message_id=2**64 - 1, index=2, count=5, total_size=160, data=_chunk_payload()),
}

# Activations at every kind of width: packed below a byte, odd widths, a byte, float16/float32.
ACTIVATIONS = [_activations(bits, per) for bits in (1, 3, 8, 16, 32) for per in ("tensor", "token")]
ALL_EXAMPLES: list[Message] = [*EXAMPLES.values(), *ACTIVATIONS]


def _ids(values: list[Message]) -> list[str]:
    return [f"{type(v).__name__}-{i}" for i, v in enumerate(values)]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ALL_EXAMPLES, ids=_ids(ALL_EXAMPLES))
def test_every_example_decodes_to_an_equal_message(message: Message) -> None:
    # Execute
    frame = encode(message)
    decoded = decode(frame)
    # Assert
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode(decoded) == frame


def test_equality_is_by_content_so_a_round_trip_check_can_fail() -> None:
    # Prepare: the same Activations with one payload bit flipped.
    original = EXAMPLES[Activations]
    payload = bytearray(original.tensor.payload)
    payload[0] ^= 1
    altered = dataclasses.replace(original, tensor=dataclasses.replace(original.tensor, payload=bytes(payload)))
    # Execute
    decoded = decode(encode(altered))
    # Assert
    assert decoded == altered
    assert decoded != original


@pytest.mark.parametrize("message", ACTIVATIONS, ids=[f"q{a.tensor.bits}-{a.tensor.per}" for a in ACTIVATIONS])
def test_decoded_activations_dequantize_to_the_sent_values(message: Activations) -> None:
    # Execute
    decoded = decode(encode(message))
    # Assert: the receiver reconstructs exactly what the sender's quantizer stands for.
    np.testing.assert_array_equal(dequantize(decoded.tensor), dequantize(message.tensor))
    assert decoded.tensor.num_groups == (0 if message.tensor.bits in (16, 32) else message.tensor.num_groups)
    if message.tensor.per == "token" and message.tensor.bits <= 8:
        assert decoded.tensor.num_groups == 4 * 3


def test_weights_round_trip_to_the_same_numpy_arrays_and_order() -> None:
    # Prepare
    arrays = weights_to_numpy(_mixed_weights())
    message = ModelWeights(_env(), 7, weights_from_numpy(arrays))
    # Execute
    received = weights_to_numpy(decode(encode(message)).weights)
    # Assert
    assert list(received) == list(arrays)
    for name, array in arrays.items():
        assert received[name].dtype == array.dtype, name
        assert received[name].shape == array.shape, name
        np.testing.assert_array_equal(received[name], array)


# --- completeness and type codes ----------------------------------------------------------------


def test_every_message_type_has_a_codec_and_a_round_trip_example() -> None:
    assert set(messages.message_types()) == set(codec.CODECS) == set(EXAMPLES)
    assert len(messages.message_types()) == 9


def test_wire_type_codes_are_unique_and_stable() -> None:
    # The codes are part of the protocol: other-language clients hard-code them.
    codes = {cls.__name__: codec.type_code(cls) for cls in codec.CODECS}
    assert codes == {
        "Hello": 1,
        "Status": 2,
        "RoundPlan": 3,
        "ModelWeights": 4,
        "Activations": 5,
        "Gradient": 6,
        "RoundUpdate": 7,
        "ErrorReport": 8,
        "Chunk": 9,
    }
    assert len(set(codes.values())) == len(codes)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_frame_carries_magic_version_and_type_code(cls: type[Message]) -> None:
    frame = encode(EXAMPLES[cls])
    assert frame[:4] == b"SFLM"
    assert frame[4] == 4 == VERSION
    assert frame[5] == codec.type_code(cls)


# --- strings and ids ----------------------------------------------------------------------------

# Free texts carry any UTF-8 (including characters that could never be a topic level).
UNICODE_TEXTS = ["капибара-🦫", "设备-七", "ü", "a/b+#", "line\nbreak", "\x00"]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_free_texts_round_trip(text: str) -> None:
    # Prepare
    messages = [
        ErrorReport(_env(), code=text, detail=text * 3),
        Hello(_env(), profile=text, backend=text, software_version=text, num_samples=1),
        Status(_env(), online=False, reason=text),
    ]
    # Execute
    decoded = [decode(encode(message)) for message in messages]
    # Assert
    assert decoded == messages
    assert decoded[0].detail == text * 3 and decoded[1].profile == text and decoded[2].reason == text


def test_empty_free_texts_round_trip() -> None:
    # Prepare
    messages = [Hello(_env(), "", "", "", 0), Status(_env(), True, ""), ErrorReport(_env(), "", "")]
    # Execute
    decoded = [decode(encode(message)) for message in messages]
    # Assert
    assert decoded == messages
    assert decoded[0].profile == "" and decoded[1].reason == "" and decoded[2].detail == ""


# Ids are topic levels: 1-64 of [A-Za-z0-9_.-] (topics.check_id), refused by encode otherwise.
BAD_IDS = ["капибара-🦫", "设备-七", "ü", "a/b", "+", "#", "", "x" * 65, "dev 1", "dev\n", "$SYS"]
GOOD_IDS = ["a", "Z", "0", "run-2024.a", "pi_4.b", "-", ".", "x" * 64]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["run_id", "device_id"])
def test_an_envelope_id_outside_the_topic_rule_is_refused_at_encode(field: str, bad: str) -> None:
    # Prepare
    env = dataclasses.replace(_env(), **{field: bad})
    # Execute / Assert
    with pytest.raises(MalformedError, match=f"envelope {field} must be 1-64 characters"):
        encode(ErrorReport(env, "c", "d"))


@pytest.mark.parametrize("good", GOOD_IDS)
def test_envelope_ids_within_the_topic_rule_round_trip(good: str) -> None:
    message = ErrorReport(Envelope(good, 1, good, 2, CREATED_AT), "c", "d")
    decoded = decode(encode(message))
    assert decoded == message
    assert decoded.envelope.run_id == good and decoded.envelope.device_id == good


@pytest.mark.parametrize("bad", ["ü", "a/b", "", "x" * 65])
def test_an_allocation_device_id_outside_the_topic_rule_is_refused_at_encode(bad: str) -> None:
    plan = RoundPlan(_env(), 1, 1.0, 1, 1, 0.5, (Allocation(bad, 8, 8, 0.5, 1.0),))
    with pytest.raises(MalformedError, match=r"allocation .*device_id must be 1-64 characters"):
        encode(plan)


def _text_of_bytes(size: int) -> str:
    """A string of exactly ``size`` UTF-8 bytes made mostly of 2-byte characters."""
    text = "é" * (size // 2) + "a" * (size % 2)
    assert len(text.encode("utf-8")) == size
    return text


def _with_text(field: str, text: str) -> Message:
    env = _env()
    makers = {
        "profile": lambda: Hello(env, text, "b", "v", 1),
        "backend": lambda: Hello(env, "p", text, "v", 1),
        "software_version": lambda: Hello(env, "p", "b", text, 1),
        "error code": lambda: ErrorReport(env, text, ""),
        "status reason": lambda: Status(env, False, text),
        "error detail": lambda: ErrorReport(env, "c", text),
        "weight name": lambda: ModelWeights(env, 1, ((text, Tensor.from_numpy(np.zeros(2, np.float32))),)),
    }
    return makers[field]()


# Ids never reach their u8 field's 255 bytes: the 64-character id rule refuses them first.
U8_FIELDS = ["profile", "backend", "software_version", "error code"]
U16_FIELDS = ["status reason", "error detail", "weight name"]
LIMITS = [(field, 255) for field in U8_FIELDS] + [(field, 65535) for field in U16_FIELDS]


@pytest.mark.parametrize(("field", "limit"), LIMITS)
def test_string_of_the_maximum_byte_length_round_trips(field: str, limit: int) -> None:
    message = _with_text(field, _text_of_bytes(limit))
    assert decode(encode(message)) == message


@pytest.mark.parametrize(("field", "limit"), LIMITS)
def test_string_one_byte_over_the_limit_is_refused_at_encode(field: str, limit: int) -> None:
    message = _with_text(field, _text_of_bytes(limit + 1))
    with pytest.raises(MalformedError, match=f"exceeds the {limit}-byte field"):
        encode(message)


def test_string_limits_count_utf8_bytes_not_characters() -> None:
    # 200 characters, 400 bytes: fits a u16 field, not a u8 one.
    text = "é" * 200
    assert decode(encode(_with_text("status reason", text))).reason == text
    with pytest.raises(MalformedError, match="string of 400 bytes exceeds the 255-byte field"):
        encode(_with_text("profile", text))


def test_an_id_of_64_characters_fits_and_65_do_not() -> None:
    longest = "d" * 64
    assert decode(encode(Status(Envelope("r" * 64, 1, longest, 0, 1.0), True))).envelope.device_id == longest
    with pytest.raises(MalformedError, match="device_id must be 1-64 characters"):
        encode(Status(Envelope("r", 1, longest + "d", 0, 1.0), True))


# --- envelope -----------------------------------------------------------------------------------

CREATED_ATS = [0.0, -0.0, CREATED_AT, 0.1, 5e-324, 1.7976931348623157e308, -1.5, 2.0**53 + 2]


@pytest.mark.parametrize("created_at", CREATED_ATS)
def test_created_at_round_trips_bit_exactly(created_at: float) -> None:
    message = Status(Envelope("r", 1, "d", 2, created_at), True)
    decoded = decode(encode(message))
    assert struct.pack("<d", decoded.envelope.created_at) == struct.pack("<d", created_at)


@pytest.mark.parametrize("created_at", [float("nan"), float("inf"), float("-inf")])
def test_a_created_at_that_is_not_finite_is_refused_at_encode(created_at: float) -> None:
    with pytest.raises(MalformedError, match="created_at: must be a finite number"):
        encode(Status(Envelope("r", 1, "d", 2, created_at), True))


@pytest.mark.parametrize(("round_", "step"), [(0, 0), (2**32 - 1, 2**32 - 1), (1, 2**31), (2**31 + 5, 7)])
def test_round_and_step_round_trip_up_to_u32_max(round_: int, step: int) -> None:
    message = Gradient(Envelope("r", round_, "d", step, 1.0), EXAMPLES[Gradient].tensor, 0.5)
    decoded = decode(encode(message))
    assert (decoded.envelope.round, decoded.envelope.step) == (round_, step)
    assert decoded == message


@pytest.mark.parametrize(
    ("round_", "step", "field"),
    [(2**32, 0, "round"), (0, 2**32, "step"), (-1, 0, "round"), (0, -1, "step"), (1.0, 0, "round"), (True, 0, "round")],
)
def test_round_or_step_outside_u32_is_refused_at_encode(round_: int, step: int, field: str) -> None:
    with pytest.raises(MalformedError, match=rf"^{field}: must be an integer in \[0, 4294967295\]"):
        encode(Status(Envelope("r", round_, "d", step, 1.0), True))


# --- the bytes, pinned --------------------------------------------------------------------------

# Status(Envelope(run "r1", round 3, device "d7", step 5, created_at 1.5), online, reason "ok"),
# written by hand from the layout in codec.py's docstring.
GOLDEN_STATUS_HEX = (
    "53464c4d"  # magic "SFLM"
    "04"  # version 4
    "02"  # type: Status
    "1600"  # header_len u16 = 22
    "05000000"  # body_len u32 = 5
    "02" "7231"  # run_id: u8 length 2, "r1"
    "02" "6437"  # device_id: u8 length 2, "d7"
    "03000000"  # round u32 = 3
    "05000000"  # step u32 = 5
    "000000000000f83f"  # created_at f64 = 1.5
    "01"  # online = true
    "0200" "6f6b"  # reason: u16 length 2, "ok"
    "00"  # signature scheme 0: unsigned
    "ae160407"  # crc32 (zlib) of all of the above, u32
)


def test_status_frame_matches_the_documented_bytes() -> None:
    # Prepare
    message = Status(Envelope("r1", 3, "d7", 5, 1.5), online=True, reason="ok")
    golden = bytes.fromhex(GOLDEN_STATUS_HEX)
    # Execute
    frame = encode(message)
    # Assert
    assert frame.hex() == golden.hex()
    assert struct.unpack("<I", golden[-4:])[0] == zlib.crc32(golden[:-4])
    assert decode(golden) == message


# RoundPlan(Envelope("r1", 3, "srv", 0, 1.5), model_version 2, deadline 30 s, 1 epoch, batch 16,
# lr 0.1, one Allocation("d7", up 4, down 8, 0.1 W, 1 MHz, per_token), AdamW, momentum 0.5,
# weight decay 1e-4, 2 classes named "0" and "1", crop padding 4, flip), by hand: lr and
# tx_power_w are f64 (0.1 as float32 would be "cdcccc3d").
CLASSES_01_DIGEST_HEX = "82c1315e6c757f33c4a77ca58b2a184f5a88614470c05ec77f3d28918db6b8ae"  # SHA-256 of b"0\n1\n"
GOLDEN_PLAN_HEX = (
    "53464c4d" "04" "03"  # magic, version 4, type: RoundPlan
    "1700"  # header_len u16 = 23
    "67000000"  # body_len u32 = 103 = 81 + 20 + 2
    "02" "7231"  # run_id "r1"
    "03" "737276"  # device_id "srv"
    "03000000" "00000000"  # round 3, step 0
    "000000000000f83f"  # created_at f64 = 1.5
    "02000000"  # model_version u32 = 2
    "0000000000003e40"  # deadline_s f64 = 30.0
    "0100"  # local_epochs u16 = 1
    "10000000"  # batch_size u32 = 16
    "9a9999999999b93f"  # lr f64 = 0.1
    "02"  # optimizer u8 = 2 (adamw)
    "000000000000e03f"  # momentum f64 = 0.5
    "2d431cebe2361a3f"  # weight_decay f64 = 1e-4
    "0200"  # num_classes u16 = 2
    + CLASSES_01_DIGEST_HEX  # classes_digest, 32 raw bytes
    + "04"  # crop_padding u8 = 4
    "01"  # hflip = true
    "0100"  # allocation count u16 = 1
    "02" "6437"  # allocation device_id "d7"
    "04" "08"  # bits_up 4, bits_down 8
    "9a9999999999b93f"  # tx_power_w f64 = 0.1
    "0000000080842e41"  # bandwidth_hz f64 = 1e6
    "01"  # per_token = true
    "00"  # signature scheme 0: unsigned
    "7a3ad0b7"  # crc32 (zlib), u32
)


def test_round_plan_frame_matches_the_documented_bytes() -> None:
    # Prepare
    message = RoundPlan(Envelope("r1", 3, "srv", 0, 1.5), 2, 30.0, 1, 16, 0.1, (Allocation("d7", 4, 8, 0.1, 1e6, per_token=True),),
                        "adamw", 0.5, 1e-4, num_classes=2, classes_digest=classes_digest(["0", "1"]), crop_padding=4, hflip=True)
    golden = bytes.fromhex(GOLDEN_PLAN_HEX)
    # Execute
    frame = encode(message)
    # Assert
    assert frame.hex() == golden.hex()
    assert struct.unpack("<I", golden[-4:])[0] == zlib.crc32(golden[:-4])
    assert decode(golden) == message


# The same Status signed by "d7" with the Ed25519 key whose 32-byte seed is 00 01 02 .. 1f
# (public key 03a107bf f3ce10be 1d70dd18 e74bc099 67e4d630 9ba50d5f 1ddc8664 125531b8).
# Ed25519 is deterministic, so these bytes are what every correct signer writes.
GOLDEN_SIGNED_STATUS_HEX = (
    GOLDEN_STATUS_HEX[: -len("00ae160407")]  # the frame up to the body, as above
    + "01"  # signature scheme 1: Ed25519
    "02" "6437"  # key_id: u8 length 2, "d7"
    "bd259c330b2d4e0597fefcc5cede372ca304258814d277c4d78207c7532ce1cd"  # signature (64 bytes) over
    "45a06895232f0a4c361f378554c2f3a1f08c43710bfb6174c936b25ba19a3d00"  # DOMAIN + SHA-256(frame up to the key_id)
    "e8a3f30b"  # crc32 (zlib), u32
)


def test_signed_status_frame_matches_the_documented_bytes() -> None:
    # Prepare
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_runtime.protocol.signing import DOMAIN, Keyring, SigningKey

    key = SigningKey("d7", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    message = Status(Envelope("r1", 3, "d7", 5, 1.5), online=True, reason="ok")
    golden = bytes.fromhex(GOLDEN_SIGNED_STATUS_HEX)
    # Execute
    frame = encode(message, key)
    # Assert
    assert frame.hex() == golden.hex()
    assert key.public_bytes.hex() == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    signed, signature = golden[: -4 - 64], golden[-4 - 64 : -4]
    key._key.public_key().verify(signature, DOMAIN + hashlib.sha256(signed).digest())  # the rule, by hand
    assert decode(golden, keys=Keyring({"d7": key.public_bytes}), signer="d7") == message


# --- protocol version 4: the plan's class list and augmentation, the Hello's skipped count ------


def test_classes_digest_is_sha256_of_the_names_each_followed_by_a_newline() -> None:
    # Prepare
    expected = hashlib.sha256(b"0\n1\n").digest()
    # Execute
    digest = classes_digest(["0", "1"])
    # Assert
    assert digest == expected and digest.hex() == CLASSES_01_DIGEST_HEX
    assert classes_digest(["1", "0"]) != digest  # order is class-id order: swapped ids differ
    assert classes_digest(["chat", "été"]) == hashlib.sha256("chat\nété\n".encode()).digest()
    assert len(digest) == 32 and digest != messages.NO_CLASSES_DIGEST


@pytest.mark.parametrize("names", [[], ["a\nb"], ["a", "b\n"], [b"a"]], ids=["empty", "newline", "trailing newline", "bytes"])
def test_classes_digest_refuses_names_it_cannot_state_unambiguously(names: list) -> None:
    with pytest.raises(ValueError):
        classes_digest(names)


def test_a_plan_without_classes_or_augmentation_states_none() -> None:
    # Prepare: built the version 3 way, without the new fields
    plan = RoundPlan(_env(device_id="server"), 1, 10.0, 1, 32, 0.1, ())
    # Execute
    decoded = decode(encode(plan))
    # Assert
    assert decoded == plan
    assert (decoded.num_classes, decoded.classes_digest, decoded.crop_padding, decoded.hflip) == (0, bytes(32), 0, False)


@pytest.mark.parametrize(("num_classes", "crop_padding", "hflip"), [(1, 0, True), (10, 4, False), (65535, 64, True)])
def test_plan_classes_and_augmentation_round_trip(num_classes: int, crop_padding: int, hflip: bool) -> None:
    # Prepare
    digest = classes_digest([f"c{i}" for i in range(num_classes)])
    plan = RoundPlan(_env(device_id="server"), 1, 10.0, 1, 32, 0.1, (), num_classes=num_classes, classes_digest=digest,
                     crop_padding=crop_padding, hflip=hflip)
    # Execute
    decoded = decode(encode(plan))
    # Assert
    assert decoded == plan
    assert (decoded.num_classes, decoded.classes_digest, decoded.crop_padding, decoded.hflip) == (num_classes, digest, crop_padding, hflip)


@pytest.mark.parametrize("device_ids", [(), ("d",), ("dev7", "x" * 64)])
def test_plan_body_is_81_bytes_plus_20_plus_d_per_allocation(device_ids: tuple[str, ...]) -> None:
    plan = RoundPlan(_env(device_id="server"), 1, 10.0, 1, 32, 0.1, tuple(Allocation(d, 8, 8, 0.1, 1e6) for d in device_ids))
    frame = encode(plan)
    assert struct.unpack_from("<I", frame, 8)[0] == 81 + sum(20 + len(d) for d in device_ids)


@pytest.mark.parametrize("skipped", [0, 1, 2**32 - 1])
def test_hello_skipped_samples_round_trip_after_num_samples(skipped: int) -> None:
    # Prepare
    hello = Hello(_env(step=0), "pi", "onnx", "1", 1234, skipped_samples=skipped)
    # Execute
    frame = encode(hello)
    decoded = decode(frame)
    # Assert: on the wire it follows num_samples (and the three one-byte texts)
    assert decoded == hello and decoded.skipped_samples == skipped
    body = frame[12 + struct.unpack_from("<H", frame, 6)[0]:]
    assert struct.unpack_from("<II", body, len(b"\x02pi\x04onnx\x011")) == (1234, skipped)


def test_float64_fields_of_the_examples_round_trip_exactly() -> None:
    message = EXAMPLES[RoundPlan]
    decoded = decode(encode(message))
    assert decoded.lr == message.lr == 1e-3
    assert [a.tx_power_w for a in decoded.allocations] == [a.tx_power_w for a in message.allocations] == [0.1, 0.2, 0.0]
    assert decode(encode(EXAMPLES[Gradient])).loss == 2.302585092994046


def test_learning_rate_of_one_tenth_round_trips_unchanged() -> None:
    message = RoundPlan(_env(), 1, 10.0, 1, 32, 0.1, (Allocation("d", 8, 8, 0.1, 1e6),))
    decoded = decode(encode(message))
    assert decoded == message
    assert decoded.lr == 0.1 and decoded.allocations[0].tx_power_w == 0.1


# Values float32 would change (or overflow to inf): 1e39 and 1.7976931348623157e308 are beyond its range.
FLOAT64_VALUES = [0.1, 1e-3, 1 / 3, 5e-324, 1e39, 1.7976931348623157e308, 0.0]


@pytest.mark.parametrize("value", FLOAT64_VALUES)
def test_lr_tx_power_and_loss_round_trip_bit_exactly(value: float) -> None:
    # Prepare
    plan = RoundPlan(_env(), 1, 10.0, 1, 32, value, (Allocation("d", 8, 8, value, 1e6),))
    gradient = Gradient(_env(), EXAMPLES[Gradient].tensor, -value)
    # Execute
    decoded_plan, decoded_gradient = decode(encode(plan)), decode(encode(gradient))
    # Assert
    bits = struct.pack("<d", value)
    assert struct.pack("<d", decoded_plan.lr) == bits
    assert struct.pack("<d", decoded_plan.allocations[0].tx_power_w) == bits
    assert struct.pack("<d", decoded_gradient.loss) == struct.pack("<d", -value)
