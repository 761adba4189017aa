"""server_runtime.config: defaults, the example file, every problem reported at once, overrides."""

from __future__ import annotations

import json
import pickle
import re
import tomllib
from pathlib import Path

import pytest

from server_runtime.config import (
    AllocatorSection,
    BrokerSection,
    CheckpointSection,
    ComputeSection,
    ConfigError,
    DataSection,
    MetricsSection,
    ModelSection,
    QuantSection,
    RoundSection,
    RunConfig,
    SecuritySection,
    TrainingSection,
    load_config,
    parse_config,
)
from sflam_common.problems import ProblemsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "run.toml"


def _problems(text: str, overrides: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "run.toml", overrides)
    return caught.value.problems


def test_an_empty_file_gives_the_documented_defaults() -> None:
    # Execute
    config = parse_config("", "empty.toml")

    # Assert
    assert config == RunConfig()
    assert config.source == "empty.toml"
    assert config.model.preset == "vit_quick_patch4_16"
    assert config.training.rounds == 10 and config.training.optimizer == "sgd"
    assert config.quant.bits == 8 and config.quant.gradient_bits == 32
    assert config.round.total_bandwidth_hz == 20e6
    assert config.broker.url == "mqtt://127.0.0.1:1883"
    assert config.checkpoint_dir == Path("runs/default")
    assert config.metrics_path == Path("runs/default/metrics.jsonl")


def test_the_example_file_loads_with_the_run_it_describes() -> None:
    # Execute
    config = load_config(EXAMPLE)

    # Assert
    assert config.source == str(EXAMPLE)
    assert config.model.preset == "vit_quick_patch4_16"
    assert config.data.eval == "digits"
    assert (config.training.rounds, config.training.devices_per_round) == (3, 3)


def test_the_example_file_shows_every_key() -> None:
    # Prepare: a key shown commented out counts as shown
    text = re.sub(r"(?m)^# (\w+ = )", r"\1", EXAMPLE.read_text())

    # Execute
    shown = tomllib.loads(text)

    # Assert
    for name, value in RunConfig().to_dict().items():
        if isinstance(value, dict):
            assert set(shown[name]) == set(value), name
        else:
            assert name in shown


def test_five_mistakes_are_reported_together() -> None:
    # Prepare
    text = """
seed = -1
[training]
rounds = 0
optimizer = "lion"
[round]
min_completed = 1.5
[broker]
url = "http://127.0.0.1"
"""

    # Execute
    problems = _problems(text)

    # Assert
    assert problems == [
        "seed: must be an integer >= 0, got -1",
        "training.rounds: must be an integer >= 1, got 0",
        "training.optimizer: must be one of 'sgd', 'adam', 'adamw', got 'lion'",
        "round.min_completed: must be a fraction in (0, 1], got 1.5",
        "broker.url: broker URL must start with mqtt:// or mqtts://, got 'http://127.0.0.1'",
    ]


def test_the_devices_augmentation_is_checked() -> None:
    problems = _problems("[data]\naugment_crop_padding = 65\naugment_hflip = \"yes\"\n")
    assert problems[0] == "data.augment_crop_padding: must be a whole number of pixels in 0..64, got 65"
    assert problems[1].startswith("data.augment_hflip: must be") and len(problems) == 2


def test_the_message_counts_and_lists_the_problems() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        parse_config("[training]\nrounds = 0\nlr = 0\n", "run.toml")

    # Assert
    assert str(caught.value) == (
        "run.toml: 2 problems:\n"
        "  - training.rounds: must be an integer >= 1, got 0\n"
        "  - training.lr: must be a finite number > 0, got 0"
    )
    assert isinstance(caught.value, ValueError)


def test_one_problem_is_one_line_and_the_error_pickles() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        parse_config("[training]\nrounds = 0\n", "run.toml")
    restored = pickle.loads(pickle.dumps(caught.value))

    # Assert
    assert str(caught.value) == "run.toml: training.rounds: must be an integer >= 1, got 0"
    assert isinstance(caught.value, ProblemsError)
    assert type(restored) is ConfigError
    assert (restored.source, restored.problems, str(restored)) == ("run.toml", caught.value.problems, str(caught.value))


def test_misspelt_keys_and_sections_get_a_suggestion() -> None:
    # Prepare
    text = """
sed = 3
rounds = 3
[trainig]
rounds = 3
[training]
optimzer = "adam"
deadline_s = 10
"""

    # Execute
    problems = _problems(text)

    # Assert
    assert problems == [
        "sed: unknown top-level key (did you mean 'seed'?)",
        "rounds: unknown top-level key (did you mean training.rounds?)",
        "[trainig]: unknown section (did you mean [training]?)",
        "training.optimzer: unknown key (did you mean 'optimizer'?)",
        "training.deadline_s: unknown key (did you mean round.deadline_s?)",
    ]


