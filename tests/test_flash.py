"""``sflam flash``: target URLs, the ssh and adb command plans, and real flashes over loopback.

The ssh tests start their own sshd on a free 127.0.0.1 port (host key, user key, known_hosts and
authorized_keys all in tmp) and flash a bundle made by the real ``sflam export``, whose
``launch.sh --check`` then runs on the "device"; the adb tests use a fake ``adb`` that copies
into a tmp "phone". Plans are tested on a small hand-made bundle (no torch needed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.flash import (
    FlashError,
    FlashOptions,
    HashMismatch,
    SshOptions,
    Target,
    check_step,
    cmd_flash,
    execute,
    flash,
    Step,
    parse_target,
    plan_adb,
    plan_ssh,
    render_unit,
    run_step,
    verify_remote,
)

REPO = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")
UNIT_TEMPLATE = "[Unit]\nDescription=sflam\n\n[Service]\nWorkingDirectory=@BUNDLE@\nExecStart=@BUNDLE@/launch.sh\n"
# A stand-in launcher: the real integrity check of edge_runtime, run by the chosen interpreter.
LAUNCHER = """#!/bin/sh
here=$(cd "$(dirname "$0")" && pwd)
exec "${SFLAM_PYTHON:-python3}" -c 'import sys
from edge_runtime.bundle import verify_bundle
problems = verify_bundle(sys.argv[1])
print("bundle integrity: " + ("FAILED: " + "; ".join(problems) if problems else "ok"))
sys.exit(1 if problems else 0)' "$here" "$@"
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bundle(root: Path) -> Path:
    """A small hand-made bundle: real sha256s, an executable launcher, a unit template."""
    bundle = root / "bundle"
    bundle.mkdir()
    contents = {
        "model.onnx": os.urandom(3000), "weights.safetensors": os.urandom(1200), "check.npz": os.urandom(500),
        "device.json": b'{"batch_size": 2}\n', "launch.sh": LAUNCHER.encode(),
        "sflam-device.service": UNIT_TEMPLATE.encode(),
    }
    for name, data in contents.items():
        (bundle / name).write_bytes(data)
    (bundle / "launch.sh").chmod(0o755)
    files = {n: {"sha256": _sha256(bundle / n), "bytes": len(d)} for n, d in contents.items()}
    manifest = {"format_version": 1, "sflam_version": "0.1.0", "preset": "vit_quick_patch4_16", "config": {},
                "files": files}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


# --- target URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://pi@raspberrypi.local/home/pi/sflam", Target("ssh", "/home/pi/sflam", host="raspberrypi.local", user="pi")),
        ("ssh://root@127.0.0.1:2222/opt/sflam/", Target("ssh", "/opt/sflam", host="127.0.0.1", user="root", port=2222)),
        ("ssh://nvidia@[fe80::1]:22/srv/b1", Target("ssh", "/srv/b1", host="fe80::1", user="nvidia", port=22)),
        ("adb://emulator-5554/sdcard/sflam", Target("adb", "/sdcard/sflam", serial="emulator-5554")),
        ("adb://192.168.1.20:5555/data/local/tmp/sflam", Target("adb", "/data/local/tmp/sflam", serial="192.168.1.20:5555")),
    ],
)
def test_good_targets_parse(url: str, expected: Target) -> None:
    assert parse_target(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pi@host:/home/pi/sflam", "expected ssh://user@host[:port]/abs/path or adb://SERIAL/abs/path"),
        ("http://pi@host/x", "expected ssh://"),
        ("ssh://host/home/pi/sflam", "missing user"),
        ("ssh://@host/x", "missing user"),
        ("ssh://pi:secret@host/x", "passwords are not accepted"),
        ("ssh://-oProxyCommand=sh@host/x", "invalid user name"),
        ("ssh://pi@-oProxyCommand=sh/x", "invalid or missing host"),
        ("ssh://pi@host:99999/x", "port must be a number in 1..65535"),
        ("ssh://pi@host:0/x", "port must be a number in 1..65535"),
        ("ssh://pi@host:ssh/x", "port must be a number in 1..65535"),
        ("ssh://pi@host:/x", "port must be a number in 1..65535"),
        ("ssh://pi@host", "no directory"),
        ("ssh://pi@host/", "no directory"),
        ("ssh:pi@host/relative", "must be absolute"),
        ("ssh://pi@host/home/../etc", "must not contain . or .. segments"),
        ("ssh://pi@host/home/a b", "may contain only letters, digits"),
        ("ssh://pi@host/x;reboot", "may contain only letters, digits"),
        ("ssh://pi@host/x?port=1", "no ?query"),
        ("adb:///sdcard/sflam", "missing device serial"),
        ("adb://-s/sdcard/sflam", "missing device serial"),
    ],
)
def test_bad_targets_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(FlashError, match="target .*") as err:
        parse_target(url)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI shows it as a one-line error


