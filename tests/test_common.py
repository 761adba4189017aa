"""sflam_common: the collected-problems error, the hint, the bit widths and the one version."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

from sflam_common.bits import BIT_WIDTHS, BIT_WIDTHS_TEXT, is_bit_width
from sflam_common.problems import ProblemsError, did_you_mean, format_problems
from sflam_common.version import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_one_problem_is_one_line_and_several_are_counted_and_listed() -> None:
    assert format_problems(["port: must be >= 1"], "run.toml") == "run.toml: port: must be >= 1"
    assert format_problems(["a", "b"], "run.toml") == "run.toml: 2 problems:\n  - a\n  - b"
    assert format_problems(["a", "b"]) == "2 problems:\n  - a\n  - b"


def test_the_error_keeps_every_problem_and_survives_pickling() -> None:
    error = ProblemsError("profile x", ["a", "b"])
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(error, ValueError)
    assert (restored.source, restored.problems, str(restored)) == ("profile x", ["a", "b"], str(error))


def test_a_hint_names_the_likely_typo_and_nothing_else() -> None:
    assert did_you_mean("optimiser", ["optimizer", "lr"]) == " (did you mean 'optimizer'?)"
    assert did_you_mean("trainig", ["training"], show="[{}]") == " (did you mean [training]?)"
    assert did_you_mean("zzz", ["optimizer"]) == "" and did_you_mean(3, ["optimizer"]) == ""


def test_bit_widths_are_the_packed_codes_and_the_two_floats() -> None:
    assert BIT_WIDTHS == (1, 2, 3, 4, 5, 6, 7, 8, 16, 32) and BIT_WIDTHS_TEXT == "1..8, 16, 32"
    assert is_bit_width(8) and not is_bit_width(True) and not is_bit_width(8.0) and not is_bit_width(12)


def test_the_version_is_the_one_in_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared
