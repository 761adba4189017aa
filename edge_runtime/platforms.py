"""Which device backends exist on which platform, and the order ``--backend auto`` tries them.

A backend is usable on a platform only where the ``edge`` extra's pinned runtime publishes a wheel
for CPython 3.11 there (pyproject.toml's environment markers say the same thing to pip):

=================  ==========================  ==============================================
platform           runtimes of ``sflam[edge]``  ``--backend auto`` tries
=================  ==========================  ==============================================
linux-x86_64       LiteRT 2.3.0, ORT 1.32.0     litert, onnx, numpy
linux-aarch64      LiteRT 1.4.0, ORT 1.32.0     onnx, litert, numpy
darwin-arm64       LiteRT 2.3.0, ORT 1.32.0     litert, onnx, numpy
win32-amd64        LiteRT 2.3.0, ORT 1.32.0     litert, onnx, numpy
linux-armv7l       none                         numpy
android-aarch64    none (Termux has no wheel)   numpy
=================  ==========================  ==============================================

On linux-aarch64 ONNX Runtime comes first: it passes the bundle check and trains in the aarch64
drill (scripts/arm64_drill.sh, docs/export.md), while LiteRT 1.4.0 -- the newest LiteRT with an
aarch64 wheel -- crashes the process (SIGSEGV) in the ``forward`` signature there, under qemu-user
7.2 with every CPU model tried. The same LiteRT version runs that file on x86_64, so the crash
may be the emulator's; until it has run on an aarch64 board, a crash cannot fall back the way a
load error does, so auto does not start with it. ``tflite-micro`` artifacts run on MCU firmware,
never in this Python client.
"""

from __future__ import annotations

import platform as _platform
import sys
from dataclasses import dataclass

# the backend that runs each artifact format in this client
BACKEND_OF_FORMAT = {"tflite": "litert", "tflite-int8": "litert", "onnx": "onnx"}


@dataclass(frozen=True)
class Platform:
    """What the Python device client can run on one OS/CPU pair."""

    name: str
    auto: tuple[str, ...]  # backends ``--backend auto`` tries, in order (numpy always last)
    caveats: tuple[tuple[str, str], ...] = ()  # (backend, why it is not trusted yet)

    def runs(self, fmt: str) -> bool:
        """Whether a backend installed here runs artifacts of format ``fmt``."""
        return BACKEND_OF_FORMAT.get(fmt) in self.auto

    def caveat(self, backend: str) -> str | None:
        return dict(self.caveats).get(backend)


_LITERT_AARCH64 = ("LiteRT 1.4.0 (the newest with a Linux aarch64 wheel) crashed with SIGSEGV in the "
                   "forward signature under qemu-user 7.2; not yet run on an aarch64 board")
PLATFORMS = {p.name: p for p in (
    Platform("linux-x86_64", ("litert", "onnx", "numpy")),
    Platform("linux-aarch64", ("onnx", "litert", "numpy"), (("litert", _LITERT_AARCH64),)),
    Platform("darwin-arm64", ("litert", "onnx", "numpy")),
    Platform("win32-amd64", ("litert", "onnx", "numpy")),
    Platform("linux-armv7l", ("numpy",)),
    Platform("android-aarch64", ("numpy",)),
)}
# the platform a profile's device kind runs the Python client on (firmware_profiles DEVICE_KINDS)
PLATFORM_OF_KIND = {"jetson": "linux-aarch64", "sbc": "linux-aarch64", "phone": "android-aarch64", "mcu": None}
_MACHINES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64", "armv7": "armv7l"}


def platform_name(system: str | None = None, machine: str | None = None) -> str:
    """``{sys.platform}-{machine}`` of this interpreter (or of the given pair), normalized."""
    system = sys.platform if system is None else system
    machine = (machine if machine is not None else _platform.machine()).lower()
    machine = _MACHINES.get(machine, machine)
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    if system == "win32" and machine == "x86_64":
        machine = "amd64"
    if system == "linux" and hasattr(sys, "getandroidapilevel"):
        system = "android"
    return f"{system}-{machine}"


def current() -> Platform:
    """This interpreter's platform; an unknown one tries every backend (what loads, runs)."""
    name = platform_name()
    return PLATFORMS.get(name, Platform(name, ("litert", "onnx", "numpy")))


def auto_order() -> tuple[str, ...]:
    """The backends ``--backend auto`` tries here, in order."""
    return current().auto


def for_profile_kind(kind: str) -> Platform | None:
    """The platform a device of this profile kind runs the client on; None for MCUs (firmware)."""
    name = PLATFORM_OF_KIND.get(kind)
    return PLATFORMS[name] if name else None


def format_notes(kind: str, formats: tuple[str, ...]) -> list[str]:
    """What a bundle of ``formats`` can and cannot run on a ``kind`` device's Python client."""
    target = for_profile_kind(kind)
    if target is None:
        return [] if set(formats) <= {"tflite-micro"} else [
            f"an {kind} runs firmware (tflite-micro), not the Python client: {', '.join(formats)} will not run on it"]
    by_backend: dict[str, list[str]] = {}
    notes = []
    for fmt in formats:
        if fmt == "tflite-micro":
            notes.append(f"{fmt}: MCU firmware only; the {target.name} client checks it with the numpy backend")
        else:
            by_backend.setdefault(BACKEND_OF_FORMAT[fmt], []).append(fmt)
    for backend, group in by_backend.items():
        which = ", ".join(group)
        if backend not in target.auto:
            notes.append(f"{which}: no {backend} runtime installs on {target.name}; the device client there "
                         f"runs {', '.join(target.auto)}")
        elif target.caveat(backend):
            notes.append(f"{which}: {target.caveat(backend)}; --backend auto there tries {', '.join(target.auto)}")
    return notes
