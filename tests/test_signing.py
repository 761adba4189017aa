"""Ed25519 frame signatures: the codec's signature block, the receiver's signer-per-topic rule,
key files and key lists, and the modes of the server config and the device (docs/protocol.md
2.6, docs/security.md). The attack with real processes is tests/test_hostile.py's."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as p
from edge_runtime.device_keys import DeviceKeysError, device_signing
from edge_runtime.protocol.signing import SERVER_KEY_ID, KeyFileError, Keyring, SigningKey, public_b64
from edge_runtime.quantize import quantize

RUN = "run"
SERVER = SigningKey.generate(SERVER_KEY_ID)
DEV0, DEV1 = SigningKey.generate("dev-0"), SigningKey.generate("dev-1")
THIEF = SigningKey.generate(SERVER_KEY_ID)  # an attacker's key that claims the server's id
TOPICS = p.Topics(RUN)


def _ring(*keys: SigningKey) -> Keyring:
    return Keyring({k.key_id: k.public_bytes for k in keys})


def _activations(device: str = "dev-0", round_: int = 1, step: int = 0) -> p.Activations:
    q = quantize(np.linspace(-1, 1, 48, dtype=np.float32).reshape(2, 4, 6), 8, per="tensor")
    return p.Activations(p.Envelope(RUN, round_, device, step, 1.0), q, p.Tensor.from_numpy(np.array([1, 2], np.uint8)))


def _plan(round_: int = 1) -> p.RoundPlan:
    return p.RoundPlan(p.Envelope(RUN, round_, SERVER_KEY_ID, 0, 1.0), 1, 30.0, 1, 2, 0.1,
                       (p.Allocation("dev-0", 8, 8, 0.1, 1e6),))


def _recrc(frame: bytes | bytearray) -> bytes:
    return bytes(frame[:-4]) + struct.pack("<I", zlib.crc32(bytes(frame[:-4])))


# --- the codec ---------------------------------------------------------------------------------


def test_a_signed_frame_round_trips_and_names_its_signer() -> None:
    message = _activations()
    frame = p.encode(message, DEV0)
    assert p.decode(frame, keys=_ring(DEV0), signer="dev-0") == message
    assert p.decode(frame) == message  # an unsigned receiver parses the block and verifies nothing
    assert len(frame) == len(p.encode(message)) + 1 + len("dev-0") + 64


def test_every_flipped_body_byte_fails_the_signature_even_with_a_fixed_crc() -> None:
    # Prepare: the attacker recomputes the CRC, so only the signature can notice
    frame = p.encode(_activations(), DEV0)
    keys = _ring(DEV0)
    body_start = 12 + struct.unpack_from("<H", frame, 6)[0]
    # Execute / Assert: every byte of the envelope and body, one at a time
    for offset in range(12, len(frame) - 4 - 64 - 1 - len("dev-0") - 1):
        forged = bytearray(frame)
        forged[offset] ^= 0x01
        with pytest.raises(p.ProtocolError) as caught:
            p.decode(_recrc(forged), keys=keys, signer="dev-0")
        if offset >= body_start:  # a payload byte: the frame still parses, the signature does not match
            assert isinstance(caught.value, p.SignatureError), offset


def test_the_signature_is_checked_before_the_body_is_parsed() -> None:
    # Prepare: a body that would not parse (bits 0), signed by nobody we know
    frame = bytearray(p.encode(_activations(), DEV1))
    body_start = 12 + struct.unpack_from("<H", frame, 6)[0]
    frame[body_start] = 0  # the qtensor's bit width: MalformedError if it were parsed
    # Execute / Assert: refused for its signature, not for its body
    with pytest.raises(p.SignatureError):
        p.decode(_recrc(frame), keys=_ring(DEV0), signer="dev-0")


def test_an_unsigned_frame_is_refused_where_signatures_are_required() -> None:
    with pytest.raises(p.SignatureError, match="unsigned frame"):
        p.decode(p.encode(_activations()), keys=_ring(DEV0))


def test_a_key_not_in_the_ring_is_refused() -> None:
    with pytest.raises(p.SignatureError, match="not in the key list"):
        p.decode(p.encode(_activations("dev-1"), DEV1), keys=_ring(DEV0))


def test_a_forger_claiming_the_servers_id_is_refused() -> None:
    with pytest.raises(p.SignatureError, match="does not match"):
        p.decode(p.encode(_plan(), THIEF), keys=_ring(SERVER), signer=SERVER_KEY_ID)


def test_a_valid_signature_of_the_wrong_party_for_the_topic_is_refused() -> None:
    with pytest.raises(p.SignatureError, match="only 'server' may sign"):
        p.decode(p.encode(_plan(), DEV0), keys=_ring(SERVER, DEV0), signer=SERVER_KEY_ID)


def test_an_unknown_signature_scheme_is_malformed() -> None:
    frame = bytearray(p.encode(_plan()))
    frame[-5] = 7
    with pytest.raises(p.MalformedError, match="unknown signature scheme 7"):
        p.decode(_recrc(frame))


# --- the receiver ------------------------------------------------------------------------------


def test_a_device_refuses_a_forged_plan_gradient_and_model_and_counts_them() -> None:
    # Prepare: a device's receiver trusts the server's key only
    receiver = p.Receiver(RUN, keys=_ring(SERVER))
    grad = p.Gradient(p.Envelope(RUN, 1, "dev-0", 0, 1.0), quantize(np.ones((2, 3), np.float32), 8), 0.5)
    model = p.ModelWeights(p.Envelope(RUN, 1, SERVER_KEY_ID, 0, 1.0), 1,
                           p.weights_from_numpy({"w": np.ones(3, np.float32)}))
    forged = [(TOPICS.plan(), _plan()), (TOPICS.down("dev-0"), grad), (TOPICS.model(), model)]
    # Execute / Assert: unsigned, and signed by a thief under the server's id
    for signer in (None, THIEF):
        for topic, message in forged:
            with pytest.raises(p.SignatureError):
                receiver.accept(p.encode(message, signer), topic)
    assert receiver.counters["rejected.SignatureError"] == 6
    # ... and the genuine ones still pass
    for topic, message in forged:
        assert receiver.accept(p.encode(message, SERVER), topic) == message


def test_a_server_refuses_activations_signed_by_another_device() -> None:
    receiver = p.Receiver(RUN, keys=_ring(SERVER, DEV0, DEV1))
    with pytest.raises(p.SignatureError, match="only 'dev-0' may sign"):
        receiver.accept(p.encode(_activations("dev-0"), DEV1), TOPICS.up("dev-0"))
    assert receiver.accept(p.encode(_activations("dev-0"), DEV0), TOPICS.up("dev-0")) is not None


def test_a_replayed_signed_message_is_still_refused_by_the_replay_rules() -> None:
    # Prepare
    receiver = p.Receiver(RUN, keys=_ring(SERVER, DEV0))
    frame = p.encode(_activations(round_=1), DEV0)
    assert receiver.accept(frame, TOPICS.up("dev-0")) is not None
    # Execute / Assert: the same bytes again are a duplicate, and stale once the round moved on
    assert receiver.accept(frame, TOPICS.up("dev-0")) is None
    assert receiver.counters["duplicates"] == 1
    receiver.min_round = 2
    with pytest.raises(p.StaleMessageError):
        receiver.accept(p.encode(_activations(round_=1, step=5), DEV0), TOPICS.up("dev-0"))


def test_signed_chunks_reassemble_and_a_forged_chunk_takes_no_buffer() -> None:
    # Prepare: a plan broadcast chunked into small signed frames
    big = dataclasses.replace(_plan(), allocations=tuple(p.Allocation(f"d{i}", 8, 8, 0.1, 1e6) for i in range(60)))
    frames = p.split(big, 600, SERVER)
    assert len(frames) > 2
    receiver = p.Receiver(RUN, keys=_ring(SERVER))
    forged = p.split(dataclasses.replace(big, model_version=9), 600, THIEF)
    # Execute: the forger's first chunk, then the genuine set
    with pytest.raises(p.SignatureError):
        receiver.accept(forged[0], TOPICS.retained_part("plan", 0))
    assert receiver.reassembler.buffered_bytes == 0
    results = [receiver.accept(f, TOPICS.retained_part("plan", i)) for i, f in enumerate(frames)]
    # Assert
    assert results[-1] == big and all(r is None for r in results[:-1])


def test_the_receiver_drops_a_revoked_device_once_the_key_list_changes(tmp_path: Path) -> None:
    # Prepare: a key list on disk, read like a server's security.device_keys
    fleet = tmp_path / "fleet.json"
    _write_fleet(fleet, [DEV0, DEV1])
    keys = Keyring.from_fleet_json(fleet)
    receiver = p.Receiver(RUN, keys=keys)
    assert receiver.accept(p.encode(_activations("dev-1", step=0), DEV1), TOPICS.up("dev-1")) is not None
    # Execute: dev-1 revoked (the file rewritten), and the reload interval passed
    _write_fleet(fleet, [DEV0])
    keys._checked_at -= Keyring.RELOAD_EVERY_S
    # Assert
    with pytest.raises(p.SignatureError, match="not in the key list"):
        receiver.accept(p.encode(_activations("dev-1", step=1), DEV1), TOPICS.up("dev-1"))
    assert keys.reloads == 1 and keys.ids == ["dev-0", "server"]


def _write_fleet(path: Path, devices: list[SigningKey]) -> None:
    doc = {"server": {"public_key": public_b64(SERVER.public_bytes)},
           "devices": [{"id": d.key_id, "public_key": public_b64(d.public_bytes)} for d in devices]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + len(devices)))  # a distinct stamp even within one tick


# --- key files ---------------------------------------------------------------------------------


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev-0.key"
    path.write_bytes(DEV0.pem())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        SigningKey.from_file("dev-0", path)
    path.chmod(0o600)
    assert SigningKey.from_file("dev-0", path).public_bytes == DEV0.public_bytes


def test_a_key_list_without_keys_says_to_provision_again(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": [{"id": "dev-0"}]}))
    with pytest.raises(KeyFileError, match="provision the fleet again"):
        Keyring.from_fleet_json(path)


def test_a_public_key_reads_from_pem_or_base64(tmp_path: Path) -> None:
    (tmp_path / "a.pub").write_bytes(SERVER.public_pem())
    (tmp_path / "b.pub").write_text(base64.b64encode(SERVER.public_bytes).decode() + "\n")
    for name in ("a.pub", "b.pub"):
        assert SERVER_KEY_ID in Keyring.server_only(tmp_path / name)


# --- modes -------------------------------------------------------------------------------------


def _keys_on_disk(tmp_path: Path) -> tuple[str, str]:
    key, pub = tmp_path / "dev-0.key", tmp_path / "server.pub"
    key.write_bytes(DEV0.pem())
    key.chmod(0o600)
    pub.write_bytes(SERVER.public_pem())
    return str(key), str(pub)


def test_a_device_with_credentials_and_no_keys_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(DeviceKeysError, match="--unsigned"):
        device_signing("dev-0", tmp_path, signing_key=None, server_key=None, unsigned=False, credentials=True)
    assert device_signing("dev-0", tmp_path, signing_key=None, server_key=None, unsigned=True,
                          credentials=True).key is None
    assert "loopback demo" in device_signing("dev-0", tmp_path, signing_key=None, server_key=None, unsigned=False,
                                             credentials=False).description


def test_a_device_takes_its_keys_from_flags_or_the_bundle(tmp_path: Path) -> None:
    key, pub = _keys_on_disk(tmp_path)
    signed = device_signing("dev-0", tmp_path / "none", signing_key=key, server_key=pub, unsigned=False,
                            credentials=True)
    assert signed.key.key_id == "dev-0" and SERVER_KEY_ID in signed.server_keys
    with pytest.raises(DeviceKeysError, match="--server-key"):
        device_signing("dev-0", tmp_path / "none", signing_key=key, server_key=None, unsigned=False, credentials=False)
    bundle = tmp_path / "bundle"
    (bundle / "keys").mkdir(parents=True)
    os.replace(key, bundle / "keys" / "device.key")
    os.replace(pub, bundle / "keys" / "server.pub")
    assert device_signing("dev-0", bundle, signing_key=None, server_key=None, unsigned=False,
                          credentials=True).key is not None


def test_the_server_config_makes_unsigned_mode_explicit_for_a_fleet() -> None:
    from server_runtime.config import ConfigError, parse_config

    fleet = '[broker]\nurl = "mqtts://127.0.0.1:8883"\nusername = "sflam-server"\n'
    with pytest.raises(ConfigError, match="signing = 'off' to run unsigned"):
        parse_config(fleet)
    assert not parse_config(fleet + '[security]\nsigning = "off"\n').security.signed
    with pytest.raises(ConfigError, match="needs security.signing_key"):
        parse_config(fleet + '[security]\nsigning = "ed25519"\n')
    assert not parse_config("").security.signed  # a loopback demo: auto is off


def test_the_server_refuses_a_signing_key_that_is_not_the_fleets(tmp_path: Path) -> None:
    from server_runtime.config import parse_config
    from server_runtime.signing import SigningSetupError, load_signing

    # Prepare: fleet.json lists SERVER's public key; one key file is SERVER's, one another key
    fleet = tmp_path / "fleet.json"
    _write_fleet(fleet, [DEV0])
    right, wrong = tmp_path / "server.key", tmp_path / "other.key"
    for path, key in ((right, SERVER), (wrong, THIEF)):
        path.write_bytes(key.pem())
        path.chmod(0o600)
    text = '[security]\nsigning = "ed25519"\nsigning_key = "{}"\ndevice_keys = "' + str(fleet) + '"\n'
    # Execute / Assert
    signing = load_signing(parse_config(text.format(right)))
    assert signing.key.public_bytes == SERVER.public_bytes and "dev-0" in signing.keys
    with pytest.raises(SigningSetupError, match="is not the server key listed"):
        load_signing(parse_config(text.format(wrong)))


def test_a_device_host_checks_a_chunked_signed_broadcast_once_for_all_its_devices() -> None:
    from edge_runtime.host import SharedDecoder

    # Prepare: a model broadcast in signed chunks, and two devices' receivers sharing one decoder
    model = p.ModelWeights(p.Envelope(RUN, 1, SERVER_KEY_ID, 0, 1.0), 1,
                           p.weights_from_numpy({"w": np.ones(50_000, np.float32)}))
    frames = p.split(model, 50_000, SERVER)
    shared, ring = SharedDecoder(), _ring(SERVER)  # a host's devices share the server's key ring too
    # Execute
    got = []
    for _ in range(2):
        receiver = p.Receiver(RUN, keys=ring, broadcast_decode=shared)
        got.append([receiver.accept(f, TOPICS.retained_part("model", i)) for i, f in enumerate(frames)][-1])
    # Assert: the second device got the first one's message: its chunks and the frame they carry
    # were decoded and verified once
    assert got[0] == model and got[1] is got[0]
    assert shared.hits == len(frames) + 1
