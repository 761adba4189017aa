"""``sflam flash``: target URLs, the ssh and adb command plans, and real flashes over loopback.

The ssh tests start their own sshd on a free 127.0.0.1 port (host key, user key, known_hosts and
authorized_keys all in tmp) and flash a bundle made by the real ``sflam export``, whose
``launch.sh --check`` then runs on the "device"; one of them takes the default path, which builds
the device's venv from this checkout's wheel and the configured package index. The adb tests use
a fake ``adb`` that copies into a tmp "phone". Plans are tested on a small hand-made bundle (no
torch needed). They need root, /usr/sbin/sshd and no systemd (which a flash as root would change);
where one is missing they fail and say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
    ssh_argv,
    verify_remote,
)

REPO = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")
SSHD_START_TIMEOUT_S = 10.0  # a failure guard only
SYSTEMD = Path("/run/systemd/system")
UNIT_PATH = Path("/etc/systemd/system/sflam-device.service")
NO_SYSTEMD = ("this machine runs systemd: a flash as root to 127.0.0.1 would install and enable a real "
              f"{UNIT_PATH}; run the flash tests where systemd is not running (a container)")
UNIT_TEMPLATE = ("[Unit]\nDescription=sflam\n\n[Service]\nUser=@USER@\nWorkingDirectory=@BUNDLE@\n"
                 "ExecStart=@BUNDLE@/launch.sh\nReadWritePaths=@BUNDLE@\n")
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
    assert "[Service]\nEnvironment=SFLAM_PYTHON=/opt/py/bin/python\nUser=pi\n" in unit
    assert unit.endswith("ReadWritePaths=/home/pi/b1\n")
    assert "@" not in render_unit(UNIT_TEMPLATE, target, None)
    # The sandbox lines of the exported template: tests/test_flash_unit.py


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
        ssh_config=None, ssh_option=None, fleet=None, device_id=None, data=None,
    )
    assert cmd_flash(args) == 0
    out = capsys.readouterr().out
    assert "(nothing run)" in out and out.count("\n  ") == 4
    assert "3. verify hashes: ssh -p 2222 -o BatchMode=yes" in out
    assert "'cd /home/pi/sflam && sha256sum -c -'  < checksum list of 7 files" in out


def test_a_device_that_stops_reading_still_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 8 MiB for a command that never reads its stdin (the pipe fills; the feeder blocks)
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    stalled = Step("copy bundle", ("sleep", "30"), stdin=b"x" * (8 << 20), timeout_s=0.5)
    # Execute
    with pytest.raises(FlashError, match=r"^copy bundle timed out after 0.5 s$") as err:
        run_step(stalled, "nowhere")
    # Assert: the error names the step, and the stalled command was killed and reaped
    assert err.value.step == "copy bundle"
    (proc,) = started
    assert proc.returncode == -signal.SIGKILL


# --- adb, executed against a fake adb ------------------------------------------------------

# Like adb before Android 7, this one exits 0 even when the device command fails; like adb, it
# pushes a folder to a new remote path as that path (cp -r).
FAKE_ADB = """#!/bin/sh
[ "$1" = "-s" ] || exit 1
shift 2
case "$1" in
  push) cp -r "$2" "$3" ;;
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
    if not SSHD.exists():  # `make test` installs it; try the same script once
        subprocess.run([str(REPO / "scripts" / "ensure-sshd.sh")], check=False, timeout=600)
    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing and scripts/ensure-sshd.sh could not install openssh-server "
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


def _copy_log(stream, log: Path, ready_line: bytes, ready: threading.Event, said: list[bytes]) -> None:
    """Copy sshd's stderr to ``log``; set ``ready`` when it prints ``ready_line`` or when it ends."""
    with stream, open(log, "wb") as sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            if ready_line in line:
                said.append(line)
                ready.set()
    ready.set()


