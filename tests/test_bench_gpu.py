"""benchmarks/bench_gpu.py and scripts/gpu_check.sh on a machine without a GPU: the CPU smoke
run, the trainer ranks' all-reduce (over gloo) against the server's FedAvg, and the check script's
no-CUDA path. Nothing here is marked ``cuda``: it all runs on CPU."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server_runtime.trainer import SplitTrainer

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(centralized|split, sequential step|split, step_many) +([0-9.]+) +([0-9.]+|n/a) +", re.M)
QUICK = ["--quick", "--device", "cpu"]


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    """The benchmark as a module, importable by name (spawned ranks import it too)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("bench_gpu")


def _rates(output: str) -> dict[str, float]:
    return {match.group(1): float(match.group(2)) for match in ROW.finditer(output)}


def test_quick_cpu_run_prints_every_row_with_a_positive_throughput() -> None:
    # Execute
    result = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", *QUICK], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    # Assert
    assert result.returncode == 0, result.stderr
    rates = _rates(result.stdout)
    assert rates["centralized"] > 0 and rates["split, sequential step"] > 0
    if hasattr(SplitTrainer, "step_many"):
        assert rates["split, step_many"] > 0
    else:
        assert "split, step_many: n/a (step_many not available)" in result.stdout
    if torch.cuda.device_count() < 2:
        assert f"two ranks: skipped (needs 2 GPUs, found {torch.cuda.device_count()})" in result.stdout
    assert "the figures are the server's throughput" in result.stdout
    assert "bf16 autocast off" in result.stdout


def test_the_step_many_row_says_na_when_the_trainer_has_none(bench, monkeypatch, capsys) -> None:
    # Prepare
    monkeypatch.delattr(SplitTrainer, "step_many", raising=False)
    # Execute
    code = bench.main(QUICK)
    # Assert
    output = capsys.readouterr().out
    assert code == 0
    assert "split, step_many: n/a (step_many not available)" in output
    assert set(_rates(output)) == {"centralized", "split, sequential step"}


def test_running_out_of_gpu_memory_is_a_failed_row_that_suggests_a_smaller_batch(bench) -> None:
    # Prepare
    settings = bench.Settings("vit_quick_patch4_16", batch=8, devices=3, steps=2, rounds=1)

    def out_of_memory() -> float:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    # Execute
    row = bench.measure("centralized", settings, torch.device("cpu"), out_of_memory)
    # Assert
    assert row.failed and row.samples_per_s is None
    assert row.note == "out of GPU memory at batch 8: try a smaller --batch (e.g. --batch 4)"


def test_bad_arguments_are_all_reported_at_once(bench, capsys) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batch", "0", "--rounds", "-1", "--preset", "vit_nonexistent"])
    # Assert
    message = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--batch must be >= 1, got 0" in message and "--rounds must be >= 1, got -1" in message
    assert "unknown model preset 'vit_nonexistent'" in message


def test_two_ranks_all_reduce_to_the_servers_fedavg_of_every_copy(bench) -> None:
    # Prepare: the ranks (gloo on CPU) each train 2 of 4 devices; one trainer trains all 4
    settings = bench.Settings("vit_quick_patch4_16", batch=4, devices=4, steps=2, rounds=1)
    cpu = torch.device("cpu")
    reference = bench.build_trainer(settings, cpu)
    start = bench.server_checksum(reference)
    plan, ids = bench.plan_for(reference, settings), bench.device_ids(settings.devices)
    # Execute
    reports = bench.spawn_ranks(settings, "cpu")
    for _ in range(bench.WARMUP_ROUNDS + settings.rounds):
        bench.run_round(reference, ids, plan, settings, bench.step_sequential, bench.finish_local)
    # Assert: equal on both ranks; equal to the server's FedAvg to 1e-3 of what training changed
    expected = bench.server_checksum(reference)
    assert reports[0].checksum == reports[1].checksum
    assert abs(reports[0].checksum - expected) <= 1e-3 * abs(expected - start)
    assert all(report.seconds > 0 and report.peak_gib is None for report in reports)


def _two_gpus_reporting(bench, monkeypatch: pytest.MonkeyPatch, reports=None, error=None) -> None:
    """Pretend two GPUs are present and the spawned ranks return ``reports`` (or raise ``error``)."""
    def spawn_ranks(settings, device_type="cuda"):
        if error is not None:
            raise error
        return reports

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(bench, "spawn_ranks", spawn_ranks)


def test_the_two_rank_row_counts_both_ranks_samples_over_the_slower_rank(bench, monkeypatch) -> None:
    # Prepare: 10 devices x 3 steps x batch 4 = 120 samples a round, 2 timed rounds
    settings = bench.Settings("vit_quick_patch4_16", batch=4, devices=10, steps=3, rounds=2)
    reports = [bench.RankReport(0.5, 1.0, 7.0), bench.RankReport(2.0, 3.0, 7.0)]
    _two_gpus_reporting(bench, monkeypatch, reports)
    # Execute
    row = bench.run_two_ranks(settings, torch.device("cuda"))
    # Assert
    assert (row.samples_per_s, row.peak_gib, row.failed) == (120.0, 3.0, False)


@pytest.mark.parametrize(("checksums", "error", "note"), [
    ((7.0, 7.5), None, "failed: the ranks' server parts differ after the all-reduce"),
    ((7.0, 7.0), "torch.OutOfMemoryError: CUDA out of memory", "out of GPU memory at batch 4"),
])
def test_a_failed_or_inconsistent_rank_fails_the_two_rank_row(bench, monkeypatch, checksums, error, note) -> None:
    # Prepare
    settings = bench.Settings("vit_quick_patch4_16", batch=4, devices=10, steps=3, rounds=2)
    reports = [bench.RankReport(1.0, 1.0, checksum) for checksum in checksums]
    raised = None if error is None else torch.multiprocessing.ProcessRaisedException(error, 1, 4242)
    _two_gpus_reporting(bench, monkeypatch, reports, raised)
    # Execute
    row = bench.run_two_ranks(settings, torch.device("cuda"))
    # Assert
    assert row.failed and row.samples_per_s is None and row.note.startswith(note)


def test_two_ranks_are_skipped_below_two_gpus(bench, monkeypatch) -> None:
    # Prepare
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    settings = bench.Settings("vit_quick_patch4_16", batch=4, devices=10, steps=3, rounds=2)
    # Execute
    row = bench.run_two_ranks(settings, torch.device("cuda"))
    # Assert
    assert not row.failed and f"{row.name}: {row.note}" == "two ranks: skipped (needs 2 GPUs, found 1)"


def test_gpu_check_runs_from_any_directory_and_says_when_there_is_no_cuda(tmp_path: Path) -> None:
    # Prepare: one test file's CUDA tests, not the whole suite's; a tiny benchmark if a GPU is here
    env = {**os.environ, "SFLAM_GPU_CHECK_PYTEST_ARGS": "tests/test_quantize_torch.py -k cuda",
           "SFLAM_GPU_CHECK_BENCH_ARGS": "--quick"}
    # Execute
    result = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "==> CUDA tests: passed" in result.stdout
    if torch.cuda.is_available():
        assert "==> GPU check passed" in result.stdout and "split, sequential step" in result.stdout
    else:
        assert "no CUDA device: the CUDA tests skip and the GPU benchmark is not run" in result.stdout
        assert "==> GPU benchmark" not in result.stdout and "bench_gpu:" not in result.stdout