def test_a_section_with_no_close_name_lists_the_sections() -> None:
    # Execute / Assert
    assert _problems("[zzz]\nx = 1") == [
        "[zzz]: unknown section (sections: [model], [data], [training], [quant], [round], [broker], [security], "
        "[checkpoint], [metrics], [compute], [allocator])"
    ]


@pytest.mark.parametrize(
    ("section", "line", "problem"),
    [
        ("training", "rounds = true", "rounds: must be an integer >= 1, got True (bool)"),
        ("training", "lr = true", "lr: must be a finite number > 0, got True (bool)"),
        ("quant", "bits = true", "bits: must be one of 1..8, 16, 32 or 'auto', got True (bool)"),
        ("training", "batch_size = 32.0", "batch_size: must be an integer >= 1, got 32.0 (float)"),
        ("metrics", "progress = 1", "progress: must be true or false, got 1"),
        ("metrics", "jsonl = 5", "jsonl: must be a non-empty string, got 5"),
        ("training", "lr = inf", "lr: must be a finite number > 0, got inf"),
    ],
)
def test_values_of_the_wrong_type_are_rejected(section: str, line: str, problem: str) -> None:
    # Execute / Assert
    assert _problems(f"[{section}]\n{line}") == [f"{section}.{problem}"]


def test_a_boolean_seed_is_rejected() -> None:
    # Execute / Assert
    assert _problems("seed = false") == ["seed: must be an integer >= 0, got False (bool)"]


def test_integers_are_accepted_where_numbers_are_expected() -> None:
    # Execute
    config = parse_config("[round]\ndeadline_s = 30\n[training]\nweight_decay = 0")

    # Assert
    assert config.round.deadline_s == 30.0 and isinstance(config.round.deadline_s, float)
    assert config.training.weight_decay == 0.0


def test_bits_auto_is_accepted() -> None:
    # Execute
    config = parse_config('[quant]\nbits = "auto"\ngradient_bits = 8')

    # Assert
    assert config.quant.bits == "auto"
    assert config.quant.gradient_bits == 8


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("bits", "9", "quant.bits: must be one of 1..8, 16, 32 or 'auto', got 9"),
        ("bits", '"Auto"', "quant.bits: must be one of 1..8, 16, 32 or 'auto', got 'Auto'"),
        ("bits", '"8"', "quant.bits: must be one of 1..8, 16, 32 or 'auto', got '8'"),
        ("gradient_bits", '"auto"', "quant.gradient_bits: 'auto' is chosen by the allocator, which runs with "
         "quant.bits = 'auto'; set quant.bits = 'auto' or a fixed gradient_bits"),
        ("gradient_bits", "0", "quant.gradient_bits: must be one of 1..8, 16, 32 or 'auto', got 0"),
    ],
)
def test_bad_bit_widths_are_rejected(key: str, value: str, problem: str) -> None:
    # Execute / Assert
    assert _problems(f"[quant]\n{key} = {value}") == [problem]


