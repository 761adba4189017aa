"""The import rules of docs/architecture.md: the device side never pulls in torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers of docs/architecture.md: each package may import the project packages listed for it
# (and any module named in EXCEPTIONS), nothing else of the project. sflam_common is the bottom,
# sflam the front door on top.
PROJECT = ("sflam_common", "firmware_profiles", "edge_runtime", "allocator", "server_runtime", "export", "sflam")
MAY_IMPORT = {
    "sflam_common": set(),
    "firmware_profiles": {"sflam_common"},
    "edge_runtime": {"sflam_common", "firmware_profiles"},
    "allocator": {"sflam_common", "firmware_profiles"},
    "server_runtime": {"sflam_common", "firmware_profiles", "edge_runtime", "allocator"},
    "export": {"sflam_common", "firmware_profiles", "edge_runtime", "server_runtime"},
    "sflam": set(PROJECT) - {"sflam"},
}
# single modules a package may import from a layer it otherwise may not: the ViT shape registry
# is torch-free, and the allocator takes model shapes from it rather than restating them
EXCEPTIONS = {"allocator": {"server_runtime.presets"}}
# third-party modules a package must never import
NEVER = {
    "sflam_common": {"torch", "numpy"},
    "firmware_profiles": {"torch"},
    "edge_runtime": {"torch"},
    "allocator": {"torch", "paho"},
}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def _offences(package: str, modules: set[str]) -> list[str]:
    bad = []
    for module in sorted(modules):
        root = module.split(".")[0]
        if root in NEVER.get(package, ()):
            bad.append(module)
        elif root in PROJECT and root != package and root not in MAY_IMPORT[package]:
            if module not in EXCEPTIONS.get(package, ()):
                bad.append(module)
    return bad


@pytest.mark.parametrize("package", PROJECT)
def test_package_sources_import_only_the_layers_below(package: str) -> None:
    offenders = {str(path.relative_to(ROOT)): _offences(package, _imported_modules(path))
                 for path in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_layer_rule_catches_an_upward_import() -> None:
    assert _offences("export", {"sflam", "sflam.simulate"}) == ["sflam", "sflam.simulate"]
    assert _offences("server_runtime", {"export.bundle", "numpy"}) == ["export.bundle"]
    assert _offences("allocator", {"server_runtime.presets", "server_runtime.trainer"}) == ["server_runtime.trainer"]
    assert _offences("sflam_common", {"numpy", "difflib"}) == ["numpy"]


def _documented_layers() -> dict[str, tuple[set[str], set[str], set[str]]]:
    """docs/architecture.md's table: package -> (packages, single modules, never) as written there."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`\w+`", cells[0]):
            continue
        names = set(re.findall(r"`([\w.]+)`", cells[1]))
        packages = set(PROJECT) - {"sflam"} if cells[1] == "all of the above" else names & set(PROJECT)
        never = {name.strip() for name in cells[2].split(",") if name.strip()}
        rows[cells[0].strip("`")] = (packages, {n for n in names if "." in n}, never)
    return rows


def test_the_documented_layers_are_the_enforced_ones() -> None:
    documented = _documented_layers()
    assert set(documented) == set(PROJECT)
    for package, (packages, modules, never) in documented.items():
        assert (packages, modules, never) == (MAY_IMPORT[package], EXCEPTIONS.get(package, set()),
                                              NEVER.get(package, set())), package


def test_the_modules_named_as_exceptions_stay_free_of_torch() -> None:
    modules = _modules_after("import allocator.scenario, allocator.cli, server_runtime.presets")
    assert "server_runtime.presets" in modules and "torch" not in modules


def _modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return set(result.stdout.split())


def test_import_edge_runtime_leaves_torch_out() -> None:
    code = (
        "import pkgutil, importlib, edge_runtime\n"
        "for m in pkgutil.walk_packages(edge_runtime.__path__, 'edge_runtime.'):\n"
        "    importlib.import_module(m.name)"
    )
    modules = _modules_after(code)
    assert "edge_runtime" in modules
    assert "torch" not in modules


def test_the_fleet_page_reads_no_torch_state() -> None:
    # its server and snapshot are bookkeeping over the daemon's registry and round records
    modules = _modules_after("import server_runtime.dashboard, server_runtime.fleet_view, sflam.testing.browser")
    assert {"server_runtime.dashboard", "server_runtime.fleet_view"} <= modules
    assert "torch" not in modules


def test_the_cli_front_door_and_profiles_commands_do_not_import_torch() -> None:
    code = (
        "import contextlib, io\n"
        "from sflam.cli import build_parser, main\n"
        "build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['profiles', 'list'])"
    )
    modules = _modules_after(code)
    assert "sflam.cli" in modules and "firmware_profiles" in modules
    assert "torch" not in modules


def test_sflam_help_lists_the_subcommands() -> None:
    result = subprocess.run([sys.executable, "-m", "sflam", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for command in ("profiles", "models", "data", "export", "flash", "quickstart"):
        assert command in result.stdout


def test_a_bad_cli_argument_says_what_is_wrong() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sflam", "data", "partition", "--devices", "0"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "expected a number >= 1, got 0" in result.stderr


def _subcommands() -> list[str]:
    from sflam.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_help_starts_without_torch(command: str) -> None:
    code = (
        "import contextlib, io\n"
        "from sflam.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main([{command!r}, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code"
    )
    assert "torch" not in _modules_after(code)
