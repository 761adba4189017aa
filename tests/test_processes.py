"""The one process supervisor: logs, readiness, the stop policy (SIGTERM, then SIGKILL), the working directory."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from sflam.processes import ProcessError, ProcessGroup, child_env

READY_THEN_WAIT = "import time; print('ready', flush=True); time.sleep(120)"
IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(120)")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_ready_child_is_stopped_by_sigterm(tmp_path: Path) -> None:
    # Prepare
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("child", _python(READY_THEN_WAIT))
        # Execute
        group.wait_for_log("child", "ready", timeout_s=60)
        codes = group.stop()
    # Assert: ended by the polite signal, its output kept in its log
    assert codes == {"child": -signal.SIGTERM}
    assert group.output("child") == "ready\n"


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    group.start("stubborn", _python(IGNORES_SIGTERM))
    group.wait_for_log("stubborn", "ready", timeout_s=60)
    assert group.stop(timeout_s=0.5) == {"stubborn": -signal.SIGKILL}


def test_a_child_that_exits_before_it_is_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    group.start("broken", _python("import sys; print('cannot read run.toml', flush=True); sys.exit(2)"))
    with pytest.raises(ProcessError) as caught:
        group.wait_for_log("broken", "ready", timeout_s=60)
    assert "broken exited with status 2" in str(caught.value) and "cannot read run.toml" in str(caught.value)
    assert group.exited() == {"broken": 2}


def test_children_start_in_the_callers_directory_with_the_package_importable(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a working directory outside the checkout
    monkeypatch.chdir(tmp_path)
    group = ProcessGroup(Path("logs"))
    # Execute
    group.start("where", _python("import os, sflam; print(os.getcwd())"), env=child_env(threads=1))
    group.wait_until(lambda: bool(group.exited()), 60, "the child to finish")
    # Assert
    assert group.exited() == {"where": 0}
    assert group.output("where").strip() == str(tmp_path)
    assert group.logs == tmp_path / "logs"  # absolute, whatever the caller's directory becomes


def test_names_are_unique_in_a_group(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("a", _python("pass"))
        with pytest.raises(ValueError, match="already"):
            group.start("a", _python("pass"))