# --- plans (nothing runs) ------------------------------------------------------------------


def test_adb_plan_is_exact(tmp_path: Path) -> None:
    # Prepare
    bundle, staging = make_bundle(tmp_path), tmp_path / "staging"
    staging.mkdir()
    adb = ("adb", "-s", "emulator-5554")
    names = ["manifest.json", "check.npz", "device.json", "launch.sh", "model.onnx", "sflam-device.service",
             "weights.safetensors"]
    # Execute
    steps = plan_adb(bundle, parse_target("adb://emulator-5554/sdcard/sflam"), staging)
    # Assert: mkdir, one push per file (manifest first), checksums and runner, then verify.
    assert [s.argv for s in steps] == [
        (*adb, "shell", "mkdir -p /sdcard/sflam"),
        *[(*adb, "push", str(bundle / n), f"/sdcard/sflam/{n}") for n in names],
        (*adb, "push", str(staging / "SHA256SUMS"), "/sdcard/sflam/SHA256SUMS"),
        (*adb, "push", str(staging / "run-termux.sh"), "/sdcard/sflam/run-termux.sh"),
        (*adb, "shell", "cd /sdcard/sflam && sha256sum -c SHA256SUMS && echo sflam-verify-ok"),
    ]
    sums = dict(reversed(line.split("  ")) for line in (staging / "SHA256SUMS").read_text().splitlines())
    assert sums == {n: _sha256(bundle / n) for n in names}
    assert "pip install 'sflam[edge]==0.1.0'" in (staging / "run-termux.sh").read_text()