@pytest.mark.parametrize(
    ("section", "line", "start"),
    [
        ("model", 'preset = "vit_quik_patch4_16"', "preset: unknown preset 'vit_quik_patch4_16' "
         "(did you mean 'vit_quick_patch4_16'?); known: "),
        ("model", 'checkpoint = "no/such/file.pt"', "checkpoint: no such file: no/such/file.pt"),
        ("data", 'eval = "cifar10:"', "eval: must be digits | cifar10:<dir> | folder:<dir>, got"),
        ("data", 'eval = "digits:x"', "eval: must be digits | cifar10:<dir> | folder:<dir>, got"),
        ("broker", 'run_id = "a/b"', "run_id: run id must be 1-64 characters"),
        ("broker", 'password_file = "pw"', "password_file: is set but broker.username is not"),
        ("broker", "max_frame_bytes = 1023", "max_frame_bytes: must be an integer >= 1024"),
        ("metrics", "prometheus_port = 65536", "prometheus_port: must be 0 (off) or a port"),
        ("metrics", "dashboard_port = -1", "dashboard_port: must be 0 (off) or a port"),
        ("metrics", 'dashboard_tls_cert = "c.pem"', "dashboard_tls_key: needed with dashboard_tls_cert (HTTPS takes both)"),
        ("compute", 'device = "cuda:x"', "device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("compute", 'amp = "fp16"', "amp: must be one of 'auto', 'bf16', 'off', got 'fp16'"),
        ("training", "momentum = 1.0", "momentum: must be a number in [0, 1), got 1.0"),
        ("training", 'mode = "v3"', "mode: must be one of 'v1', 'v2', 'fl', got 'v3'"),
        ("training", 'lr_schedule = "step"', "lr_schedule: must be one of 'constant', 'cosine', got 'step'"),
        ("training", "lr_min = -0.1", "lr_min: must be"),
    ],
)
def test_out_of_range_and_ill_formed_values_are_rejected(
    section: str, line: str, start: str
) -> None:
    # Execute
    problems = _problems(f"[{section}]\n{line}")

    # Assert
    assert len(problems) == 1 and problems[0].startswith(f"{section}.{start}"), problems


def test_a_section_that_is_not_a_table_is_rejected() -> None:
    # Execute / Assert
    assert _problems("training = 3") == ["training: must be a table [training], got 3"]


def test_well_formed_specific_values_are_accepted(tmp_path: Path) -> None:
    # Prepare
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"")
    text = f"""
[model]
checkpoint = "{weights}"
[data]
eval = "folder:/data/flowers"
[training]
min_devices = 2
devices_per_round = 5
[broker]
url = "mqtts://broker.example:8884"
username = "server"
password_file = "secrets/pw"
[security]
signing = "off"
[metrics]
jsonl = "out/m.jsonl"
[compute]
device = "cuda:1"
"""

    # Execute
    config = parse_config(text)

    # Assert
    assert config.model.checkpoint == str(weights)
    assert config.training.min_devices == 2
    assert config.broker.password_file == "secrets/pw"  # kept as written, not resolved
    assert config.metrics_path == Path("out/m.jsonl")
    assert config.compute.device == "cuda:1"


def test_overrides_are_applied_before_validation() -> None:
    # Prepare
    overrides = {"broker.url": "mqtt://127.0.0.1:1999", "seed": 7, "training.rounds": 1}

    # Execute
    config = load_config(EXAMPLE, overrides)

    # Assert
    assert config.broker.url == "mqtt://127.0.0.1:1999"
    assert config.seed == 7
    assert config.training.rounds == 1
    assert config.training.devices_per_round == 3  # the file's value survives


def test_bad_overrides_are_reported_with_the_file_problems() -> None:
    # Prepare
    overrides = {"broker.url": "ftp://x", "brokr.url": "mqtt://x", "a.b.c": 1}

    # Execute
    problems = _problems("[training]\nrounds = 0", overrides)

    # Assert
    assert problems == [
        "override 'a.b.c': must be 'key' or 'section.key'",
        "[brokr]: unknown section (did you mean [broker]?)",
        "training.rounds: must be an integer >= 1, got 0",
        "broker.url: broker URL must start with mqtt:// or mqtts://, got 'ftp://x'",
    ]


def test_to_dict_round_trips_through_json_and_from_dict() -> None:
    # Prepare
    config = load_config(EXAMPLE, {"quant.bits": "auto", "broker.username": "u", "security.signing": "off"})

    # Execute
    restored = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    # Assert
    assert restored == config
    assert restored.source == "<dict>"
    assert restored.quant.bits == "auto" and restored.broker.username == "u"


def test_from_dict_validates_like_a_file() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_dict({"training": {"rounds": 0}, "extra": 1}, source="checkpoint")

    # Assert
    assert caught.value.problems == [
        "extra: unknown top-level key",
        "training.rounds: must be an integer >= 1, got 0",
    ]
    assert str(caught.value).startswith("checkpoint: 2 problems:")


def test_replace_swaps_sections() -> None:
    # Prepare
    training, broker = TrainingSection(rounds=2), BrokerSection(run_id="r1")

    # Execute
    config = RunConfig().replace(training=training, broker=broker)

    # Assert
    assert config.training.rounds == 2 and config.broker.run_id == "r1"
    assert config.model == RunConfig().model


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text('seed = 1\n[training]\nrounds = = 3\n')

    # Execute
    with pytest.raises(ConfigError) as caught:
        load_config(path)

    # Assert
    assert len(caught.value.problems) == 1
    assert str(path) in caught.value.problems[0]
    assert "line 3" in caught.value.problems[0]


