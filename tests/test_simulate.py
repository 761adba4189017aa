"""``sflam simulate``: options, the generated server config, and whole runs through real processes.

The end-to-end tests run ``python -m sflam simulate`` as a user does: it starts its own mosquitto
on a free loopback port, exports a bundle, starts the server daemon and one process per device,
and must leave no process behind, whether the run completes or is interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_runtime.config import load_config
from sflam import sim_report
from sflam.options import SimOptions, SimulateError, build_options, resolve_options, scheme_plan, server_config
from sflam.progress import read_new_records

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--devices", "4", "--per-round", "2", "--rounds", "2", "--local-epochs", "1", "--batch-size", "16")
# A tiny run that learns in 2 rounds: an IID split, 2 local epochs, Adam on the server side (SGD
# leaves chance level in this few steps). It is deterministic for a seed: seed 0 ends at 24.2 %
# of digits (chance: 10 %), so the tests below ask for more than 18 %.
LEARNS = ("--alpha", "100", "--local-epochs", "2", "--lr", "0.002")
ADAM = '[server.training]\noptimizer = "adam"\n'
ABOVE_CHANCE = 0.18


def _args(**values: object) -> argparse.Namespace:
    from sflam.cli import build_parser

    args = build_parser().parse_args(["simulate"])
    for key, value in values.items():
        setattr(args, key, value)
    return args


def test_defaults_are_the_quickstart() -> None:
    opts = resolve_options(_args())
    assert (opts.devices, opts.per_round, opts.alpha, opts.bits, opts.scheme, opts.dataset) == (
        10, 5, 0.5, "auto", "sflam", "digits")


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "sim.toml"
    config.write_text('[simulate]\ndevices = 6\nrounds = 7\nbits = 4\nprofiles = "raspberry-pi-5,stm32h7"\n'
                      '[server.round]\nmin_completed = 1.0\n')
    # Execute
    opts = resolve_options(_args(config=str(config), rounds=3))
    # Assert
    assert (opts.devices, opts.rounds, opts.bits) == (6, 3, 4)
    assert opts.profiles == ("raspberry-pi-5", "stm32h7")
    assert opts.server == {"round": {"min_completed": 1.0}}


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[simulate]\ndevcies = 3\nper_round = 9\ndevices = 4\nscheme = "sfll"\nbits = 12\n'
                      'profiles = ["raspberry-pi-5", "no-such-board"]\nmodel = "vit_huge"\n[simulat]\n')
    with pytest.raises(SimulateError) as caught:
        resolve_options(_args(config=str(config)))
    problems = caught.value.problems
    text = str(caught.value)
    assert "unknown table [simulat]" in text and "did you mean 'simulate'" in text
    with pytest.raises(SimulateError) as caught:
        build_options({"devcies": 3, "per_round": 9, "devices": 4, "scheme": "sfll", "bits": 12,
                       "profiles": ["raspberry-pi-5", "no-such-board"], "model": "vit_huge"})
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "unknown option 'devcies' (did you mean 'devices'?)" in text
    # the unknown key stops the rest; without it every value problem is listed together
    with pytest.raises(SimulateError) as caught:
        build_options({"per_round": 9, "devices": 4, "scheme": "sfll", "bits": 12,
                       "profiles": ["raspberry-pi-5", "no-such-board"], "model": "vit_huge", "global_pool": "max"})
    text = "\n".join(caught.value.problems)
    for needle in ("per_round 9 exceeds devices 4", "scheme: one of", "bits: 'auto' or one of",
                   "'no-such-board'", "model:", "global_pool: one of token, avg, got 'max'"):
        assert needle in text
    assert len(caught.value.problems) == 6


def test_a_bad_flag_is_a_clear_error_with_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "sflam", "simulate", "--bits", "12"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "expected 'auto' or 1..8, 16, 32, got 12" in result.stderr


def test_schemes_map_onto_the_daemon() -> None:
    base = SimOptions(devices=6, per_round=3, rounds=4)
    sl = scheme_plan(SimOptions(devices=6, per_round=3, rounds=4, scheme="sl"))
    assert (sl.server_rounds, sl.turns_per_round, sl.devices_per_round, sl.mode) == (12, 3, 1, "v2")
    assert scheme_plan(base).bits == "auto" and scheme_plan(SimOptions(scheme="sfl")).bits == 32
    fl = scheme_plan(SimOptions(scheme="fl"))
    assert (fl.mode, fl.device_command) == ("fl", "fl-device")


def test_the_server_config_is_valid_and_carries_the_channels(tmp_path: Path) -> None:
    opts = SimOptions(server={"round": {"min_completed": 1.0}})
    config = server_config(opts, scheme_plan(opts), tmp_path, "mqtt://127.0.0.1:1", {"dev-0": 2.5e-12})
    assert config.quant.bits == "auto" and config.training.devices_per_round == 5
    assert config.allocator.channel_gains == {"dev-0": 2.5e-12}
    assert config.round.min_completed == 1.0 and config.broker.run_id == "sim"
    assert config.checkpoint_dir.is_absolute() and config.metrics_path.is_absolute()


@pytest.mark.parametrize("scheme", ["sflam", "sfl", "sl", "fl"])
def test_the_run_toml_written_from_the_config_parses_back_to_the_same_config(tmp_path: Path, scheme: str) -> None:
    # Prepare: every section touched, by the options and by [server] overrides
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"stand-in")
    bits = 8 if scheme == "sflam" else 32
    opts = SimOptions(scheme=scheme, bits=bits, checkpoint=str(weights), optimizer="adamw", lr=0.003,
                      server={"round": {"min_completed": 1.0}, "allocator": {"lambda_time": 0.5},
                              "metrics": {"prometheus_port": 9101}, "quant": {"per_token": True}})
    config = server_config(opts, scheme_plan(opts), tmp_path / "run", "mqtt://127.0.0.1:1883",
                           {"dev-0": 2.5e-12, "dev-1": 0.125})
    # Execute: what simulate writes, read as the daemon reads it
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    # Assert
    assert load_config(path) == config
    assert config.model.checkpoint == str(weights.resolve()) and config.training.optimizer == "adamw"


def test_records_are_read_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    from test_metrics import sample_record

    second = json.dumps(sample_record(2)).encode()
    path.write_bytes(json.dumps(sample_record(1)).encode() + b"\n" + second[:20])
    records, offset = read_new_records(path, 0)
    assert [r.round for r in records] == [1]
    with open(path, "ab") as handle:
        handle.write(second[20:] + b"\n")
    more, _ = read_new_records(path, offset)
    assert [r.round for r in more] == [2]


def _children_of(out: Path) -> list[str]:
    """Command lines of live processes that mention ``out`` (our broker, server and devices do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def _simulate(out: Path, *extra: str, interruptible: bool = False) -> subprocess.Popen:
    """``sflam simulate`` on the tiny settings; ``interruptible``: with SIGINT's default action, which
    a suite started as a background job (SIGINT ignored, and inherited) would otherwise pass on."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if interruptible else None
    return subprocess.Popen([sys.executable, "-m", "sflam", "simulate", *TINY, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=restore)


def _learning_args(tmp_path: Path) -> tuple[str, ...]:
    config = tmp_path / "adam.toml"
    config.write_text(ADAM)
    return ("--config", str(config), *LEARNS)


@pytest.mark.broker
def test_a_tiny_simulation_runs_end_to_end(tmp_path: Path) -> None:
    # Execute: 4 device processes, 2 per round, 2 rounds, q = 8, over a private mosquitto
    out = tmp_path / "run"
    proc = _simulate(out, "--bits", "8", "--gradient-bits", "8", "--model-bits", "16", *_learning_args(tmp_path))
    output, _ = proc.communicate(timeout=600)
    # Assert
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(sim_report.SUMMARY_KEYS) <= set(summary)
    assert summary["scheme"] == "sflam" and summary["rounds"] == 2 and summary["status"] == "completed"
    assert summary["final_accuracy"] > ABOVE_CHANCE, summary["accuracy_per_round"]  # it learned
    # 8-bit activations: a quarter of float32, plus labels, the device weights and framing
    assert 0.24 < summary["bytes_up"] / summary["bytes_up_fp32"] < 0.40
    # 8-bit gradients and float16 broadcasts: the downlink too
    assert 0.24 < summary["bytes_down"] / summary["bytes_down_fp32"] < 0.40
    assert all(f.allocation.bits_down == 8 for r in sim_report.read_records(out / "metrics.jsonl")
               for f in r.devices.values())
    assert summary["bytes_down"] > 0 and summary["device_energy_j"] > 0
    assert summary["mean_round_latency_s"] > 0 and summary["modeled"]["round_latency_s"] > 0
    records = sim_report.read_records(out / "metrics.jsonl")
    assert len([r for r in records if r.counted]) == 2
    assert all(f.allocation.bits_up == 8 for r in records for f in r.devices.values())
    for name in ("accuracy", "bytes", "energy", "latency"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "final accuracy" in output and "bytes up if fp32" in output
    best = summary["best_on_validation"]  # picked on the validation set, reported on the test set
    assert best["round"] in (1, 2) and best["test_accuracy"] in summary["accuracy_per_round"]
    assert all(r.validation_accuracy is not None for r in records if r.counted)
    assert _children_of(out) == []  # broker, server and devices all gone


@pytest.mark.broker
def test_the_embedded_amqtt_fallback_runs_the_same_simulation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _simulate(out, "--broker", "amqtt", "--bits", "8", *_learning_args(tmp_path))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    assert "AmqttBroker" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > ABOVE_CHANCE, summary["accuracy_per_round"]
    assert _children_of(out) == []


@pytest.mark.broker
def test_ctrl_c_stops_every_process_and_keeps_the_partial_results(tmp_path: Path) -> None:
    # Prepare: a run long enough to interrupt
    out = tmp_path / "run"
    proc = _simulate(out, "--rounds", "50", interruptible=True)
    deadline = time.monotonic() + 300
    while not sim_report.read_records(out / "metrics.jsonl"):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    # Execute
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    # Assert
    assert proc.returncode == 130, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["rounds"] < 50
    assert _children_of(out) == []


def test_the_paper_scale_config_names_what_is_missing_and_is_complete(tmp_path: Path, monkeypatch) -> None:
    # Execute: from a directory without the data and weights
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SimulateError) as caught:
        resolve_options(_args(config=str(ROOT / "examples" / "paper_vit_b32.toml")))
    text = str(caught.value)
    assert "checkpoint: no such file weights/vit_base_patch32_224.npz" in text
    assert "no directory data/cifar-10-batches-bin" in text
    # ... and with them in place (only their presence is checked here), the paper's settings
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vit_base_patch32_224.npz").write_bytes(b"stand-in")
    (tmp_path / "data" / "cifar-10-batches-bin").mkdir(parents=True)
    opts = resolve_options(_args(config=str(ROOT / "examples" / "paper_vit_b32.toml")))
    assert (opts.model, opts.devices, opts.per_round, opts.batch_size, opts.local_epochs, opts.alpha) == (
        "vit_base_patch32_224", 50, 10, 128, 5, 0.5)
    config = server_config(opts, scheme_plan(opts), tmp_path, "mqtt://127.0.0.1:1")
    assert config.model.preset == "vit_base_patch32_224" and config.training.batch_size == 128
    assert config.compute.device == "auto" and config.compute.amp == "auto"
    assert (config.data.augment_crop_padding, config.data.augment_hflip) == (4, True)


def test_an_sl_round_may_give_one_device_two_turns(tmp_path: Path) -> None:
    # Prepare: a scenario and an SL round of 3 turns in which dev-1 trains twice
    import dataclasses

    from allocator.scenario import dump_scenario, generate_scenario
    from server_runtime.round_record import PhaseTimes
    from test_metrics import typed_record

    problem = generate_scenario(3, 0, model="vit_quick_patch4_16")
    fleet = dataclasses.replace(problem.fleet, ids=("dev-0", "dev-1", "dev-2"))
    dump_scenario(dataclasses.replace(problem, fleet=fleet), tmp_path / "scenario.json")
    turns = [dataclasses.replace(typed_record(k + 1, accuracy=0.5 if k == 2 else None), selected=(d,),
                                 completed=(d,), devices={}, phases_s=PhaseTimes(0.0, 1.0, 0.0, 0.0))
             for k, d in enumerate(("dev-1", "dev-0", "dev-1"))]
    opts = dataclasses.asdict(SimOptions(devices=3, per_round=3, rounds=1, scheme="sl"))
    # Execute
    summary = sim_report.summarize(opts, turns, tmp_path, wall_s=1.0)
    # Assert: the modeled round is the three turns in sequence
    one, zero = (sim_report.modeled_round(sim_report.load_problem(tmp_path), "sl", [d], [], "vit_quick_patch4_16")
                 for d in ("dev-1", "dev-0"))
    assert summary["rounds"] == 1 and summary["final_accuracy"] == 0.5
    assert summary["modeled"]["round_latency_s"] == pytest.approx(2 * one[0] + zero[0])
    assert summary["modeled"]["energy_j"] == pytest.approx(2 * one[1] + zero[1])



def test_auto_bits_on_loopback_links_is_not_modeled(tmp_path: Path) -> None:
    # Prepare: one round on a scenario, as auto-allocated sflam and as fp32 sfl, both without emulated links
    import dataclasses

    from allocator.scenario import dump_scenario, generate_scenario
    from server_runtime.round_record import PhaseTimes
    from test_metrics import typed_record

    problem = generate_scenario(2, 0, model="vit_quick_patch4_16")
    dump_scenario(dataclasses.replace(problem, fleet=dataclasses.replace(problem.fleet, ids=("dev-0", "dev-1"))),
                  tmp_path / "scenario.json")
    record = dataclasses.replace(typed_record(1, accuracy=0.5), selected=("dev-0", "dev-1"),
                                 completed=("dev-0", "dev-1"), devices={}, phases_s=PhaseTimes(0.0, 1.0, 0.0, 0.0))
    auto, sfl = (dataclasses.asdict(SimOptions(devices=2, per_round=2, rounds=1, scheme=scheme, bits=bits,
                                               emulate_link=False))
                 for scheme, bits in (("sflam", "auto"), ("sfl", "auto")))
    # Execute
    auto_summary = sim_report.summarize(auto, [record], tmp_path, wall_s=1.0)
    sfl_summary = sim_report.summarize(sfl, [record], tmp_path, wall_s=1.0)
    # Assert: the allocator's loopback-calibrated choice is not scored on the scenario's radios; a fixed one is
    assert auto_summary["modeled"]["round_latency_s"] is None and "loopback" in auto_summary["modeled"]["note"]
    assert sfl_summary["modeled"]["round_latency_s"] > 0

# ---------------------------------------------------------------------------------------------
# from anywhere: the run directory and every child's paths do not depend on the checkout

ONE_ROUND = ("--rounds", "1", "--devices", "2", "--per-round", "1", "--local-epochs", "1", "--batch-size", "16")


def _simulate_in(cwd: Path, env: dict[str, str]) -> Path:
    """``sflam simulate`` (default --out) started in ``cwd``; the run directory it made there."""
    result = subprocess.run([sys.executable, "-m", "sflam", "simulate", *ONE_ROUND], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = (cwd / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert _children_of(run) == []
    return run


@pytest.mark.broker
def test_simulate_runs_from_a_directory_outside_the_repository(tmp_path: Path) -> None:
    # Prepare: a user's own directory (the package is found as installed, or on PYTHONPATH)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ)
    # Execute + Assert: the run lands under the user's directory, and it completes
    run = _simulate_in(elsewhere, env)
    assert run.name.startswith("sim-sflam-") and (run / "run.toml").is_file()


@pytest.mark.broker
def test_simulate_runs_from_a_non_editable_install_of_the_wheel(tmp_path: Path) -> None:
    # Prepare: build the wheel and install it (not editable) into a folder of its own
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("sflam-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import sflam, sflam_common.version as v; "
                            "print(sflam.__file__); print(v.__version__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    where, version = probe.stdout.split()
    assert Path(where).is_relative_to(target) and version != "0+unknown"
    # Execute + Assert
    _simulate_in(elsewhere, env)


# ---------------------------------------------------------------------------------------------
# --resample: fleets larger than the data set

TOO_MANY = "1000 devices x 10 samples needs 10000 training images; digits has 1295 for the devices"


def test_resample_parses_from_the_flag_and_from_a_toml_table(tmp_path: Path) -> None:
    # Prepare
    from sflam.cli import build_parser
    from sflam.options import options_json

    as_text, as_list = tmp_path / "text.toml", tmp_path / "list.toml"
    as_text.write_text('[simulate]\ndevices = 1000\nper_round = 50\nresample = "20-40"\n')
    as_list.write_text("[simulate]\ndevices = 1000\nper_round = 50\nresample = [20, 40]\n")
    flags = build_parser().parse_args(["simulate", "--devices", "1000", "--per-round", "50", "--resample", "20-40"])
    # Execute
    from_flag = resolve_options(flags)
    from_text, from_list = (resolve_options(_args(config=str(path))) for path in (as_text, as_list))
    # Assert: the same tuple every way; options.json records a list, or null without it
    assert from_flag.resample == from_text.resample == from_list.resample == (20, 40)
    assert options_json(from_flag)["resample"] == [20, 40]
    assert json.loads(json.dumps(options_json(SimOptions())))["resample"] is None


def test_bad_resample_values_are_listed_with_every_other_problem() -> None:
    import re

    # Execute: a reversed range, a zero LO, and two problems of other options
    with pytest.raises(SimulateError) as caught:
        build_options({"resample": [0, -1], "devices": 4, "per_round": 9, "lr": -1.0})
    # Assert
    assert sorted(caught.value.problems) == sorted([
        "resample: LO must be >= 1, got 0", "resample: needs LO <= HI, got [0, -1]",
        "per_round 9 exceeds devices 4", "lr: must be a positive number, got -1.0"])
    # ... and values that are not a range at all, as text (the flag, or TOML) or as a list
    for value, needle in (("20to40", "--resample expects LO-HI"), ("40-20", "1 <= LO <= HI, got 40-20"),
                          ([20], 'expected "LO-HI" or [LO, HI]'), ([20, 40.5], 'expected "LO-HI" or [LO, HI]')):
        with pytest.raises(SimulateError, match=re.escape(needle)):
            build_options({"resample": value})


def test_a_fleet_larger_than_the_data_set_names_both_numbers_and_the_flag() -> None:
    # Execute
    with pytest.raises(SimulateError) as caught:
        build_options({"devices": 1000, "per_round": 50, "rounds": 1})
    # Assert: the sizes, the way out, and no option a user cannot set
    (problem,) = caught.value.problems
    assert TOO_MANY in problem and "--resample LO-HI" in problem and "at most 129 devices" in problem
    assert "min_samples" not in problem
    assert build_options({"devices": 1000, "per_round": 50, "resample": "20-40"}).devices == 1000
    assert build_options({"devices": 129, "per_round": 50}).devices == 129


def test_the_too_large_fleet_is_refused_before_anything_starts() -> None:
    # Execute
    result = subprocess.run([sys.executable, "-m", "sflam", "simulate", "--devices", "1000", "--per-round", "50",
                             "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert result.returncode == 2
    assert TOO_MANY in result.stderr and "--resample LO-HI" in result.stderr and "Traceback" not in result.stderr
    assert "broker:" not in result.stdout


def test_a_data_set_checked_only_when_split_is_refused_with_the_same_words() -> None:
    # Prepare: options not validated against the data set (as for folder:<dir>), 1000 labels
    import numpy as np

    from sflam.simulate import split_training_set

    labels = np.resize(np.arange(10), 1000)
    # Execute
    with pytest.raises(SimulateError) as caught:
        split_training_set(SimOptions(devices=200, per_round=5), labels, "flowers")
    # Assert
    assert "200 devices x 10 samples needs 2000 training images; flowers has 1000" in str(caught.value)
    assert "--resample LO-HI" in str(caught.value)


def test_without_resample_the_split_is_the_dirichlet_partition_as_before() -> None:
    # Prepare
    import numpy as np

    from server_runtime.data import partition
    from sflam.simulate import split_training_set

    labels = np.random.default_rng(0).permutation(np.resize(np.arange(10), 1438))
    opts = SimOptions(devices=20, alpha=0.3, seed=3)
    # Execute
    parts = split_training_set(opts, labels, "digits")
    # Assert
    expected = partition(labels, 20, "dirichlet", alpha=0.3, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))


def test_with_resample_prepare_writes_1000_shards_of_20_to_40_images(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the bundle export is not under test here
    import numpy as np

    from allocator.scenario import load_scenario
    from sflam import simulate

    monkeypatch.setattr(simulate, "_export", lambda opts, out, num_classes: out / "bundle")
    opts = build_options({"devices": 1000, "per_round": 50, "rounds": 1, "resample": "20-40"})
    # Execute
    prepared = simulate.prepare(opts, tmp_path, "mqtt://127.0.0.1:1")
    # Assert: one shard per device, each of 20-40 digits images with its labels, drawn from 1438
    shards = sorted((tmp_path / "shards").glob("*.npz"))
    assert len(shards) == len(prepared.devices) == 1000
    sizes = []
    for spec in prepared.devices:
        with np.load(spec.shard) as shard:
            images, labels = shard["images"], shard["labels"]
        assert len(images) == len(labels) == spec.samples and images.shape[1:] == (8, 8, 3)
        sizes.append(spec.samples)
    assert min(sizes) >= 20 and max(sizes) <= 40 and sum(sizes) > 1438
    fleet = load_scenario(tmp_path / "scenario.json").fleet
    assert fleet.ids[0] == "dev-000" and fleet.samples.tolist() == [n * opts.local_epochs for n in sizes]
    assert load_config(prepared.config_path).training.min_devices == 1000


def test_the_validation_set_is_held_out_of_every_shard_and_given_to_the_server(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the default quickstart fleet; the bundle export is not under test here
    import numpy as np

    from server_runtime.data import load_dataset
    from sflam import simulate

    monkeypatch.setattr(simulate, "_export", lambda opts, out, num_classes: out / "bundle")
    opts = build_options({"rounds": 1, "seed": 4})
    # Execute
    prepared = simulate.prepare(opts, tmp_path, "mqtt://127.0.0.1:1")
    # Assert: the shards hold the training set less the validation set, the server holds that set out
    config = load_config(prepared.config_path)
    assert opts.validation_fraction == config.data.validation_fraction == 0.1
    split = load_dataset("digits", seed=config.seed, validation_fraction=config.data.validation_fraction)
    shard_images = []
    for spec in prepared.devices:
        with np.load(spec.shard) as shard:
            shard_images += [image.tobytes() for image in shard["images"]]
    validation = {image.tobytes() for image in split.validation.images}
    assert len(shard_images) == len(split.train) == 1438 - len(split.validation) and len(validation) == 143
    assert validation.isdisjoint(shard_images)  # digits has no duplicate images: disjoint by content
    assert {image.tobytes() for image in split.test.images}.isdisjoint(shard_images)


# ---------------------------------------------------------------------------------------------
# fleets on device hosts


@pytest.mark.broker
def test_two_hundred_devices_on_two_hosts_train_two_rounds(tmp_path: Path) -> None:
    # Execute: 200 real MQTT sessions in 2 device-host processes, 10 selected per round
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sflam", "simulate", "--devices", "200", "--per-round", "10", "--rounds", "2",
         "--hosts", "2", "--resample", "20-40", "--local-epochs", "1", "--bits", "8", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Assert: every device announced itself, both rounds counted with all 10, nothing left running
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["hosts"], summary["devices_connected"]) == (
        "completed", 2, 2, 200)
    assert summary["peak_rss_mib"] > 0
    records = sim_report.read_records(out / "metrics.jsonl")
    assert [len(r.completed) for r in records] == [10, 10] and not any(r.failed for r in records)
    assert sorted(p.name for p in (out / "hosts").iterdir()) == ["host-0.json", "host-1.json"]
    assert _children_of(out) == []


def test_device_hosts_refuse_what_they_cannot_share() -> None:
    with pytest.raises(SimulateError) as caught:
        build_options({"devices": 100, "per_round": 5, "hosts": 2, "backend": "litert", "resample": [20, 40]})
    assert "pass --hosts 0" in str(caught.value)
    with pytest.raises(SimulateError, match="hosts: must be >= 0"):
        build_options({"hosts": -1})


@pytest.mark.parametrize(
    ("flags", "gradient_bits", "model_bits"),
    [({}, "auto", 16), ({"bits": 8}, 32, 16), ({"scheme": "sfl"}, 32, 32), ({"scheme": "fl"}, 32, 32),
     ({"gradient_bits": 8}, 8, 16), ({"model_bits": 32}, "auto", 32)],
)
def test_the_downlink_defaults_follow_the_scheme(flags: dict, gradient_bits: object, model_bits: int) -> None:
    # sflam with bits auto quantizes both directions; the float32 baselines stay float32 throughout
    opts = resolve_options(_args(**flags))
    assert (opts.gradient_bits, opts.model_bits) == (gradient_bits, model_bits)


@pytest.mark.broker
@pytest.mark.parametrize("hosts", ["0", "1"], ids=["a-process-per-device", "a-device-host"])
def test_a_signed_simulation_signs_and_checks_every_message(tmp_path: Path, hosts: str) -> None:
    # Execute: --sign, with a process per device and with the devices in one device host
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sflam", "simulate", *ONE_ROUND, "--sign", "--hosts", hosts,
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Assert: the run completed signed, the server accepted the devices' work and refused nothing
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["signing"]) == ("completed", 1, "ed25519")
    assert load_config(out / "run.toml").security.signed
    server_log = (out / "logs" / "server.log").read_text()
    assert "messages signed (Ed25519)" in server_log
    counters = json.loads(next(line for line in server_log.splitlines()
                               if line.startswith("sflam-server-summary ")).split(" ", 1)[1])["counters"]
    assert counters.get("receiver.accepted.Activations", 0) > 0 and counters.get("receiver.accepted.RoundUpdate") == 1
    assert not any("SignatureError" in key for key in counters), counters
    assert oct((out / "keys" / "devices" / "dev-0.key").stat().st_mode & 0o777) == "0o600"
    assert _children_of(out) == []
