"""``sflam server`` as a user meets it: config checks and errors, without a broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sflam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sflam", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_check_accepts_the_example_config() -> None:
    result = sflam("server", "--config", "examples/run.toml", "--check")
    assert result.returncode == 0, result.stderr
    assert '"preset": "vit_quick_patch4_16"' in result.stdout and "valid" in result.stderr


def test_a_bad_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('[training]\nrounds = 0\nmode = "v3"\n[quant]\nbits = 9\n[brokr]\nurl = "x"\n')
    result = sflam("server", "--config", str(bad))
    assert result.returncode == 2
    for needle in ("rounds", "mode", "bits", "brokr", "did you mean"):
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr


def test_a_bad_broker_override_is_reported(tmp_path: Path) -> None:
    result = sflam("server", "--config", "examples/run.toml", "--broker", "http://example", "--check")
    assert result.returncode == 2 and "mqtt://" in result.stderr


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    from server_runtime.run_state import RunState, save_run_state

    ckpt = tmp_path / "ckpt"
    save_run_state(ckpt, RunState(2, 3, {}))
    config = tmp_path / "run.toml"
    config.write_text(f'[checkpoint]\ndir = "{ckpt}"\n[broker]\nurl = "mqtt://127.0.0.1:1"\n')
    result = sflam("server", "--config", str(config))
    assert result.returncode == 2 and "--resume" in result.stderr, result.stderr
