"""``sflam flash``: copy a verified bundle to a device, verify it there, and prove it runs.

Targets are ``ssh://user@host[:port]/abs/path`` (Jetson boards, Raspberry Pis) and
``adb://SERIAL/abs/path`` (Android phones; use shared storage such as ``/sdcard/sflam`` so that
Termux can read it). A flash is a plan of commands (argv lists, shown by ``--dry-run``) run one
after the other; a failing step raises :class:`FlashError` naming the step and the remote output.

Over ssh the bundle travels as a tar stream, is verified remotely with ``sha256sum -c`` against
checksums taken from the local manifest, gets a Python environment and a systemd unit, and
finally must pass ``launch.sh --check`` on the device. With ``--fleet DIR --device-id ID`` the
device's signing keys go to ``<path>/keys`` too (:mod:`export.flash_keys`), outside the manifest, and
with ``--data PATH`` a data shard goes to ``<path>/data``, hashed and verified (:mod:`export.flash_data`).
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from edge_runtime.bundle import MANIFEST, BundleError, file_sha256, read_manifest, verify_bundle
from export import flash_keys

if TYPE_CHECKING:  # flash_data builds on this module
    from export.flash_data import DataShard

log = logging.getLogger(__name__)
UNIT_NAME = "sflam-device.service"
UNIT_DIR = "/etc/systemd/system"
RUNNER = "run-termux.sh"
CHECKSUMS = "SHA256SUMS"
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*\Z")
_HOST = re.compile(r"([A-Za-z0-9][A-Za-z0-9.-]*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)\Z")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
SAFE_PATH = re.compile(r"[A-Za-z0-9._+@/-]+\Z")
_NO_SYSTEMD = "sflam-no-systemd"
VERIFIED = "sflam-verify-ok"


class FlashError(ValueError):
    """A flash that cannot be done or that failed; the message names the step and the cause."""

    def __init__(self, message: str, *, step: str | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.step, self.stdout, self.stderr = step, stdout, stderr


class HashMismatch(FlashError):
    """Files on the device whose sha256 differs from the bundle's manifest (or that are missing)."""

    def __init__(self, message: str, files: Sequence[str], **kwargs: str) -> None:
        super().__init__(message, **kwargs)
        self.files = tuple(files)


@dataclass(frozen=True)
class Target:
    """A parsed, validated flash destination."""

    scheme: str  # "ssh" | "adb"
    path: str  # absolute directory on the device
    host: str = ""  # ssh
    user: str = ""  # ssh
    port: int | None = None  # ssh; None: ssh's default (or ~/.ssh/config)
    serial: str = ""  # adb

    @property
    def where(self) -> str:
        """The device, for messages."""
        return f"{self.user}@{self.host}" if self.scheme == "ssh" else f"adb device {self.serial}"


def parse_target(url: str) -> Target:
    """``ssh://user@host[:port]/abs/path`` or ``adb://SERIAL/abs/path``, validated."""
    parts = urlsplit(url)
    if parts.scheme not in ("ssh", "adb"):
        raise FlashError(f"target {url!r}: expected ssh://user@host[:port]/abs/path or adb://SERIAL/abs/path")
    if parts.query or parts.fragment:
        raise FlashError(f"target {url!r}: no ?query or #fragment allowed")
    path = _remote_path(url, parts.path)
    if parts.scheme == "adb":
        return _adb_target(url, parts.netloc, path)
    return _ssh_target(url, parts, path)


def _remote_path(url: str, raw: str) -> str:
    if not raw or raw == "/":
        raise FlashError(f"target {url!r}: no directory; add an absolute path such as /home/pi/sflam")
    if not raw.startswith("/"):
        raise FlashError(f"target {url!r}: path {raw!r} must be absolute")
    if not SAFE_PATH.match(raw):
        raise FlashError(f"target {url!r}: path {raw!r} may contain only letters, digits and ._+@-/")
    path = PurePosixPath(raw)
    if ".." in path.parts or "." in raw.split("/"):
        raise FlashError(f"target {url!r}: path {raw!r} must not contain . or .. segments")
    return str(path)


