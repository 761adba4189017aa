"""The import rules of docs/architecture.md: the device side never pulls in torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "edge_runtime": {"torch", "server_runtime", "export", "sflam"},
    "allocator": {"torch", "server_runtime", "edge_runtime", "export", "sflam", "paho"},
    "firmware_profiles": {"torch", "server_runtime", "edge_runtime", "export", "allocator", "sflam"},
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_sources_do_not_import_forbidden_modules(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


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