def test_ssh_plan_steps_and_options(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    target = parse_target("ssh://pi@127.0.0.1:2222/home/pi/sflam")
    ssh = SshOptions(identity=Path("/k/id"), known_hosts=Path("/k/known"), extra=("LogLevel=ERROR",))
    steps = plan_ssh(bundle, target, FlashOptions(ssh=ssh))
    assert [s.name for s in steps] == ["create remote dir", "copy bundle", "verify hashes", "python environment",
                                       "launch.sh --check", "systemd unit"]
    assert steps[0].argv == (
        "ssh", "-p", "2222", "-i", "/k/id", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
        "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=/k/known", "-o", "LogLevel=ERROR", "--",
        "pi@127.0.0.1", steps[0].argv[-1],
    )
    assert steps[0].argv[-1].startswith("mkdir -p -- /home/pi/sflam && ")
    assert steps[1].argv[-1] == "tar -xf - -C /home/pi/sflam"
    assert [name for name, _ in steps[1].stdin.members][0] == "manifest.json" and len(steps[1].stdin.members) == 7
    assert steps[2].argv[-1] == "cd /home/pi/sflam && sha256sum -c -"
    assert f"{_sha256(bundle / 'model.onnx')}  model.onnx\n".encode() in steps[2].stdin
    assert steps[3].argv[-1] == ("cd /home/pi/sflam && python3 -m venv .venv && "
                                 ".venv/bin/pip install -q 'sflam[edge]==0.1.0'")
    assert steps[4].argv[-1] == "cd /home/pi/sflam && ./launch.sh --check"
    assert "sudo -n systemctl enable sflam-device.service" in steps[5].argv[-1]  # not root: sudo


def test_ssh_plan_with_wheels_or_an_existing_interpreter(tmp_path: Path) -> None:
    bundle, wheel = make_bundle(tmp_path), tmp_path / "sflam-0.1.0-py3-none-any.whl"
    target = parse_target("ssh://root@127.0.0.1/opt/sflam")
    wheels = plan_ssh(bundle, target, FlashOptions(wheels=(wheel,), pip_args=("--no-index",), unit=False))
    assert [s.name for s in wheels][3:] == ["copy wheels", "python environment", "launch.sh --check"]
    assert wheels[3].stdin.members == (("sflam-0.1.0-py3-none-any.whl", wheel),)
    assert wheels[4].argv[-1].endswith(".venv/bin/pip install -q --no-index --find-links wheels 'sflam[edge]==0.1.0'")
    given = plan_ssh(bundle, target, FlashOptions(remote_python="/usr/bin/python3.11"))
    assert [s.name for s in given][3:] == ["launch.sh --check", "systemd unit"]  # no venv
    assert given[3].argv[-1] == "cd /opt/sflam && SFLAM_PYTHON=/usr/bin/python3.11 ./launch.sh --check"
    assert given[4].argv[-1].count("sudo") == 0  # root needs no sudo
    assert b"Environment=SFLAM_PYTHON=/usr/bin/python3.11" in given[4].stdin


def test_unit_is_rendered_for_its_location() -> None:
    target = parse_target("ssh://pi@host/home/pi/b1")
    unit = render_unit(UNIT_TEMPLATE, target, "/opt/py/bin/python")
    assert "WorkingDirectory=/home/pi/b1\nExecStart=/home/pi/b1/launch.sh" in unit
    assert "[Service]\nEnvironment=SFLAM_PYTHON=/opt/py/bin/python\n" in unit
    assert "@BUNDLE@" not in render_unit(UNIT_TEMPLATE, target, None)


def test_a_corrupt_local_bundle_is_not_flashed(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(FlashError, match=r"not sound; re-export it:\n  model.onnx: 9 bytes"):
        plan_ssh(bundle, parse_target("ssh://pi@host/x"), FlashOptions())


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh here: a dry run must not need it
    args = argparse.Namespace(
        bundle=str(make_bundle(tmp_path)), target="ssh://pi@127.0.0.1:2222/home/pi/sflam", remote_python=None,
        no_venv=True, no_unit=True, dry_run=True, wheel=None, pip_arg=None, identity=None, known_hosts=None,
        ssh_config=None, ssh_option=None,
    )
    assert cmd_flash(args) == 0
    out = capsys.readouterr().out
    assert "(nothing run)" in out and out.count("\n  ") == 4
    assert "3. verify hashes: ssh -p 2222 -o BatchMode=yes" in out
    assert "'cd /home/pi/sflam && sha256sum -c -'  < checksum list of 7 files" in out


def test_a_device_that_stops_reading_still_times_out() -> None:
    stalled = Step("copy bundle", ("sleep", "30"), stdin=b"x" * (8 << 20), timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(FlashError, match=r"copy bundle timed out after 0.5 s"):
        run_step(stalled, "nowhere")
    assert time.monotonic() - start < 5


# --- adb, executed against a fake adb ------------------------------------------------------

# Like adb before Android 7, this one exits 0 even when the device command fails.
FAKE_ADB = """#!/bin/sh
[ "$1" = "-s" ] || exit 1
shift 2
case "$1" in
  push) cp "$2" "$3" ;;
  shell) shift; sh -c "$*" ;;
esac
exit 0
"""


def test_adb_absent_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FlashError, match=r"`adb` is not on PATH; install Android platform-tools"):
        flash(make_bundle(tmp_path), parse_target("adb://emulator-5554/sdcard/sflam"))


def test_adb_flash_copies_verifies_and_names_a_corrupt_file(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a fake adb on PATH; the "phone" is a tmp directory.
    bin_dir, phone = tmp_path / "bin", tmp_path / "phone" / "sflam"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    bundle, target = make_bundle(tmp_path), parse_target(f"adb://emulator-5554{phone}")
    lines: list[str] = []
    # Execute
    flash(bundle, target, progress=lines.append)
    # Assert: every file arrived intact, with the runner; then a corrupted copy is named.
    for name in json.loads((bundle / "manifest.json").read_text())["files"]:
        assert _sha256(phone / name) == _sha256(bundle / name)
    assert (phone / "run-termux.sh").is_file() and lines[-1] == "[11/11] verify hashes ..."
    (phone / "weights.safetensors").write_bytes(b"bit rot")
    (tmp_path / "staging").mkdir()
    verify = plan_adb(bundle, target, tmp_path / "staging")[-1]
    with pytest.raises(HashMismatch, match="weights.safetensors does not match the manifest") as err:
        execute([verify], target)
    assert err.value.files == ("weights.safetensors",)


# --- ssh, executed against a real sshd on loopback ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_sshd() -> None:
    if not SSHD.exists():  # `make setup` installs it; try the same script once
        subprocess.run([str(REPO / "scripts" / "ensure-sshd.sh")], check=False, timeout=600)
    if not SSHD.exists():
        pytest.skip("/usr/sbin/sshd is missing and scripts/ensure-sshd.sh could not install openssh-server "
                    "(needs root and apt-get)")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _sshd_config(home: Path, port: int) -> Path:
    config = home / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {home / 'host_key'}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nLogLevel VERBOSE\n"
    )
    return config


def _wait_listening(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited ({proc.returncode}): {log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within 10 s: {log.read_text()}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> tuple[int, SshOptions]:
    """A private sshd on a free loopback port and the client options that reach it."""
    _ensure_sshd()
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as root (tests run as root)")
    home = tmp_path_factory.mktemp("sshd")
    _keygen(home / "host_key")
    _keygen(home / "user_key")
    (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), home / "sshd.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(_sshd_config(home, port))],
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        _wait_listening(proc, port, log)
        yield port, SshOptions(identity=home / "user_key", known_hosts=home / "known_hosts", config=Path("/dev/null"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def exported_bundle(tmp_path_factory) -> Path:
    """A real bundle, made the way a user makes one."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    command = [sys.executable, "-m", "sflam", "export", "--model", "vit_quick_patch4_16", "--profile",
               "raspberry-pi-5", "--formats", "onnx", "--batch", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ssh_flash_verifies_and_checks_remotely_then_catches_corruption(
    sshd, exported_bundle: Path, tmp_path: Path
) -> None:
    # Prepare
    port, ssh = sshd
    bundle, remote = exported_bundle, tmp_path / "device" / "sflam"
    target = parse_target(f"ssh://root@127.0.0.1:{port}{remote}")
    options = FlashOptions(remote_python=sys.executable, venv=False, unit=False, ssh=ssh)
    lines: list[str] = []
    # Execute
    flash(bundle, target, options, progress=lines.append)
    # Assert: files arrived intact and executable; the remote launcher's check passed.
    for name in json.loads((bundle / "manifest.json").read_text())["files"]:
        assert _sha256(remote / name) == _sha256(bundle / name), name
    assert os.access(remote / "launch.sh", os.X_OK)
    assert lines[:4] == ["[1/4] create remote dir ...", "[2/4] copy bundle ...", "[3/4] verify hashes ...",
                         "[4/4] launch.sh --check ..."]
    assert lines[4].startswith("    bundle integrity: ok (")  # what the device's launcher printed
    assert lines[5].startswith('    forward check: ok {"backend": "onnx"')  # the given interpreter ran it
    assert f"[127.0.0.1]:{port}" in ssh.known_hosts.read_text()  # host key accepted on first use
    # Corrupt a file on the device: the remote re-verify names it, and the remote check fails.
    with open(remote / "forward.onnx", "r+b") as handle:
        handle.write(b"\x00\x01")
    with pytest.raises(HashMismatch, match=r"failed on root@127.0.0.1: forward.onnx does not match the manifest") as err:
        verify_remote(bundle, target, ssh)
    assert err.value.files == ("forward.onnx",)
    with pytest.raises(FlashError, match=r"(?s)launch.sh --check failed on root@127.0.0.1 \(exit 1\):\n.*forward.onnx"):
        execute([check_step(target, options)], target)


@pytest.mark.slow
def test_ssh_errors_carry_the_step_and_remote_stderr(sshd, tmp_path: Path) -> None:
    port, ssh = sshd
    bundle = make_bundle(tmp_path)
    target = parse_target(f"ssh://root@127.0.0.1:{port}/proc/sflam")  # mkdir under /proc fails
    with pytest.raises(FlashError, match=r"create remote dir failed on root@127.0.0.1 \(exit 1\):\n.*/proc/sflam"):
        flash(bundle, target, FlashOptions(venv=False, unit=False, ssh=ssh))
    stranger = SshOptions(identity=tmp_path / "nokey", known_hosts=ssh.known_hosts, config=Path("/dev/null"))
    with pytest.raises(FlashError, match=r"(?s)create remote dir failed .*\(exit 255\).*Permission denied"):
        flash(bundle, parse_target(f"ssh://root@127.0.0.1:{port}/tmp/x"), FlashOptions(ssh=stranger))


@pytest.mark.slow
def test_ssh_unit_step_reports_missing_systemd(sshd, exported_bundle: Path, tmp_path: Path) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd; the test would install a real unit")
    port, ssh = sshd
    bundle, remote = exported_bundle, tmp_path / "device"
    target = parse_target(f"ssh://root@127.0.0.1:{port}{remote}")
    lines: list[str] = []
    steps = plan_ssh(bundle, target, FlashOptions(remote_python=sys.executable, ssh=ssh))
    execute(steps, target, lines.append)
    assert lines[-2:] == ["[5/5] systemd unit ...",
                          "    no systemd on root@127.0.0.1: unit not installed"]
    assert not Path("/etc/systemd/system/sflam-device.service").exists()
    unit = steps[-1].stdin.decode()  # the export's real template, rendered for this device
    assert f"WorkingDirectory={remote}\n" in unit and f"Environment=SFLAM_PYTHON={sys.executable}\n" in unit
    assert "@BUNDLE@" not in unit