def test_a_missing_file_is_one_problem_naming_it(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "absent.toml"

    # Execute
    with pytest.raises(ConfigError) as caught:
        load_config(path)

    # Assert
    assert caught.value.problems == [f"cannot read {path}: No such file or directory"]
    assert str(caught.value) == f"{path}: cannot read {path}: No such file or directory"


# ---------------------------------------------------------------- writing run.toml


def _every_key_changed(checkpoint: Path) -> RunConfig:
    """A config whose every key differs from its default (strings a TOML writer must escape too)."""
    return RunConfig(
        seed=11,
        model=ModelSection(preset="vit_mini_patch4_32", checkpoint=str(checkpoint), global_pool="avg", class_token=False,
                           fc_norm=True),
        data=DataSection(eval="folder:/data/flowers", eval_batch_size=64, eval_every=3, validation_fraction=0.15,
                         augment_crop_padding=4, augment_hflip=True),
        training=TrainingSection(rounds=7, devices_per_round=4, min_devices=2, local_epochs=3, batch_size=16,
                                 mode="v2", optimizer="adamw", lr=3e-4, lr_schedule="cosine", lr_min=1e-5,
                                 momentum=0.0, weight_decay=0.05),
        quant=QuantSection(bits="auto", gradient_bits=16, model_bits=16, per_token=True),
        round=RoundSection(deadline_s=42.5, min_completed=0.75, wait_for_devices_s=1 / 3,
                           total_bandwidth_hz=1.5e7, offline_grace_s=0.0),
        broker=BrokerSection(url="mqtts://broker.example:8884", run_id="run-7", username="server",
                             password_file="secrets/pw", ca_file="ca.pem", max_frame_bytes=1 << 20,
                             insecure_plaintext=True),
        security=SecuritySection(signing="ed25519", signing_key="fleet/keys/server.key", device_keys="fleet/fleet.json"),
        checkpoint=CheckpointSection(dir='runs/"ä" \\ \t \x7f \U0001f642', keep=5),
        metrics=MetricsSection(jsonl="out/m.jsonl", prometheus_port=9100, prometheus_addr="0.0.0.0", progress=False,
                               dashboard_port=8080, dashboard_addr="0.0.0.0", dashboard_token_file="fleet/dashboard.token",
                               dashboard_tls_cert="fleet/broker/server.crt", dashboard_tls_key="fleet/broker/server.key"),
        compute=ComputeSection(device="cuda:1", amp="bf16", workers=2, trainers=3, batch_steps="on", rank_timeout_s=4.5),
        allocator=AllocatorSection(lambda_energy=0.5, lambda_time=2.0, lambda_quant=1e-5, allowed_bits=(1, 4, 16, 32),
                                   allowed_bits_down=(6, 8, 16), downlink_quant_weight=0.25, t_max_s=60.0, default_distance_m=250.0, downlink_rate_bps=5e7,
                                   channel_gains={"dev-1": 1e-9, "dev 2": 0.1 + 0.2}),
    )


def test_the_defaults_survive_to_toml_and_back() -> None:
    # Execute
    text = RunConfig().to_toml()

    # Assert
    assert parse_config(text) == RunConfig()
    assert "checkpoint = " not in text and "jsonl = " not in text  # None is left out
    assert "allowed_bits = [2, 3, 4, 5, 6, 7, 8]" in text and "channel_gains = {}" in text


def test_a_config_with_every_key_changed_survives_to_toml_and_back(tmp_path: Path) -> None:
    # Prepare
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"")
    config = _every_key_changed(weights)
    default = RunConfig().to_dict()
    changed = config.to_dict()
    assert all(changed[s][k] != v for s, keys in default.items() if s != "seed" for k, v in keys.items())

    # Execute
    text = config.to_toml()
    restored = parse_config(text, "written.toml")

    # Assert
    assert restored == config
    assert restored.quant.bits == "auto" and restored.model.checkpoint == str(weights)
    assert restored.allocator.channel_gains == {"dev-1": 1e-9, "dev 2": 0.30000000000000004}
    assert 'channel_gains = {"dev-1" = 1e-09, "dev 2" = 0.30000000000000004}' in text
    assert "allowed_bits = [1, 4, 16, 32]" in text



def test_the_cosine_schedule_runs_from_lr_towards_lr_min_and_constant_stays() -> None:
    cosine = parse_config('[training]\nrounds = 4\nlr = 0.1\nlr_schedule = "cosine"\nlr_min = 0.01\n').training
    rates = [cosine.lr_at(t) for t in range(1, 6)]
    assert rates[0] == pytest.approx(0.1) and rates[2] == pytest.approx((0.1 + 0.01) / 2)  # halfway
    assert rates[3] > 0.01 and rates[4] == pytest.approx(0.01)  # the last round (4) still learns
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = parse_config("[training]\nrounds = 5\nlr = 0.1\n").training
    assert [constant.lr_at(t) for t in range(1, 6)] == [0.1] * 5
    assert parse_config('[training]\nrounds = 1\nlr_schedule = "cosine"\n').training.lr_at(1) == 0.05