def _ssh_target(url: str, parts: SplitResult, path: str) -> Target:
    if "@" not in parts.netloc or not parts.username:
        raise FlashError(f"target {url!r}: missing user; write ssh://user@host/path")
    if parts.password is not None:
        raise FlashError(f"target {url!r}: passwords are not accepted in URLs; use an ssh key (--identity)")
    if not _USER.match(parts.username):
        raise FlashError(f"target {url!r}: invalid user name {parts.username!r}")
    if not parts.hostname or not _HOST.match(parts.hostname):
        raise FlashError(f"target {url!r}: invalid or missing host")
    try:
        port = parts.port
    except ValueError:
        raise FlashError(f"target {url!r}: port must be a number in 1..65535") from None
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise FlashError(f"target {url!r}: port must be a number in 1..65535")
    return Target("ssh", path, host=parts.hostname, user=parts.username, port=port)


def _adb_target(url: str, serial: str, path: str) -> Target:
    if not serial or not _SERIAL.match(serial):
        raise FlashError(f"target {url!r}: invalid or missing device serial (see `adb devices`)")
    return Target("adb", path, serial=serial)


@dataclass(frozen=True)
class Upload:
    """Local files streamed to a step's stdin as one tar archive (archive name -> local path)."""

    members: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class Step:
    """One command of a flash: what it does, its argv, what it reads and how long it may take."""

    name: str
    argv: tuple[str, ...]
    stdin: bytes | Upload | None = None
    stdin_note: str = ""  # what stdin carries, for --dry-run
    timeout_s: float = 120.0
    expect: str = ""  # stdout must contain this (adb shells may not return exit codes)
    verify_against: str = ""  # a sha256sum -c step: what the files must match (a HashMismatch names those that differ)

    def describe(self) -> str:
        """The step as a person would type it."""
        return f"{self.name}: {shlex.join(self.argv)}" + (f"  < {self.stdin_note}" if self.stdin_note else "")


@dataclass(frozen=True)
class SshOptions:
    """How to reach an ssh target: identity, known_hosts file and extra ``-o`` options."""

    identity: Path | None = None
    known_hosts: Path | None = None
    config: Path | None = None  # ssh -F; "/dev/null" ignores ~/.ssh/config
    extra: tuple[str, ...] = ()  # "Key=Value" for -o
    connect_timeout_s: int = 15


def check_remote_python(value: str, option: str = "--remote-python") -> str:
    """``value`` when it is an absolute path that a systemd unit and a shell take literally.

    It becomes ``Environment=SFLAM_PYTHON=...`` in the unit: a newline would add directives, and
    ``%``, ``$``, quotes, ``\\`` or ``;`` would be expanded or split there; FlashError names the value.
    """
    if not value.startswith("/") or not SAFE_PATH.match(value):
        raise FlashError(f"{option} {value!r}: expected an absolute path of letters, digits and ._+@-/ only "
                         "(no spaces, control characters, quotes, $, %, ; or backslashes)")
    return value


@dataclass(frozen=True)
class FlashOptions:
    """What to set up on the device besides the files."""

    remote_python: str | None = None  # an existing interpreter with sflam[edge]; no venv then
    venv: bool = True
    unit: bool = True
    wheels: tuple[Path, ...] = ()  # copied to <path>/wheels and offered to pip (--find-links)
    pip_args: tuple[str, ...] = ()
    ssh: SshOptions = field(default_factory=SshOptions)
    keys: flash_keys.DeviceKeys | None = None  # installed in <path>/keys (ssh and adb)
    data: DataShard | None = None  # installed in <path>/data (ssh and adb)

    def __post_init__(self) -> None:
        if self.remote_python is not None:
            check_remote_python(self.remote_python, "remote_python")


def bundle_files(bundle: Path) -> list[str]:
    """The bundle's file names (manifest first), after verifying it locally."""
    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        raise FlashError(f"bundle: {exc}") from None
    problems = verify_bundle(bundle)
    if problems:
        raise FlashError(f"bundle {bundle} is not sound; re-export it:\n  " + "\n  ".join(problems))
    names = sorted(manifest["files"])
    for name in names:
        if not SAFE_PATH.match(name) or name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise FlashError(f"bundle {bundle}: unsafe file name {name!r} in the manifest")
    return [MANIFEST, *names]


