"""The aarch64 drill (scripts/arm64_drill.sh) as a test: marker ``drill``, run by ``make drill``
(and CI), not by plain ``make test``. Needs root, debootstrap's mirror and pip's index on first
use; the root filesystem is cached in $SFLAM_ARM64_CACHE afterwards."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.drill, pytest.mark.slow]


def test_arm64_drill_flashes_checks_and_trains_on_an_emulated_aarch64_device(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the aarch64 drill needs root (debootstrap, chroot, binfmt_misc)")
    # Execute: the whole drill, a fresh work directory, the cached root filesystem if there is one.
    done = subprocess.run(["bash", str(REPO / "scripts" / "arm64_drill.sh")], capture_output=True, text=True,
                          timeout=1500, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)})
    out = done.stdout
    # Assert: it passed, and each claim shows in its own output.
    assert done.returncode == 0 and out.rstrip().endswith("PASS"), out[-6000:] + done.stderr[-3000:]
    assert "uname -m = aarch64" in out  # the root runs aarch64 binaries
    assert re.search(r"over ssh: uname -m = aarch64", out)  # and sshd in it serves the flash
    assert 'forward check: ok {"backend": "onnx"' in out  # the flashed bundle's check passed there
    assert re.search(r"installed: onnxruntime==1\.32\.0", out) and re.search(r"installed: numpy==2\.4\.6", out)
    assert re.search(r"installed: ai-edge-litert==1\.4\.0", out)  # the aarch64 pin, not 2.3.0
    assert "inside: aarch64" in out  # the device process of the run
    assert re.search(r"counted the aarch64 device's update in all 2 rounds", out)
    rows = re.findall(r"round \d+: counted True, completed ([^,]+, [^,]+, [^,\n]+)", out)
    assert len(rows) == 2 and all("arm64-0" in r for r in rows)
