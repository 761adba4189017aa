"""Backends per platform (edge_runtime/platforms.py) agree with what pyproject's edge extra lets pip
install there, with `--backend auto`, with the profiles' preferred formats and with the export."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import edge_runtime.bundle as bundle_module
from edge_runtime import platforms
from edge_runtime.bundle import open_backend
from firmware_profiles import list_profiles, load_profile
from firmware_profiles.schema import DEVICE_KINDS

REPO = Path(__file__).resolve().parents[1]
# the marker environment of each platform's CPython 3.11 (PEP 508 names)
MARKERS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "linux-armv7l": {"sys_platform": "linux", "platform_machine": "armv7l"},
    "darwin-arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
    "win32-amd64": {"sys_platform": "win32", "platform_machine": "AMD64"},
}
RUNTIME_OF_BACKEND = {"litert": "ai-edge-litert", "onnx": "onnxruntime"}


def edge_extra(platform: str) -> dict[str, str]:
    """Distribution -> pinned version that `pip install sflam[edge]` asks for on ``platform``."""
    with open(REPO / "pyproject.toml", "rb") as handle:
        lines = tomllib.load(handle)["project"]["optional-dependencies"]["edge"]
    env = {"python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
           "os_name": "nt" if platform.startswith("win32") else "posix", "extra": "", **MARKERS[platform]}
    wanted = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            assert req.name not in wanted, f"{req.name} pinned twice on {platform}"
            wanted[req.name] = str(req.specifier)
    return wanted


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_the_edge_extra_installs_exactly_the_runtimes_the_platform_table_names(name: str) -> None:
    wanted = edge_extra(name)
    backends = set(platforms.PLATFORMS[name].auto) - {"numpy"}
    assert {RUNTIME_OF_BACKEND[b] for b in backends} == set(wanted) & set(RUNTIME_OF_BACKEND.values())
    assert wanted["numpy"] == "==2.4.6" and "paho-mqtt" in wanted  # the floor installs everywhere
    assert platforms.PLATFORMS[name].auto[-1] == "numpy"


def test_aarch64_gets_the_litert_release_that_has_an_aarch64_wheel() -> None:
    assert edge_extra("linux-aarch64")["ai-edge-litert"] == "==1.4.0"
    assert edge_extra("linux-x86_64")["ai-edge-litert"] == "==2.3.0"
    assert "ai-edge-litert" not in edge_extra("linux-armv7l") and "onnxruntime" not in edge_extra("linux-armv7l")


def test_constraints_do_not_pin_litert_2_3_0_on_aarch64() -> None:
    line = next(l for l in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
                if l.startswith("ai-edge-litert=="))
    req = Requirement(line)
    assert str(req.specifier) == "==2.3.0"
    assert not req.marker.evaluate({"platform_machine": "aarch64"}) and req.marker.evaluate({"platform_machine": "x86_64"})


@pytest.mark.parametrize(("system", "machine", "expected"), [
    ("linux", "x86_64", "linux-x86_64"), ("linux", "aarch64", "linux-aarch64"), ("linux", "arm64", "linux-aarch64"),
    ("darwin", "arm64", "darwin-arm64"), ("darwin", "aarch64", "darwin-arm64"), ("win32", "AMD64", "win32-amd64"),
    ("linux", "armv7l", "linux-armv7l"),
])
def test_platform_names_are_normalized(system: str, machine: str, expected: str) -> None:
    assert platforms.platform_name(system, machine) == expected


def test_auto_tries_onnx_first_on_aarch64(monkeypatch: pytest.MonkeyPatch, quick_bundle: Path) -> None:
    # the order open_backend follows is the platform's; the quick bundle has only an ONNX artifact,
    # so on x86_64 auto skips litert (no artifact) and loads onnx, on aarch64 it starts there
    assert platforms.PLATFORMS["linux-aarch64"].auto[0] == "onnx"
    tried = []
    real_open = bundle_module._open

    def spy(bundle, manifest, name, threads=None):
        tried.append(name)
        return real_open(bundle, manifest, name, threads)

    monkeypatch.setattr(bundle_module, "_open", spy)
    monkeypatch.setattr(platforms, "platform_name", lambda *a: "linux-aarch64")
    assert open_backend(quick_bundle, "auto").name == "onnx" and tried == ["onnx"]
    tried.clear()
    monkeypatch.setattr(platforms, "platform_name", lambda *a: "linux-x86_64")
    assert open_backend(quick_bundle, "auto").name == "onnx" and tried == ["litert", "onnx"]


def test_every_device_kind_has_a_platform() -> None:
    assert set(platforms.PLATFORM_OF_KIND) == set(DEVICE_KINDS)


@pytest.mark.parametrize("name", list_profiles())
def test_a_profile_prefers_a_format_its_platform_runs_without_caveat(name: str) -> None:
    profile = load_profile(name)
    target = platforms.for_profile_kind(profile.kind)
    first = profile.runtime.formats[0]
    if target is None:  # a microcontroller: firmware
        assert first == "tflite-micro"
    elif target.name == "android-aarch64":  # its tflite is for an app with LiteRT; the export says so
        assert platforms.format_notes(profile.kind, (first,))
    else:
        backend = platforms.BACKEND_OF_FORMAT[first]
        assert target.runs(first) and target.caveat(backend) is None and target.auto[0] == backend


def test_notes_say_what_a_target_cannot_run() -> None:
    (jetson,) = platforms.format_notes("jetson", ("onnx", "tflite", "tflite-int8"))
    assert jetson.startswith("tflite, tflite-int8: LiteRT 1.4.0") and "onnx, litert, numpy" in jetson
    assert platforms.format_notes("jetson", ("onnx",)) == []
    phone = platforms.format_notes("phone", ("tflite-int8", "onnx"))
    assert any("no litert runtime installs on android-aarch64" in n for n in phone)
    assert any("no onnx runtime installs on android-aarch64" in n for n in phone)
    assert platforms.format_notes("mcu", ("tflite-micro",)) == []
    assert "will not run" in platforms.format_notes("mcu", ("onnx",))[0]


def test_the_export_records_the_target_platform(quick_bundle: Path) -> None:
    manifest = json.loads((quick_bundle / "manifest.json").read_text())
    assert manifest["target_platform"] == {"name": "linux-aarch64", "auto": ["onnx", "litert", "numpy"], "notes": []}