def checksum_list(bundle: Path, names: Sequence[str]) -> bytes:
    """``sha256sum -c`` input for the bundle: the manifest's hashes, plus the manifest's own."""
    hashes = read_manifest(Path(bundle))["files"]
    lines = [f"{file_sha256(Path(bundle) / MANIFEST) if n == MANIFEST else hashes[n]['sha256']}  {n}\n" for n in names]
    return "".join(lines).encode()


def _sflam_requirement(bundle: Path) -> str:
    version = read_manifest(Path(bundle)).get("sflam_version")
    return f"sflam[edge]=={version}" if version else "sflam[edge]"


def ssh_argv(target: Target, options: SshOptions, command: str) -> tuple[str, ...]:
    """``ssh`` running ``command`` (a remote shell line) on the target, never prompting."""
    argv = ["ssh"] + (["-F", str(options.config)] if options.config else [])
    argv += ["-p", str(target.port)] if target.port else []
    settings = ["BatchMode=yes", "StrictHostKeyChecking=accept-new", f"ConnectTimeout={options.connect_timeout_s}",
                "ServerAliveInterval=15", "ServerAliveCountMax=4"]
    if options.identity:
        argv += ["-i", str(options.identity)]
        settings.append("IdentitiesOnly=yes")
    if options.known_hosts:
        settings.append(f"UserKnownHostsFile={options.known_hosts}")
    for setting in (*settings, *options.extra):
        argv += ["-o", setting]
    return (*argv, "--", f"{target.user}@{target.host}", command)


def plan_ssh(bundle: Path, target: Target, options: FlashOptions) -> list[Step]:
    """Every command of an ssh flash, in order."""
    bundle, names, q = Path(bundle), bundle_files(bundle), shlex.quote(target.path)
    ssh = partial(ssh_argv, target, options.ssh)
    tools = "for t in tar sha256sum; do command -v $t >/dev/null || { echo \"the device has no $t\" >&2; exit 1; }; done"
    steps = [
        Step("create remote dir", ssh(f"mkdir -p -- {q} && {tools}")),
        Step("copy bundle", ssh(f"tar -xf - -C {q}"), Upload(tuple((n, bundle / n) for n in names)),
             f"tar of {len(names)} files from {bundle}", timeout_s=1800),
        verify_step(bundle, target, options.ssh, names),
    ]
    if options.keys:
        steps.append(Step(flash_keys.INSTALL_STEP, ssh(flash_keys.ssh_install_command(target.path)),
                          Upload(options.keys.members), options.keys.note))
    steps += options.data.ssh_steps(target, options.ssh) if options.data else []
    if options.venv and not options.remote_python:
        steps += _venv_steps(bundle, target, options)
    steps.append(check_step(target, options))
    if options.unit and (bundle / UNIT_NAME).is_file():
        steps.append(_unit_step(bundle, target, options))
    return steps


def verify_step(bundle: Path, target: Target, options: SshOptions, names: Sequence[str]) -> Step:
    """Remote ``sha256sum -c`` fed with checksums from the local manifest."""
    command = f"cd {shlex.quote(target.path)} && sha256sum -c -"
    return Step("verify hashes", ssh_argv(target, options, command), checksum_list(bundle, names),
                f"checksum list of {len(names)} files from {Path(bundle) / MANIFEST}", 600, verify_against="the manifest")


def _venv_steps(bundle: Path, target: Target, options: FlashOptions) -> list[Step]:
    q, steps = shlex.quote(target.path), []
    pip = ["-q", *options.pip_args]
    if options.wheels:
        steps.append(Step("copy wheels", ssh_argv(target, options.ssh, f"mkdir -p {q}/wheels && tar -xf - -C {q}/wheels"),
                          Upload(tuple((w.name, w) for w in options.wheels)), f"tar of {len(options.wheels)} wheel file(s)",
                          timeout_s=1800))
        pip += ["--find-links", "wheels"]
    install = shlex.join([".venv/bin/pip", "install", *pip, _sflam_requirement(bundle)])
    command = f"cd {q} && python3 -m venv .venv && {install}"
    return [*steps, Step("python environment", ssh_argv(target, options.ssh, command), timeout_s=1800)]


def check_step(target: Target, options: FlashOptions) -> Step:
    """``launch.sh --check`` in the installed bundle, with the chosen interpreter."""
    env = f"SFLAM_PYTHON={shlex.quote(options.remote_python)} " if options.remote_python else ""
    command = f"cd {shlex.quote(target.path)} && {env}./launch.sh --check"
    return Step("launch.sh --check", ssh_argv(target, options.ssh, command), timeout_s=600)


def render_unit(template: str, target: Target, remote_python: str | None) -> str:
    """The bundle's unit template for its installed location, run as the ssh user (and interpreter).

    A root target renders ``User=root``: the flashing user owns the installed files, so it is the one
    account sure to read them without a chown; the sandbox still applies (docs/export.md 8.4).
    """
    if "User=@USER@" not in template:
        raise FlashError("the bundle's systemd unit has no User=@USER@ (exported by an older sflam): "
                         "re-export the bundle, or flash it with --no-unit")
    if not _USER.match(target.user) or not target.path.startswith("/") or not SAFE_PATH.match(target.path):
        raise FlashError(f"cannot render a unit for user {target.user!r} and path {target.path!r}")
    if target.user == "root":
        log.warning("the systemd unit will run the device as root; flash as an unprivileged user to avoid that")
    unit = template.replace("@USER@", target.user).replace("@BUNDLE@", target.path)
    if remote_python is not None:
        python = check_remote_python(remote_python)
        unit = unit.replace("[Service]\n", f"[Service]\nEnvironment=SFLAM_PYTHON={python}\n", 1)
    return unit


def _unit_step(bundle: Path, target: Target, options: FlashOptions) -> Step:
    sudo = "" if target.user == "root" else "sudo -n "
    dest = f"{UNIT_DIR}/{UNIT_NAME}"
    command = (f"if ! {{ command -v systemctl && test -d /run/systemd/system; }} >/dev/null 2>&1; "
               f"then echo {_NO_SYSTEMD}; exit 0; fi; "
               f"{sudo}tee {dest} >/dev/null && {sudo}systemctl daemon-reload && {sudo}systemctl enable {UNIT_NAME}")
    unit = render_unit((bundle / UNIT_NAME).read_text(), target, options.remote_python)
    return Step("systemd unit", ssh_argv(target, options.ssh, command), unit.encode(), f"{UNIT_NAME} rendered for {target.path}")


def plan_adb(bundle: Path, target: Target, staging: Path, keys: flash_keys.DeviceKeys | None = None,
             data: DataShard | None = None) -> list[Step]:
    """Every command of an adb flash; generated files (checksums, Termux runner) go to ``staging``."""
    bundle, names, key_files = Path(bundle), bundle_files(bundle), keys.members if keys else ()
    (Path(staging) / CHECKSUMS).write_bytes(checksum_list(bundle, names))
    (Path(staging) / RUNNER).write_text(TERMUX_RUNNER.replace("@REQUIREMENT@", _sflam_requirement(bundle)))
    adb, q = ("adb", "-s", target.serial), shlex.quote(target.path)
    dirs = sorted({str(PurePosixPath(target.path, n).parent) for n in [*names, *(n for n, _ in key_files)]})
    steps = [Step("create remote dir", (*adb, "shell", shlex.join(["mkdir", "-p", *dirs])))]
    pushes = [(bundle / n, n) for n in names] + [(Path(staging) / n, n) for n in (CHECKSUMS, RUNNER)]
    pushes += [(local, n) for n, local in key_files]
    steps += [Step(f"copy {n}", (*adb, "push", str(local), f"{target.path}/{n}"), timeout_s=1800) for local, n in pushes]
    if keys:
        protect = flash_keys.adb_protect_command(target.path)
        steps.append(Step(flash_keys.PROTECT_STEP, (*adb, "shell", protect), expect=flash_keys.KEY_MODE_MARK))
    verify = f"cd {q} && sha256sum -c {CHECKSUMS} && echo {VERIFIED}"
    steps.append(Step("verify hashes", (*adb, "shell", verify), timeout_s=600, expect=VERIFIED, verify_against="the manifest"))
    return steps + (data.adb_steps(target, staging) if data else [])