def _start_sshd(config: Path, port: int, log: Path) -> subprocess.Popen:
    """sshd in the foreground, logging to ``log``; returns once it has said that it listens."""
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready, said = threading.Event(), []
    ready_line = f"Server listening on 127.0.0.1 port {port}.".encode()
    threading.Thread(target=_copy_log, args=(proc.stderr, log, ready_line, ready, said), daemon=True).start()
    ready.wait(SSHD_START_TIMEOUT_S)
    if not said:
        proc.terminate()
        proc.wait(timeout=10)
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} (exit {proc.returncode}): {log.read_text()}")
    return proc


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> tuple[int, SshOptions]:
    """A private sshd on a free loopback port and the client options that reach it."""
    _ensure_sshd()
    if os.geteuid() != 0:
        pytest.fail("the loopback sshd logs in as root: run the flash tests as root (a container)")
    home = tmp_path_factory.mktemp("sshd")
    _keygen(home / "host_key")
    _keygen(home / "user_key")
    (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = _start_sshd(_sshd_config(home, port), port, home / "sshd.log")
    try:
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
    assert not SYSTEMD.is_dir(), NO_SYSTEMD
    port, ssh = sshd
    bundle, remote = exported_bundle, tmp_path / "device"
    target = parse_target(f"ssh://root@127.0.0.1:{port}{remote}")
    lines: list[str] = []
    steps = plan_ssh(bundle, target, FlashOptions(remote_python=sys.executable, ssh=ssh))
    execute(steps, target, lines.append)
    assert lines[-2:] == ["[5/5] systemd unit ...",
                          "    no systemd on root@127.0.0.1: unit not installed"]
    assert not UNIT_PATH.exists()
    unit = steps[-1].stdin.decode()  # the export's real template, rendered for this device
    assert f"WorkingDirectory={remote}\n" in unit and f"Environment=SFLAM_PYTHON={sys.executable}\n" in unit
    assert "User=root\n" in unit and f"ReadWritePaths={remote}\n" in unit and "NoNewPrivileges=yes\n" in unit
    assert "@BUNDLE@" not in unit and "@USER@" not in unit


def _not_in_the_wheels_source(directory: str, names: list[str]) -> set[str]:
    """What a copy of the checkout for ``pip wheel`` leaves out: environments, caches, build output."""
    local = {".git", ".venv", ".hypothesis", ".pytest_cache", "runs", "out", "data"} if Path(directory) == REPO else set()
    return {n for n in names if n in local | {"__pycache__", "build", "dist"} or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def sflam_wheel(tmp_path_factory) -> Path:
    """This checkout's sflam wheel (no package index has sflam), built offline from a copy of the tree
    so that setuptools' build/ and egg-info land in tmp, not in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, work / "source", ignore=_not_in_the_wheels_source)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", str(work / "dist"), str(work / "source")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (work / "dist").glob("sflam-0.1.0-*.whl")
    return wheel


@pytest.mark.slow
def test_default_ssh_flash_installs_a_torch_free_venv_from_the_wheel_and_checks_with_it(
    sshd, exported_bundle: Path, sflam_wheel: Path, tmp_path: Path
) -> None:
    # Prepare: the defaults (a venv and a unit); sflam's wheel given, its dependencies from pip's index
    assert not SYSTEMD.is_dir(), NO_SYSTEMD
    port, ssh = sshd
    remote = tmp_path / "device" / "sflam"
    url = f"ssh://root@127.0.0.1:{port}{remote}"
    command = [sys.executable, "-m", "sflam", "flash", "--bundle", str(exported_bundle), "--target", url,
               "--wheel", str(sflam_wheel), "--identity", str(ssh.identity), "--known-hosts", str(ssh.known_hosts),
               "--ssh-config", str(ssh.config)]
    # Execute: `sflam flash` as a user runs it
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO)
    # Assert: every step of the default path ran, in order; the launcher's check passed on ONNX Runtime
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("[")] == [
        "[1/7] create remote dir ...", "[2/7] copy bundle ...", "[3/7] verify hashes ...", "[4/7] copy wheels ...",
        "[5/7] python environment ...", "[6/7] launch.sh --check ...", "[7/7] systemd unit ...",
    ]
    check = lines[lines.index("[6/7] launch.sh --check ...") + 1:lines.index("[7/7] systemd unit ...")]
    assert check[0].startswith("    bundle integrity: ok (") and len(check) == 2, check
    assert check[1].startswith('    forward check: ok {"backend": "onnx"'), check
    assert lines[-3:-1] == ["    no systemd on root@127.0.0.1: unit not installed",
                            f"done: root@127.0.0.1:{remote} verified and checked"]
    assert lines[-1].startswith("no signing keys installed: start the device with --signing-key FILE --server-key "
                                "FILE, or --unsigned")  # no --fleet
    assert not (remote / "keys").exists()
    # the device's venv: sflam from the copied wheel, the edge runtime importable, torch absent
    assert (remote / "wheels" / sflam_wheel.name).read_bytes() == sflam_wheel.read_bytes()
    probe = ("import importlib.metadata as m, importlib.util as u, edge_runtime; "
             "print(edge_runtime.__file__, m.version('sflam'), u.find_spec('torch'))")
    target = parse_target(url)
    venv = subprocess.run(ssh_argv(target, ssh, f"cd {remote} && .venv/bin/python -c {shlex.quote(probe)}"),
                          capture_output=True, text=True, timeout=120)
    assert venv.returncode == 0, venv.stderr
    where, version, torch = venv.stdout.split()
    assert Path(where).is_relative_to(remote / ".venv") and version == "0.1.0" and torch == "None"
    # the unit: rendered for this directory, no interpreter pinned (launch.sh finds .venv), not installed
    unit_step = plan_ssh(exported_bundle, target, FlashOptions(wheels=(sflam_wheel,), ssh=ssh))[-1]
    unit = unit_step.stdin.decode()
    for line in (f"WorkingDirectory={remote}", f"EnvironmentFile=-{remote}/device.env",
                 f"ExecStart={remote}/launch.sh $SFLAM_DEVICE_ARGS"):
        assert f"\n{line}\n" in unit
    assert "@BUNDLE@" not in unit and "SFLAM_PYTHON" not in unit
    assert f"tee {UNIT_PATH} >/dev/null && systemctl daemon-reload" in unit_step.argv[-1]  # root: no sudo
    assert not UNIT_PATH.exists()
    shutil.rmtree(remote / ".venv")  # about 250 MB; the rest of tmp_path stays for pytest's retention
