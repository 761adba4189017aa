"""The suite's skip policy (tests/conftest.py): only tests marked ``cuda`` may skip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = """
import pytest

def test_runs():
    pass

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("needs a CUDA device")
"""


@pytest.fixture()
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    return pytester


def test_a_cuda_only_skip_passes_the_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_ok=TESTS)
    result = suite.runpytest_subprocess()
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["skipped: 1 (1 CUDA-only, 0 not allowed)"])


@pytest.mark.parametrize("skipping", [
    "def test_other():\n    pytest.skip('mosquitto is not installed')\n",
    "pytest.importorskip('no_such_module_for_sflam')\n",
])
def test_any_other_skip_fails_the_run_and_is_named(suite: pytest.Pytester, skipping: str) -> None:
    suite.makepyfile(test_ok=TESTS, test_other="import pytest\n" + skipping)
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["skipped: 2 (1 CUDA-only, 1 not allowed)", "  not allowed to skip: test_other.py*",
                                 "failing the run: only tests marked `cuda` may skip*"])
    assert suite.runpytest_subprocess("--allow-skips").ret == 0