TERMUX_RUNNER = """#!/bin/sh
# Run an sflam bundle from Termux (or any Android shell with Python 3):
#   sh /sdcard/sflam/run-termux.sh --check
# Shared storage is mounted noexec, so the bundle is copied into this app's home first.
set -e
src=$(cd "$(dirname "$0")" && pwd)
dest=${SFLAM_HOME:-$HOME/sflam}/$(basename "$src")
mkdir -p "$dest"
cp -r "$src"/. "$dest"/
cd "$dest"
# keys/ comes from shared storage, which keeps no modes: the device refuses a key others can read
if [ -f keys/device.key ]; then chmod 700 keys && chmod 600 keys/device.key; fi
sha256sum -c SHA256SUMS >/dev/null
chmod 755 launch.sh
python=${SFLAM_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c 'import edge_runtime' 2>/dev/null; then
  echo "the sflam edge runtime is missing for $python; install it: $python -m pip install '@REQUIREMENT@'" >&2
  exit 3
fi
if [ -f keys/device.key ] && ! "$python" -c 'import cryptography' 2>/dev/null; then
  echo "signed messages need the cryptography package for $python; in Termux: pkg install python-cryptography" >&2
  exit 3
fi
SFLAM_PYTHON=$python exec ./launch.sh "$@"
"""


