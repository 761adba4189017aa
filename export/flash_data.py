"""A device's data shard for ``sflam flash --data PATH``: copied beside the bundle and hashed there.

``sflam data partition`` writes one shard per device: a folder (``classes.txt``, ``manifest.csv``,
``<class>/<nnnnn>.png``) or an ``.npz`` file. A flash installs it in ``<path>/data`` (a re-flash
replaces the old shard), writes ``data/SHA256SUMS`` from sha256s taken locally when the plan is
made, and checks them with ``sha256sum -c`` on the device; a mismatch names the files (HashMismatch).
The shard is not in the bundle's manifest, so the bundle's own checks neither see nor need it.

This module builds on :mod:`export.flash` (its steps, its errors, its rule for safe names).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from edge_runtime.bundle import file_sha256
from export.flash import CHECKSUMS, SAFE_PATH, VERIFIED, FlashError, SshOptions, Step, Target, Upload, ssh_argv

DATA_DIR = "data"
NPZ_SUFFIX = ".npz"
CLEARED = "sflam-data-cleared"
COPY_STEP, VERIFY_STEP = "copy data", "verify data hashes"
AGAINST = "the local shard"  # what a HashMismatch says the remote files differ from
SHOWN_PROBLEMS = 10  # refused files a message lists


@dataclass(frozen=True)
class DataShard:
    """A local shard, checked and hashed: its files as named under ``data/`` on the device."""

    source: Path
    kind: Literal["folder", "npz"]
    files: tuple[tuple[str, Path, str], ...]  # (name under data/, local file, sha256), sorted by name

    @property
    def members(self) -> tuple[tuple[str, Path], ...]:
        """(name under ``data/``, local file) for a tar upload."""
        return tuple((name, path) for name, path, _ in self.files)

    @property
    def checksums(self) -> bytes:
        """``sha256sum -c`` input (also the device's ``data/SHA256SUMS``), names relative to ``data/``."""
        return "".join(f"{digest}  {name}\n" for name, _, digest in self.files).encode()

    def spec(self, path: str) -> str:
        """The ``sflam device --data`` value for this shard installed under ``path``."""
        if self.kind == "npz":
            return f"npz:{path}/{DATA_DIR}/{self.files[0][0]}"
        return f"folder:{path}/{DATA_DIR}"

    def ssh_steps(self, target: Target, options: SshOptions) -> list[Step]:
        """Replace ``data/`` with the shard (a tar on stdin), then write SHA256SUMS from stdin and check it."""
        data = f"{shlex.quote(target.path)}/{DATA_DIR}"
        copy = f"rm -rf -- {data} && mkdir -p -- {data} && tar -xf - -C {data}"
        # the count also catches a SHA256SUMS that tee could not write whole
        verify = f"cd {data} && tee {CHECKSUMS} | sha256sum -c - && test $(wc -l < {CHECKSUMS}) -eq {len(self.files)}"
        return [
            Step(COPY_STEP, ssh_argv(target, options, copy), Upload(self.members),
                 f"tar of {len(self.files)} file(s) from {self.source}", timeout_s=1800),
            Step(VERIFY_STEP, ssh_argv(target, options, verify), self.checksums,
                 f"checksum list of {len(self.files)} file(s) hashed here", timeout_s=600, verify_against=AGAINST),
        ]

    def adb_steps(self, target: Target, staging: Path) -> list[Step]:
        """Clear ``data/``, push the shard and its SHA256SUMS (written to ``staging``), check them there."""
        adb, data = ("adb", "-s", target.serial), f"{target.path}/{DATA_DIR}"
        sums = Path(staging) / f"{DATA_DIR}-{CHECKSUMS}"
        sums.write_bytes(self.checksums)
        make = f" && mkdir -p -- {shlex.quote(data)}" if self.kind == "npz" else ""  # pushing a folder makes data/
        local, remote = (self.files[0][1], f"{data}/{self.files[0][0]}") if self.kind == "npz" else (self.source, data)
        verify = f"cd {shlex.quote(data)} && sha256sum -c {CHECKSUMS} && echo {VERIFIED}"
        return [
            Step("clear data", (*adb, "shell", f"rm -rf -- {shlex.quote(data)}{make} && echo {CLEARED}"),
                 expect=CLEARED),
            Step(COPY_STEP, (*adb, "push", str(local), remote), timeout_s=1800),
            Step(f"copy {DATA_DIR}/{CHECKSUMS}", (*adb, "push", str(sums), f"{data}/{CHECKSUMS}")),
            Step(VERIFY_STEP, (*adb, "shell", verify), timeout_s=600, expect=VERIFIED, verify_against=AGAINST),
        ]


def read_shard(path: Path) -> DataShard:
    """``path`` as a shard: a folder of regular files with safe names, or one ``.npz``; FlashError if not."""
    path = Path(path)
    if not path.exists():
        raise FlashError(f"--data {path}: no such file or folder")
    if path.is_dir():
        return _folder_shard(path.resolve(), str(path))
    if not path.is_file() or path.suffix.lower() != NPZ_SUFFIX:
        raise FlashError(f"--data {path}: expected a shard folder or an {NPZ_SUFFIX} file "
                         "(as `sflam data partition` writes them)")
    if not SAFE_PATH.match(path.name):
        raise FlashError(f"--data {path}: unsafe file name {path.name!r} (letters, digits and ._+@- only)")
    resolved = path.resolve()  # the file itself: tar would send a symbolic link as a link
    return DataShard(resolved, "npz", ((path.name, resolved, file_sha256(resolved)),))


def _folder_shard(folder: Path, shown: str) -> DataShard:
    files, problems = _walk(folder)
    if CHECKSUMS in {name for name, _ in files}:
        problems.append(f"{CHECKSUMS} (the flash writes data/{CHECKSUMS} itself)")
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise FlashError(f"--data {shown}: not flashed; only regular files with names of letters, digits and "
                         "._+@- may be in a shard:\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]) + more)
    if not files:
        raise FlashError(f"--data {shown}: the folder holds no files; is it a shard from `sflam data partition`?")
    return DataShard(folder, "folder", tuple((name, local, file_sha256(local)) for name, local in sorted(files)))


def _walk(folder: Path, prefix: str = "") -> tuple[list[tuple[str, Path]], list[str]]:
    """(name, file) of every regular file under ``folder``, and a line per entry that is refused."""
    files, problems = [], []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = str(PurePosixPath(prefix, entry.name))
            if not SAFE_PATH.match(name):
                problems.append(f"{name!r} (unsafe name)")
            elif entry.is_symlink():
                problems.append(f"{name} (symbolic link)")
            elif entry.is_dir(follow_symlinks=False):
                more_files, more_problems = _walk(Path(entry.path), name)
                files, problems = files + more_files, problems + more_problems
            elif entry.is_file(follow_symlinks=False):
                files.append((name, Path(entry.path)))
            else:
                problems.append(f"{name} (not a regular file)")
    return files, problems
