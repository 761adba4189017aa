"""The systemd unit that ``sflam flash`` installs: who it runs as, its sandbox, and the interpreter
path it is given (``--remote-python``), which must not be able to add lines to it.

The unit is rendered from the template of a real exported bundle (the session's ``quick_bundle``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from export.flash import FlashError, FlashOptions, check_remote_python, check_step, parse_target, render_unit
from sflam.cli import main

INJECTED = "/usr/bin/python3\nExecStartPre=/bin/sh -c 'id > /tmp/pwned'"
UNSAFE_PYTHONS = [
    INJECTED, "python3", "bin/python3", "", "/opt/my python/bin/python", "/usr/bin/python3\t", "/usr/bin/py\x00",
    "/usr/bin/python%i", "/usr/bin/$PYTHON", "/usr/bin/'py'", '/usr/bin/"py"', "/usr/bin/py\\n", "/usr/bin/py;reboot",
]


def service_lines(unit: str) -> list[tuple[str, str]]:
    """The ``Key=value`` lines of the unit's [Service] section, in order (comments left out)."""
    section = unit.split("[Service]\n", 1)[1].split("\n[", 1)[0]
    lines = [line for line in section.splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("=", 1)) for line in lines]


@pytest.mark.parametrize("user", ["pi", "root"])
def test_the_exported_unit_runs_sandboxed_as_the_flashing_user(quick_bundle: Path, user: str, caplog) -> None:
    # Prepare
    template = (quick_bundle / "sflam-device.service").read_text()
    target = parse_target(f"ssh://{user}@jetson.local/home/{user}/sflam")
    # Execute
    with caplog.at_level(logging.WARNING, logger="export.flash"):
        unit = render_unit(template, target, "/usr/bin/python3")
    # Assert: exactly these settings, once each; no Group= (systemd takes the user's login group)
    home = f"/home/{user}/sflam"
    assert service_lines(unit) == [
        ("Environment", "SFLAM_PYTHON=/usr/bin/python3"), ("Type", "simple"), ("User", user),
        ("WorkingDirectory", home), ("EnvironmentFile", f"-{home}/device.env"),
        ("ExecStart", f"{home}/launch.sh $SFLAM_DEVICE_ARGS"), ("Restart", "on-failure"), ("RestartSec", "5"),
        ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "read-only"),
        ("ReadWritePaths", home), ("PrivateTmp", "yes"),
    ]
    assert "@" not in unit
    warned = [r.getMessage() for r in caplog.records]
    assert warned == (["the systemd unit will run the device as root; flash as an unprivileged user to avoid that"]
                      if user == "root" else [])


def test_a_unit_template_without_a_user_is_refused() -> None:
    old = "[Service]\nWorkingDirectory=@BUNDLE@\nExecStart=@BUNDLE@/launch.sh\n"  # exported before User=
    with pytest.raises(FlashError, match=r"no User=@USER@ \(exported by an older sflam\): re-export the bundle"):
        render_unit(old, parse_target("ssh://pi@host/home/pi/sflam"), None)


@pytest.mark.parametrize("python", UNSAFE_PYTHONS)
def test_unsafe_interpreter_paths_are_refused_everywhere(python: str) -> None:
    template = "[Service]\nUser=@USER@\nExecStart=@BUNDLE@/launch.sh\n"
    target = parse_target("ssh://pi@host/home/pi/sflam")
    for refuse in (lambda: check_remote_python(python), lambda: FlashOptions(remote_python=python),
                   lambda: render_unit(template, target, python)):
        with pytest.raises(FlashError, match="expected an absolute path of letters, digits") as err:
            refuse()
        assert repr(python) in str(err.value)  # the message names the value, control characters escaped


def test_the_cli_refuses_an_injected_remote_python_before_planning(tmp_path: Path, capsys) -> None:
    # Execute: the bundle does not even exist; the option is refused first
    argv = ["flash", "--bundle", str(tmp_path / "absent"), "--target", "ssh://pi@host/home/pi/sflam",
            "--remote-python", INJECTED, "--dry-run"]
    code = main(argv)
    # Assert
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"sflam flash: error: --remote-python {INJECTED!r}: expected an absolute path")


def test_a_plain_interpreter_path_is_used_as_given() -> None:
    target, python = parse_target("ssh://pi@host/home/pi/sflam"), "/usr/bin/python3"
    unit = render_unit("[Service]\nUser=@USER@\n", target, python)
    assert unit == "[Service]\nEnvironment=SFLAM_PYTHON=/usr/bin/python3\nUser=pi\n"
    step = check_step(target, FlashOptions(remote_python=python))
    assert step.argv[-1] == "cd /home/pi/sflam && SFLAM_PYTHON=/usr/bin/python3 ./launch.sh --check"