def run_step(step: Step, where: str) -> str:
    """Run one step; its stdout, or FlashError naming the step and what the device said."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        rc = _run(step, out, err)
        stdout, stderr = _read(out), _read(err)
    if rc != 0 or step.expect not in stdout:
        said = "\n".join(text.strip() for text in (stderr, stdout) if text.strip()) or "(no output)"
        raise FlashError(f"{step.name} failed on {where} (exit {rc}):\n{said}", step=step.name, stdout=stdout, stderr=stderr)
    return stdout


def _run(step: Step, out: IO[bytes], err: IO[bytes]) -> int:
    stdin = subprocess.DEVNULL if step.stdin is None else subprocess.PIPE
    log.debug("running %s", step.describe())
    try:
        proc = subprocess.Popen(step.argv, stdin=stdin, stdout=out, stderr=err)
    except OSError as exc:
        raise FlashError(f"{step.name}: cannot run {step.argv[0]} ({exc})", step=step.name) from None
    # Fed from a thread so that the timeout also bounds a device that stops reading.
    feeder = threading.Thread(target=_feed, args=(proc, step.stdin), daemon=True)
    feeder.start()
    try:
        return proc.wait(timeout=step.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise FlashError(f"{step.name} timed out after {step.timeout_s:g} s", step=step.name) from None
    finally:
        feeder.join(timeout=5)


def _feed(proc: subprocess.Popen, data: bytes | Upload | None) -> None:
    if data is None:
        return
    try:
        if isinstance(data, Upload):
            _write_tar(proc.stdin, data)
        else:
            proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, ValueError):  # ValueError: stdin closed under us after a timeout
        log.debug("the remote command stopped reading early; its exit status says why")


def _write_tar(stream: IO[bytes], upload: Upload) -> None:
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for name, path in upload.members:
            tar.add(path, arcname=name, recursive=False, filter=_anonymous)


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _read(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


def require_tool(name: str) -> None:
    """FlashError unless the command ``name`` (``ssh`` or ``adb``) is on PATH."""
    if shutil.which(name) is None:
        hint = "install Android platform-tools (apt-get install adb)" if name == "adb" else "install an OpenSSH client"
        raise FlashError(f"`{name}` is not on PATH; {hint}")


def mismatched_files(sha256sum_output: str) -> list[str]:
    """The files ``sha256sum -c`` reported as FAILED (altered, missing or unreadable)."""
    return [m.group(1) for m in re.finditer(r"^(.+?): FAILED", sha256sum_output, re.MULTILINE)]


def run_verify(step: Step, where: str) -> None:
    """Run a verify step; HashMismatch names every file that differs on the device."""
    try:
        run_step(step, where)
    except FlashError as exc:
        files = mismatched_files(exc.stdout)
        if not files:
            raise
        verb = "does" if len(files) == 1 else "do"
        raise HashMismatch(f"{step.name} failed on {where}: {', '.join(files)} {verb} not match {step.verify_against} "
                           f"(corrupted in transit or on the device)\n{exc.stderr.strip()}", files,
                           step=exc.step or "", stdout=exc.stdout, stderr=exc.stderr) from None


def verify_remote(bundle: Path, target: Target, options: SshOptions = SshOptions()) -> None:
    """Re-check an installed ssh bundle against the local manifest; HashMismatch when it differs."""
    require_tool("ssh")
    run_verify(verify_step(bundle, target, options, bundle_files(bundle)), target.where)


Progress = Callable[[str], None]


def plan(bundle: Path, target: Target, options: FlashOptions, staging: Path) -> list[Step]:
    """The flash's commands for the target's kind."""
    if not Path(bundle).is_dir():
        raise FlashError(f"bundle {bundle}: not a directory")
    if target.scheme == "adb":
        return plan_adb(bundle, target, staging, options.keys, options.data)
    return plan_ssh(bundle, target, options)


def execute(steps: Sequence[Step], target: Target, progress: Progress = log.info, data: DataShard | None = None) -> None:
    """Run a plan step by step, reporting each; stops at the first failure (FlashError)."""
    require_tool(target.scheme)
    for number, step in enumerate(steps, 1):
        progress(f"[{number}/{len(steps)}] {step.name} ...")
        if step.verify_against:
            run_verify(step, target.where)
        else:
            _report(step, run_step(step, target.where), target, progress, data.spec(target.path) if data else "SPEC")


def _report(step: Step, stdout: str, target: Target, progress: Progress, data_spec: str) -> None:
    if step.name == "systemd unit":
        if _NO_SYSTEMD in stdout:
            progress(f"    no systemd on {target.where}: unit not installed")
        else:
            progress(f"    installed and enabled {UNIT_DIR}/{UNIT_NAME} (runs as {target.user}); put "
                     f"SFLAM_DEVICE_ARGS=\"--broker URL --device-id ID --data {data_spec}\" in {target.path}/device.env, "
                     f"then: systemctl start {UNIT_NAME}")
    elif step.name == flash_keys.PROTECT_STEP:
        progress(flash_keys.adb_key_report(stdout))
    elif step.name == "launch.sh --check":
        for line in stdout.strip().splitlines():
            progress(f"    {line}")


def flash(bundle: Path, target: Target, options: FlashOptions = FlashOptions(), progress: Progress = log.info) -> None:
    """Copy, verify, set up and check a bundle on a device; FlashError at the first failing step."""
    with tempfile.TemporaryDirectory(prefix="sflam-flash-") as staging:
        execute(plan(bundle, target, options, Path(staging)), target, progress, options.data)


def cmd_flash(args: argparse.Namespace) -> int:
    """Handler of ``sflam flash``."""
    target, bundle, options = parse_target(args.target), Path(args.bundle), _options(args)
    with tempfile.TemporaryDirectory(prefix="sflam-flash-") as staging:
        steps = plan(bundle, target, options, Path(staging))
        if args.dry_run:
            print(f"flash plan for {bundle} -> {args.target} (nothing run):")
            for number, step in enumerate(steps, 1):
                print(f"  {number}. {step.describe()}")
            return 0
        require_tool(target.scheme)
        print(f"flashing {bundle} to {target.where}:{target.path}")
        execute(steps, target, print, options.data)
    print(f"done: {target.where}:{target.path} verified" + (" and checked" if target.scheme == "ssh" else ""))
    if target.scheme == "adb":
        print(f"on the phone, in Termux: sh {target.path}/{RUNNER} --check")
    print(flash_keys.keys_line(options.keys, target.path))
    if options.data:
        print(f"data shard installed: start the device with --data {options.data.spec(target.path)}")
    return 0


def _options(args: argparse.Namespace) -> FlashOptions:
    from export.flash_data import read_shard  # flash_data builds on this module
    keys = flash_keys.keys_from_options(args.fleet, args.device_id)  # first: a half-given pair is a usage error
    data = None if args.data is None else read_shard(Path(args.data))
    wheels = tuple(Path(w) for w in (args.wheel or ()))
    missing = [str(w) for w in wheels if not w.is_file()]
    if missing:
        raise FlashError(f"--wheel: no such file: {', '.join(missing)}")
    ssh = SshOptions(
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        config=Path(args.ssh_config) if args.ssh_config else None,
        extra=tuple(args.ssh_option or ()),
    )
    remote_python = None if args.remote_python is None else check_remote_python(args.remote_python)
    return FlashOptions(remote_python=remote_python, venv=not args.no_venv, unit=not args.no_unit,
                        wheels=wheels, pip_args=tuple(args.pip_arg or ()), ssh=ssh, keys=keys, data=data)
