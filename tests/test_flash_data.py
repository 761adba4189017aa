"""``sflam flash --data PATH``: a device's data shard travels with the bundle, hashed and verified there.

Each test writes its own small shard in tmp (a folder of classes.txt, manifest.csv and tiny PNGs,
or an .npz), so it does not depend on ``sflam data partition``. Plans are checked step by step;
the adb path runs against the fake adb of tests/test_flash.py and the ssh path against its
loopback sshd, where a corrupted remote file must be named by the data verify step.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_flash import FAKE_ADB, make_bundle, sshd  # noqa: F401  (sshd: the loopback sshd fixture)

from export.flash import (
    FlashError,
    FlashOptions,
    HashMismatch,
    Step,
    Upload,
    execute,
    flash,
    parse_target,
    plan_adb,
    plan_ssh,
    ssh_argv,
)
from export.flash_data import read_shard
from export.flash_keys import DeviceKeys
from sflam.cli import main

IMAGES = ("0/00000.png", "0/00001.png", "3/00012.png")


def make_folder_shard(root: Path) -> Path:
    """A shard folder as `sflam data partition --format folder` lays it out: 3 tiny PNGs in 2 classes."""
    shard = root / "dev-0"
    for number, name in enumerate(IMAGES):
        (shard / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 40 * number, np.uint8)).save(shard / name)
    (shard / "classes.txt").write_text("airplane\nautomobile\nbird\ncat\n")
    (shard / "manifest.csv").write_text("path,label\n" + "".join(f"{n},{n[0]}\n" for n in IMAGES))
    return shard


def make_npz_shard(root: Path) -> Path:
    path = root / "dev-1.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 3]))
    return path


def shard_files(shard: Path) -> dict[str, bytes]:
    return {p.relative_to(shard).as_posix(): p.read_bytes() for p in sorted(shard.rglob("*")) if p.is_file()}


def sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())).encode()


# --- reading a shard (nothing runs) -----------------------------------------------------------


def test_a_folder_shard_lists_every_file_with_its_local_sha256(tmp_path: Path) -> None:
    # Prepare
    folder = make_folder_shard(tmp_path)
    # Execute
    shard = read_shard(folder)
    # Assert: every regular file, recursively, named relative to the folder, hashed here
    expected = shard_files(folder)
    assert [name for name, _ in shard.members] == ["0/00000.png", "0/00001.png", "3/00012.png", "classes.txt",
                                                   "manifest.csv"] == sorted(expected)
    assert shard.checksums == sums(expected)
    assert shard.spec("/opt/sflam") == "folder:/opt/sflam/data"


def test_an_npz_shard_is_one_file_installed_under_its_own_name(tmp_path: Path) -> None:
    path = make_npz_shard(tmp_path)
    shard = read_shard(path)
    assert shard.members == (("dev-1.npz", path.resolve()),)
    assert shard.checksums == sums({"dev-1.npz": path.read_bytes()})
    assert shard.spec("/opt/sflam") == "npz:/opt/sflam/data/dev-1.npz"


def _symlink_inside(shard: Path) -> str:
    (shard / "3" / "link.png").symlink_to(shard / "0" / "00000.png")
    return r"3/link.png \(symbolic link\)"


def _fifo_inside(shard: Path) -> str:
    os.mkfifo(shard / "0" / "pipe")
    return r"0/pipe \(not a regular file\)"


def _unsafe_name_inside(shard: Path) -> str:
    (shard / "0" / "a b;.png").write_bytes(b"x")
    return r"'0/a b;.png' \(unsafe name\)"


def _own_checksums(shard: Path) -> str:
    (shard / "SHA256SUMS").write_text("")
    return r"SHA256SUMS \(the flash writes data/SHA256SUMS itself\)"


@pytest.mark.parametrize("spoil", [_symlink_inside, _fifo_inside, _unsafe_name_inside, _own_checksums])
def test_a_folder_with_anything_but_plain_safe_files_is_refused_naming_it(tmp_path: Path, spoil) -> None:
    shard = make_folder_shard(tmp_path)
    named = spoil(shard)
    with pytest.raises(FlashError, match=rf"(?s)--data {shard}: not flashed; only regular files .*\n  {named}"):
        read_shard(shard)


def test_every_refused_entry_is_named_at_once(tmp_path: Path) -> None:
    shard = make_folder_shard(tmp_path)
    _symlink_inside(shard)
    _fifo_inside(shard)
    with pytest.raises(FlashError) as err:
        read_shard(shard)
    assert str(err.value).splitlines()[1:] == ["  0/pipe (not a regular file)", "  3/link.png (symbolic link)"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "absent", r"--data .*/absent: no such file or folder"),
        (lambda root: (root / "empty" / "0").mkdir(parents=True) or root / "empty",
         r"--data .*/empty: the folder holds no files; is it a shard from `sflam data partition`\?"),
        (lambda root: (root / "labels.txt").write_text("0\n") and root / "labels.txt",
         r"--data .*/labels.txt: expected a shard folder or an .npz file \(as `sflam data partition` writes them\)"),
        (lambda root: (root / "dev 1.npz").write_bytes(b"PK") and root / "dev 1.npz",
         r"--data .*/dev 1.npz: unsafe file name 'dev 1.npz'"),
    ],
    ids=["missing", "empty-folder", "txt-file", "unsafe-npz-name"],
)
def test_a_path_that_is_no_shard_is_refused(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(FlashError, match=message):
        read_shard(make(tmp_path))


def test_the_cli_refuses_a_bad_shard_before_anything_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh: nothing may run
    (tmp_path / "labels.txt").write_text("0\n")
    argv = ["flash", "--bundle", str(make_bundle(tmp_path)), "--target", "ssh://pi@host/home/pi/sflam",
            "--data", str(tmp_path / "labels.txt")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"sflam flash: error: --data {tmp_path / 'labels.txt'}: expected a "
                                              "shard folder or an .npz file")


# --- plans (nothing runs) ------------------------------------------------------------------


def test_the_ssh_plan_copies_and_verifies_the_data_after_the_bundle_and_keys(tmp_path: Path) -> None:
    # Prepare
    bundle, folder = make_bundle(tmp_path), make_folder_shard(tmp_path)
    keys = DeviceKeys("dev-0", tmp_path / "dev-0.key", tmp_path / "server.pub")  # plan_ssh reads only their names
    target = parse_target("ssh://pi@jetson.local/home/pi/sflam")
    # Execute
    steps = plan_ssh(bundle, target, FlashOptions(keys=keys, data=read_shard(folder)))
    # Assert: the order, the remote commands, what goes on stdin
    assert [s.name for s in steps] == ["create remote dir", "copy bundle", "verify hashes", "install keys", "copy data",
                                       "verify data hashes", "python environment", "launch.sh --check", "systemd unit"]
    copy, verify = steps[4:6]
    assert copy.argv[-1] == ("rm -rf -- /home/pi/sflam/data && mkdir -p -- /home/pi/sflam/data && "
                             "tar -xf - -C /home/pi/sflam/data")
    assert copy.stdin == Upload(tuple((name, folder.resolve() / name) for name in sorted(shard_files(folder))))
    assert copy.argv[:-1] == steps[0].argv[:-1]  # the same ssh options
    assert verify.argv[-1] == ("cd /home/pi/sflam/data && tee SHA256SUMS | sha256sum -c - && "
                               "test $(wc -l < SHA256SUMS) -eq 5")
    assert verify.stdin == sums(shard_files(folder))
    assert verify.verify_against == "the local shard" and steps[2].verify_against == "the manifest"


def test_the_ssh_plan_of_an_npz_shard(tmp_path: Path) -> None:
    bundle, npz = make_bundle(tmp_path), make_npz_shard(tmp_path)
    steps = plan_ssh(bundle, parse_target("ssh://pi@host/srv/b1"), FlashOptions(venv=False, unit=False,
                                                                               data=read_shard(npz)))
    assert [s.name for s in steps] == ["create remote dir", "copy bundle", "verify hashes", "copy data",
                                       "verify data hashes", "launch.sh --check"]
    assert steps[3].stdin == Upload((("dev-1.npz", npz.resolve()),))
    assert steps[4].stdin == sums({"dev-1.npz": npz.read_bytes()})


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_the_adb_plan_clears_pushes_and_verifies_the_data_last(tmp_path: Path, kind: str) -> None:
    # Prepare
    staging, adb = tmp_path / "staging", ("adb", "-s", "R58M123ABC")
    staging.mkdir()
    local = make_folder_shard(tmp_path) if kind == "folder" else make_npz_shard(tmp_path)
    # Execute
    steps = plan_adb(make_bundle(tmp_path), parse_target("adb://R58M123ABC/sdcard/sflam"), staging,
                     data=read_shard(local))
    # Assert: after the bundle's verify; a folder is pushed as data/, an npz into a fresh data/
    clear = "rm -rf -- /sdcard/sflam/data && echo sflam-data-cleared" if kind == "folder" else \
        "rm -rf -- /sdcard/sflam/data && mkdir -p -- /sdcard/sflam/data && echo sflam-data-cleared"
    pushed = (str(local.resolve()), "/sdcard/sflam/data") if kind == "folder" else \
        (str(local.resolve()), "/sdcard/sflam/data/dev-1.npz")
    assert steps[-5].name == "verify hashes"
    assert [s.argv for s in steps[-4:]] == [
        (*adb, "shell", clear),
        (*adb, "push", *pushed),
        (*adb, "push", str(staging / "data-SHA256SUMS"), "/sdcard/sflam/data/SHA256SUMS"),
        (*adb, "shell", "cd /sdcard/sflam/data && sha256sum -c SHA256SUMS && echo sflam-verify-ok"),
    ]
    assert steps[-4].expect == "sflam-data-cleared" and steps[-1].expect == "sflam-verify-ok"
    files = shard_files(local) if kind == "folder" else {"dev-1.npz": local.read_bytes()}
    assert (staging / "data-SHA256SUMS").read_bytes() == sums(files)
    assert "data" not in (staging / "SHA256SUMS").read_text()  # the bundle's list stays the bundle's


def test_a_dry_run_lists_the_data_steps(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a dry run needs no ssh
    argv = ["flash", "--bundle", str(make_bundle(tmp_path)), "--target", "ssh://pi@127.0.0.1:2222/home/pi/sflam",
            "--no-venv", "--no-unit", "--data", str(make_folder_shard(tmp_path)), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "  4. copy data: ssh -p 2222 -o BatchMode=yes" in out
    assert f"'rm -rf -- /home/pi/sflam/data && mkdir -p -- /home/pi/sflam/data && tar -xf - -C /home/pi/sflam/data'" \
           f"  < tar of 5 file(s) from {(tmp_path / 'dev-0').resolve()}\n" in out
    assert ("  5. verify data hashes: ssh -p 2222 -o BatchMode=yes" in out
            and "  < checksum list of 5 file(s) hashed here\n  6. launch.sh --check: " in out)


def test_the_unit_report_names_the_installed_shard(tmp_path: Path) -> None:
    # Prepare: a stand-in for the unit step that "installs" (prints no no-systemd marker)
    target, shard = parse_target("ssh://pi@host/home/pi/sflam"), read_shard(make_npz_shard(tmp_path))
    lines: list[str] = []
    # Execute
    execute([Step("systemd unit", ("true",))], target, lines.append, shard)
    # Assert
    assert 'SFLAM_DEVICE_ARGS="--broker URL --device-id ID --data npz:/home/pi/sflam/data/dev-1.npz" in ' \
           "/home/pi/sflam/device.env" in lines[1]
    execute([Step("systemd unit", ("true",))], target, lines.append)
    assert "--device-id ID --data SPEC\" in" in lines[3]


# --- adb, executed against the fake adb ----------------------------------------------------


def test_an_adb_flash_installs_the_shard_replacing_the_old_one_and_names_a_corrupt_file(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: the fake adb; the "phone" holds a stale shard from an earlier flash
    bin_dir, phone = tmp_path / "bin", tmp_path / "phone" / "sflam"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (phone / "data" / "9").mkdir(parents=True)
    (phone / "data" / "9" / "old.png").write_bytes(b"old")
    bundle, folder = make_bundle(tmp_path), make_folder_shard(tmp_path)
    target = parse_target(f"adb://emulator-5554{phone}")
    lines: list[str] = []
    # Execute
    flash(bundle, target, FlashOptions(data=read_shard(folder)), progress=lines.append)
    # Assert: the shard (only it) arrived intact, with its SHA256SUMS; then a corrupted copy is named
    installed = shard_files(phone / "data")
    assert installed.pop("SHA256SUMS") == sums(shard_files(folder))
    assert installed == shard_files(folder)
    assert lines[-4:] == ["[12/15] clear data ...", "[13/15] copy data ...", "[14/15] copy data/SHA256SUMS ...",
                          "[15/15] verify data hashes ..."]
    (phone / "data" / "classes.txt").write_text("cat\n")
    (tmp_path / "staging").mkdir()
    verify = plan_adb(bundle, target, tmp_path / "staging", data=read_shard(folder))[-1]
    with pytest.raises(HashMismatch, match="verify data hashes failed on adb device emulator-5554: classes.txt does "
                                           "not match the local shard") as err:
        execute([verify], target)
    assert err.value.files == ("classes.txt",)


# --- ssh, executed against the loopback sshd of tests/test_flash.py ------------------------


@pytest.mark.slow
def test_a_real_ssh_flash_installs_the_shard_and_its_checksums_then_names_a_corrupt_file(
    sshd, tmp_path: Path  # noqa: F811
) -> None:
    # Prepare: a device directory with a stale shard from an earlier flash
    port, ssh = sshd
    bundle, folder, remote = make_bundle(tmp_path), make_folder_shard(tmp_path), tmp_path / "device" / "sflam"
    (remote / "data").mkdir(parents=True)
    (remote / "data" / "old.npz").write_bytes(b"old")
    target = parse_target(f"ssh://root@127.0.0.1:{port}{remote}")
    options = FlashOptions(remote_python=sys.executable, venv=False, unit=False, ssh=ssh, data=read_shard(folder))
    lines: list[str] = []
    # Execute
    flash(bundle, target, options, progress=lines.append)
    # Assert: the steps ran in order; the shard replaced the old one byte for byte; SHA256SUMS checks there
    assert [line for line in lines if line.startswith("[")] == [
        "[1/6] create remote dir ...", "[2/6] copy bundle ...", "[3/6] verify hashes ...", "[4/6] copy data ...",
        "[5/6] verify data hashes ...", "[6/6] launch.sh --check ...",
    ]
    assert lines[-1] == "    bundle integrity: ok"  # data/ is outside the manifest: not its business
    installed = shard_files(remote / "data")
    assert installed.pop("SHA256SUMS") == sums(shard_files(folder))
    assert installed == shard_files(folder)
    check = subprocess.run(ssh_argv(target, ssh, f"cd {remote}/data && sha256sum -c SHA256SUMS"),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.count(": OK\n") == 5, check.stdout + check.stderr
    # Corrupt one remote file: the data verify step names it
    with open(remote / "data" / "3" / "00012.png", "r+b") as handle:
        handle.write(b"\x00\x01")
    (verify,) = [s for s in plan_ssh(bundle, target, options) if s.name == "verify data hashes"]
    with pytest.raises(HashMismatch, match=r"verify data hashes failed on root@127.0.0.1: 3/00012.png does not "
                                           r"match the local shard \(corrupted in transit or on the device\)") as err:
        execute([verify], target)
    assert err.value.files == ("3/00012.png",)


@pytest.mark.slow
def test_a_real_ssh_flash_of_an_npz_prints_the_device_data_spec(sshd, tmp_path: Path, capsys) -> None:  # noqa: F811
    # Prepare: the device already has a folder shard; this flash brings an npz
    port, ssh = sshd
    remote, npz = tmp_path / "device" / "sflam", make_npz_shard(tmp_path)
    (remote / "data" / "0").mkdir(parents=True)
    (remote / "data" / "0" / "00000.png").write_bytes(b"old")
    argv = ["flash", "--bundle", str(make_bundle(tmp_path)), "--target", f"ssh://root@127.0.0.1:{port}{remote}",
            "--remote-python", sys.executable, "--no-unit", "--identity", str(ssh.identity), "--known-hosts",
            str(ssh.known_hosts), "--ssh-config", str(ssh.config), "--data", str(npz)]
    # Execute: `sflam flash` as a user runs it
    code = main(argv)
    # Assert
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert "[5/6] verify data hashes ..." in out
    assert out[-1] == f"data shard installed: start the device with --data npz:{remote}/data/dev-1.npz"
    assert sorted(p.name for p in (remote / "data").iterdir()) == ["SHA256SUMS", "dev-1.npz"]
    assert (remote / "data" / "dev-1.npz").read_bytes() == npz.read_bytes()
