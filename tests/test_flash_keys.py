"""``sflam flash --fleet DIR --device-id ID``: the device's signing keys travel with the bundle.

Each test writes its own small fleet (fresh Ed25519 keys, a minimal fleet.json) in tmp, so it does
not depend on ``sflam fleet provision``. Plans are checked for the key upload (a tar on stdin, the
private key 0600) and for key bytes in any argv or printed line; the adb path runs against the fake
adb of tests/test_flash.py, and one real flash goes to its loopback sshd.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_flash import FAKE_ADB, make_bundle, sshd  # noqa: F401  (sshd: the loopback sshd fixture)

from edge_runtime.device_keys import device_signing
from edge_runtime.protocol.signing import SigningKey, public_b64
from export.flash import FlashOptions, Upload, _write_tar, flash, parse_target, plan_adb, plan_ssh, verify_remote
from export.flash_keys import FleetKeyError, adb_key_report, fleet_device_keys, ssh_install_command
from sflam.cli import main

DEVICE_IDS = [f"dev-{i}" for i in range(7)]
REVOKED_AT = "2025-03-04T05:06:07+00:00"


@pytest.fixture()
def fleet_dir(tmp_path: Path) -> tuple[Path, dict[str, SigningKey], SigningKey]:
    """A provisioned-looking fleet: keys/server.pub (0644), keys/devices/<id>.key (0600), fleet.json
    listing dev-0..dev-6 and, under "revoked", dev-9 (whose key file is still there)."""
    fleet = tmp_path / "fleet"
    (fleet / "keys" / "devices").mkdir(parents=True)
    server = SigningKey.generate("server")
    (fleet / "keys" / "server.pub").write_bytes(server.public_pem())
    (fleet / "keys" / "server.pub").chmod(0o644)
    keys = {d: SigningKey.generate(d) for d in [*DEVICE_IDS, "dev-9"]}
    for device_id, key in keys.items():
        (fleet / "keys" / "devices" / f"{device_id}.key").write_bytes(key.pem())
        (fleet / "keys" / "devices" / f"{device_id}.key").chmod(0o600)
    doc = {"server": {"public_key": public_b64(server.public_bytes)},
           "devices": [{"id": d, "signing_key_file": f"keys/devices/{d}.key",
                        "public_key": public_b64(keys[d].public_bytes)} for d in DEVICE_IDS],
           "revoked": [{"id": "dev-9", "public_key": public_b64(keys["dev-9"].public_bytes), "revoked_at": REVOKED_AT}]}
    (fleet / "fleet.json").write_text(json.dumps(doc, indent=2))
    return fleet, keys, server


def key_body(key: SigningKey) -> str:
    """The secret part of a PEM private key (its base64 line), which must never be shown or passed."""
    (body,) = [line for line in key.pem().decode().splitlines() if not line.startswith("-----")]
    return body


def edit_fleet(fleet: Path, change) -> None:
    doc = json.loads((fleet / "fleet.json").read_text())
    change(doc)
    (fleet / "fleet.json").write_text(json.dumps(doc))


# --- plans (nothing runs) ------------------------------------------------------------------


def test_the_ssh_plan_uploads_the_keys_on_stdin_with_the_private_key_0600(fleet_dir, tmp_path: Path) -> None:
    # Prepare
    fleet, keys, server = fleet_dir
    bundle, target = make_bundle(tmp_path), parse_target("ssh://pi@jetson.local/home/pi/sflam")
    device_keys = fleet_device_keys(fleet, "dev-1")
    # Execute
    steps = plan_ssh(bundle, target, FlashOptions(keys=device_keys, unit=False))
    # Assert: the key step follows the verify, reads a tar on stdin and sets the modes
    assert [s.name for s in steps] == ["create remote dir", "copy bundle", "verify hashes", "install keys",
                                       "python environment", "launch.sh --check"]
    install = steps[3]
    assert install.stdin == Upload((("keys/device.key", fleet / "keys/devices/dev-1.key"),
                                    ("keys/server.pub", fleet / "keys/server.pub")))
    assert install.argv[-1] == ssh_install_command("/home/pi/sflam")
    assert install.argv[-1].startswith("cd /home/pi/sflam && umask 077 && mkdir -p keys && chmod 700 keys && "
                                       "tar -xf - && chmod 600 keys/device.key && chmod 644 keys/server.pub && ")
    stream = io.BytesIO()
    _write_tar(stream, install.stdin)
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tar:
        members = {m.name: (m.mode, tar.extractfile(m).read()) for m in tar.getmembers()}
    assert members == {"keys/device.key": (0o600, keys["dev-1"].pem()), "keys/server.pub": (0o644, server.public_pem())}
    # ... and no step's argv or description holds key material
    secret = key_body(keys["dev-1"])
    assert all(secret not in arg for step in steps for arg in step.argv)
    assert all(secret not in step.describe() for step in steps)


def test_the_adb_plan_pushes_the_keys_then_protects_them(fleet_dir, tmp_path: Path) -> None:
    fleet, keys, _ = fleet_dir
    staging = tmp_path / "staging"
    staging.mkdir()
    adb = ("adb", "-s", "R58M123ABC")
    steps = plan_adb(make_bundle(tmp_path), parse_target("adb://R58M123ABC/sdcard/sflam"), staging,
                     fleet_device_keys(fleet, "dev-4"))
    assert steps[0].argv == (*adb, "shell", "mkdir -p /sdcard/sflam /sdcard/sflam/keys")
    assert [s.argv for s in steps[-4:-1]] == [
        (*adb, "push", str(fleet / "keys/devices/dev-4.key"), "/sdcard/sflam/keys/device.key"),
        (*adb, "push", str(fleet / "keys/server.pub"), "/sdcard/sflam/keys/server.pub"),
        (*adb, "shell", "chmod 700 /sdcard/sflam/keys 2>/dev/null; chmod 600 /sdcard/sflam/keys/device.key "
                        "2>/dev/null; echo sflam-key-mode=$(stat -c %a /sdcard/sflam/keys/device.key)"),
    ]
    assert steps[-2].expect == "sflam-key-mode=" and steps[-1].name == "verify hashes"
    assert "keys" not in (staging / "SHA256SUMS").read_text()  # outside the manifest: not hash-checked
    assert all(key_body(keys["dev-4"]) not in arg for step in steps for arg in step.argv)


def test_a_dry_run_with_a_fleet_shows_the_key_step_and_no_key(fleet_dir, tmp_path: Path, capsys) -> None:
    fleet, keys, _ = fleet_dir
    argv = ["flash", "--bundle", str(make_bundle(tmp_path)), "--target", "ssh://pi@127.0.0.1:2222/home/pi/sflam",
            "--no-venv", "--no-unit", "--dry-run", "--fleet", str(fleet), "--device-id", "dev-2"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "  4. install keys: ssh -p 2222 -o BatchMode=yes" in out
    assert (f"  < tar of {fleet / 'keys/devices/dev-2.key'} as keys/device.key and {fleet / 'keys/server.pub'} "
            "as keys/server.pub\n") in out
    assert key_body(keys["dev-2"]) not in out + err


@pytest.mark.parametrize(("said", "line"), [
    ("sflam-key-mode=600\n", "    keys/device.key is 0600 on the phone"),
    ("sflam-key-mode=660\n", "    keys/device.key is mode 660 on the phone: this storage does not keep modes, so "
                             "apps with storage access can read it; run-termux.sh makes its own copy 0600 (delete "
                             "this one after the first run)"),
    ("sflam-key-mode=\n", "    keys/device.key is mode unknown on the phone: this storage"),
])
def test_the_adb_key_mode_is_reported(said: str, line: str) -> None:
    assert adb_key_report(said).startswith(line)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "message"), [
    (["--fleet", "FLEET"], "--fleet needs --device-id: --fleet DIR --device-id ID install that provisioned"),
    (["--device-id", "dev-1"], "--device-id needs --fleet: "),
])
def test_fleet_and_device_id_go_together(fleet_dir, tmp_path: Path, capsys, given: list[str], message: str) -> None:
    # Execute: the bundle does not exist; the half-given pair is refused first
    argv = ["flash", "--bundle", str(tmp_path / "absent"), "--target", "ssh://pi@host/home/pi/sflam", "--dry-run",
            *[str(fleet_dir[0]) if arg == "FLEET" else arg for arg in given]]
    code = main(argv)
    # Assert
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"sflam flash: error: {message}")


def test_an_unknown_device_names_the_likely_one_and_a_few_known_ids(fleet_dir) -> None:
    fleet = fleet_dir[0]
    with pytest.raises(FleetKeyError) as err:
        fleet_device_keys(fleet, "dev_3")
    assert str(err.value) == (f"no device 'dev_3' in {fleet / 'fleet.json'} (did you mean 'dev-3'?); known ids: "
                              "dev-0, dev-1, dev-2, dev-3, dev-4 and 2 more")
    edit_fleet(fleet, lambda doc: doc.update(devices=[]))
    with pytest.raises(FleetKeyError, match=r"no device 'dev-1' in .*fleet.json; it lists no devices$"):
        fleet_device_keys(fleet, "dev-1")


def test_a_revoked_device_is_refused_even_with_its_key_file_present(fleet_dir) -> None:
    fleet = fleet_dir[0]
    assert (fleet / "keys/devices/dev-9.key").is_file()
    with pytest.raises(FleetKeyError) as err:
        fleet_device_keys(fleet, "dev-9")
    assert str(err.value) == (f"device 'dev-9' was revoked at {REVOKED_AT} ({fleet / 'fleet.json'} lists it under "
                              "\"revoked\"): its keys are not flashed; give the board a new device id")
    edit_fleet(fleet, lambda doc: doc.update(revoked=["dev-2"]))  # a bare id in the list is refused too
    with pytest.raises(FleetKeyError, match=r"^device 'dev-2' was revoked \("):
        fleet_device_keys(fleet, "dev-2")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610], ids=lambda mode: f"{mode:04o}")
def test_a_key_file_open_to_group_or_others_is_refused(fleet_dir, mode: int) -> None:
    fleet, keys, _ = fleet_dir
    (fleet / "keys/devices/dev-1.key").chmod(mode)
    with pytest.raises(FleetKeyError) as err:
        fleet_device_keys(fleet, "dev-1")
    assert str(err.value) == (f"signing key {fleet / 'keys/devices/dev-1.key'} is open to group or others (mode "
                              f"{mode:04o}): not flashed; chmod 600 it, and consider the key exposed if others "
                              "could read it")
    assert key_body(keys["dev-1"]) not in str(err.value)


def test_a_read_only_or_linked_key_is_accepted_and_sent_as_a_file(fleet_dir, tmp_path: Path) -> None:
    fleet, keys, _ = fleet_dir
    (fleet / "keys/devices/dev-1.key").chmod(0o400)
    assert fleet_device_keys(fleet, "dev-1").signing_key == fleet / "keys/devices/dev-1.key"
    (fleet / "keys/devices/dev-2.key").rename(tmp_path / "elsewhere.key")
    (fleet / "keys/devices/dev-2.key").symlink_to(tmp_path / "elsewhere.key")
    linked = fleet_device_keys(fleet, "dev-2")
    stream = io.BytesIO()
    _write_tar(stream, Upload(linked.members))
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tar:
        member = tar.getmember("keys/device.key")
        assert member.isfile() and tar.extractfile(member).read() == keys["dev-2"].pem()


def test_broken_fleets_are_refused_with_the_reason(fleet_dir) -> None:
    fleet, keys, _ = fleet_dir

    def refused(match: str) -> None:
        with pytest.raises(FleetKeyError, match=match) as err:
            fleet_device_keys(fleet, "dev-1")
        assert key_body(keys["dev-1"]) not in str(err.value)

    (fleet / "keys/devices/dev-2.key").rename(fleet / "keys/devices/dev-1.key")  # dev-2's key under dev-1's name
    refused(r"dev-1.key does not match the device public key in fleet.json; .*provision it again")
    (fleet / "keys/devices/dev-1.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    refused(r"dev-1.key: not an unencrypted PEM private key")
    (fleet / "keys/devices/dev-1.key").unlink()
    refused(r"^device 'dev-1''s signing_key_file .*dev-1.key is missing; was the fleet provisioned completely\?$")
    edit_fleet(fleet, lambda doc: doc["devices"][1].update(signing_key_file="../../etc/shadow"))
    refused(r"signing_key_file '../../etc/shadow' is not a path inside the fleet$")
    edit_fleet(fleet, lambda doc: doc["devices"][1].update(signing_key_file="/etc/shadow"))
    refused(r"signing_key_file '/etc/shadow' is not a path inside the fleet$")
    (fleet / "keys/server.pub").write_bytes(SigningKey.generate("other").public_pem())
    edit_fleet(fleet, lambda doc: doc["devices"][1].update(signing_key_file="keys/devices/dev-3.key",
                                                           public_key=doc["devices"][3]["public_key"]))
    refused(r"server.pub does not match the server public key in fleet.json")
    (fleet / "fleet.json").write_text("{not json")
    refused(r"fleet.json: not JSON")
    (fleet / "fleet.json").unlink()
    refused(r"fleet.json: No such file or directory \(is .* a fleet from `sflam fleet provision`\?\)$")


# --- adb, executed against the fake adb ----------------------------------------------------


def test_an_adb_flash_installs_the_keys_and_the_termux_runner_makes_its_copy_0600(
    fleet_dir, tmp_path: Path, monkeypatch
) -> None:
    # Prepare: the fake adb; the "phone" is a tmp directory
    fleet, keys, server = fleet_dir
    bin_dir, phone = tmp_path / "bin", tmp_path / "phone" / "sflam"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    # Execute
    flash(make_bundle(tmp_path), parse_target(f"adb://emulator-5554{phone}"),
          FlashOptions(keys=fleet_device_keys(fleet, "dev-5")), progress=lines.append)
    # Assert: the keys arrived, the private one 0600 (this file system keeps modes), and the hashes passed
    assert (phone / "keys/device.key").read_bytes() == keys["dev-5"].pem()
    assert (phone / "keys/server.pub").read_bytes() == server.public_pem()
    assert stat.S_IMODE((phone / "keys/device.key").stat().st_mode) == 0o600
    assert lines[-3:] == ["[13/14] protect keys ...", "    keys/device.key is 0600 on the phone",
                          "[14/14] verify hashes ..."]
    # Shared storage shows every file 0660: the runner's copy in Termux's home is made 0600 again
    (phone / "keys/device.key").chmod(0o660)
    home = tmp_path / "termux-home"
    env = {**os.environ, "SFLAM_HOME": str(home), "SFLAM_PYTHON": sys.executable}
    done = subprocess.run(["sh", str(phone / "run-termux.sh"), "--check"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bundle integrity: ok")  # keys/ is outside the manifest
    copy = home / "sflam" / "keys"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700 and stat.S_IMODE((copy / "device.key").stat().st_mode) == 0o600
    signing = device_signing("dev-5", home / "sflam", signing_key=None, server_key=None, unsigned=False,
                             credentials=True)
    assert signing.key.public_bytes == keys["dev-5"].public_bytes


# --- ssh, executed against the loopback sshd of tests/test_flash.py ------------------------


@pytest.mark.slow
def test_a_real_ssh_flash_installs_the_device_key_0600_and_the_checks_still_pass(
    sshd, fleet_dir, tmp_path: Path, capsys  # noqa: F811
) -> None:
    # Prepare
    port, ssh = sshd
    fleet, keys, server = fleet_dir
    bundle, remote = make_bundle(tmp_path), tmp_path / "device" / "sflam"
    url = f"ssh://root@127.0.0.1:{port}{remote}"
    argv = ["flash", "--bundle", str(bundle), "--target", url, "--remote-python", sys.executable, "--no-venv",
            "--no-unit", "--identity", str(ssh.identity), "--known-hosts", str(ssh.known_hosts),
            "--ssh-config", str(ssh.config), "--fleet", str(fleet), "--device-id", "dev-1"]
    # Execute: `sflam flash` as a user runs it
    code = main(argv)
    # Assert: the steps, the launcher's check (keys are outside the manifest) and the final line
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert out.splitlines()[1:] == [
        "[1/5] create remote dir ...", "[2/5] copy bundle ...", "[3/5] verify hashes ...", "[4/5] install keys ...",
        "[5/5] launch.sh --check ...", "    bundle integrity: ok", f"done: root@127.0.0.1:{remote} verified and checked",
        f"signing keys of 'dev-1' installed: {remote}/keys/device.key and {remote}/keys/server.pub",
    ]
    assert key_body(keys["dev-1"]) not in out + err
    device_key = remote / "keys" / "device.key"
    assert device_key.read_bytes() == (fleet / "keys/devices/dev-1.key").read_bytes() == keys["dev-1"].pem()
    assert stat.S_IMODE(device_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((remote / "keys").stat().st_mode) == 0o700
    assert (remote / "keys" / "server.pub").read_bytes() == server.public_pem()
    signing = device_signing("dev-1", remote, signing_key=None, server_key=None, unsigned=False, credentials=True)
    assert signing.key.public_bytes == keys["dev-1"].public_bytes  # the device finds and accepts them
    target = parse_target(url)
    verify_remote(bundle, target, ssh)  # the re-verify ignores keys/ too
    # A re-flash as another device replaces the key in place, still 0600
    options = FlashOptions(remote_python=sys.executable, venv=False, unit=False, ssh=ssh,
                           keys=fleet_device_keys(fleet, "dev-2"))
    flash(bundle, target, options, progress=lambda line: None)
    assert device_key.read_bytes() == keys["dev-2"].pem() and stat.S_IMODE(device_key.stat().st_mode) == 0o600
