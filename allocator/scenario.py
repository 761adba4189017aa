"""Seeded allocation scenarios (devices in a disc, path loss + Rayleigh fading) and their JSON files.

The generator places devices uniformly in a disc of ``radius_m`` around the server (10 m minimum
distance), gives each the 3GPP urban-macro path loss times |h|^2 ~ Exp(1), hardware from its
firmware profile (round-robin over ``profiles``) and 400-500 samples x local epochs.

The default latency cap is ``T_MAX_FACTOR`` (1.5) times the round latency of the ``fixed``
baseline (8 bits, max power, equal bandwidth): that baseline, hence the problem, is feasible, and
the cap binds, since lowering power stretches every uplink up to it.

JSON format 1 (docs/allocator.md)::

    {"format": 1, "model": "vit_base_patch32_224",          # optional: fills params and cycles
     "params": {...SystemParams fields...},
     "devices": [{"id": "d0", "profile": "raspberry-pi-5", "samples": 450,
                  "distance_m": 120.0 (+ "fading": 0.8) | "channel_gain": 1.2e-11,
                  "cycles_per_sample"?, "cpu_freq_hz"?, "kappa"?, "max_tx_power_w"?,
                  "activation_range"? (1.0), "weight"? (D / sum D)}, ...],
     "subchannel_gain": [[...], ...]?}

A device's missing hardware fields come from its profile (cycles from the model's MACs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allocator.system import (
    AllocationVectors,
    DeviceArrays,
    ModelError,
    Problem,
    SystemParams,
    default_weight,
    device_latency_s,
    path_loss_db,
)
from server_runtime.presets import ViTConfig, get_preset, preset_names
from sflam_common.problems import did_you_mean

FORMAT = 1
DEFAULT_PROFILES = ("raspberry-pi-5", "jetson-orin-nano", "android-flagship", "android-midrange")
DEFAULT_MODEL = "vit_base_patch32_224"
MIN_DISTANCE_M = 10.0
SAMPLES_RANGE = (400, 500)  # per device and local epoch, inclusive (as the SFLAM code resamples)
TRAIN_FACTOR = 3.0  # forward + train_step of the device part, in forward MACs
T_MAX_FACTOR = 1.5  # default t_max_s = this x the fixed baseline's round latency
SCENARIO_DEFAULTS: dict[str, object] = {"lambda_quant": 1e-3}  # as server_runtime's [allocator]
BASELINE_BITS = 8


class ScenarioError(ModelError):
    """A scenario that cannot be built or read; ``problems`` lists every reason."""


@dataclass(frozen=True)
class ModelShape:
    """What the allocator needs of a ViT preset, read off its ``server_runtime.presets.ViTConfig``."""

    tokens: int  # (img / patch)^2
    embed_dim: int
    patch_dim: int  # in_chans x patch^2
    depth: int
    mlp_ratio: float
    num_classes: int

    @classmethod
    def from_preset(cls, preset: ViTConfig) -> ModelShape:
        """The shape of ``preset`` (the one registry of ViT shapes)."""
        patch_dim = preset.in_chans * preset.patch_size**2
        return cls(preset.num_patches, preset.embed_dim, patch_dim, preset.depth, preset.mlp_ratio, preset.num_classes)

    @property
    def device_macs_per_sample(self) -> float:
        """Forward MACs of the device part (the patch embedding)."""
        return float(self.tokens * self.embed_dim * self.patch_dim)

    @property
    def device_weight_bits(self) -> float:
        """float32 bits of the device part's weights and bias."""
        return 32.0 * (self.embed_dim * self.patch_dim + self.embed_dim)

    @property
    def elements_per_sample(self) -> int:
        """Activation elements one sample sends up (tokens x embed dim)."""
        return self.tokens * self.embed_dim


def full_model_macs_per_sample(shape: ModelShape) -> float:
    """Forward MACs of the whole ViT: patch embedding, blocks (with the class token), head."""
    n, d = shape.tokens + 1, shape.embed_dim
    hidden = int(shape.mlp_ratio * d)
    block = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d  # qkv + proj, MLP, QK^T and AV
    return shape.device_macs_per_sample + shape.depth * block + d * shape.num_classes


def full_model_params(shape: ModelShape) -> int:
    """Parameters of the whole ViT (timm layout: ViT-B/32 has 88.2 M)."""
    d, hidden = shape.embed_dim, int(shape.mlp_ratio * shape.embed_dim)
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * hidden + hidden + d) + 4 * d
    embed = shape.embed_dim * shape.patch_dim + d + d + (shape.tokens + 1) * d  # patch, cls, pos
    return embed + shape.depth * block + 2 * d + d * shape.num_classes + shape.num_classes


def model_shape(name: str) -> ModelShape:
    """The shape of a preset, or a ScenarioError naming the known ones."""
    problem = _unknown_preset_problem(name)
    if problem:
        raise ScenarioError("model", [problem])
    return ModelShape.from_preset(get_preset(name))


def _unknown_preset_problem(name: object) -> str | None:
    """Why ``name`` is no preset (with the likely one and the known ones), or None."""
    known = preset_names()
    if name in known:
        return None
    return f"unknown preset {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"


def infer_model(params: SystemParams) -> str | None:
    """The preset whose activation size and device weights ``params`` carry, or None."""
    for name in preset_names():
        shape = model_shape(name)
        if (shape.elements_per_sample, shape.device_weight_bits) == (params.elements_per_sample, params.weight_bits):
            return name
    return None


# ---------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """One profile's numbers as the system model uses them."""

    cycles_per_mac: float  # wall-clock cycles
    cpu_freq_hz: float
    kappa: float  # per wall-clock cycle: the profile's kappa x training_cores (docs/profiles.md)
    max_tx_power_w: float


def load_hardware(names: Sequence[str]) -> dict[str, Hardware]:
    """The hardware of each named firmware profile; ScenarioError listing every unusable one."""
    from firmware_profiles import ProfileError, load_profile

    found, problems = {}, []
    for name in dict.fromkeys(names):
        try:
            profile = load_profile(name)
        except ProfileError as exc:
            problems.append(str(exc))
            continue
        if not profile.runtime.supports_training:
            problems.append(f"profile {name!r}: its runtime cannot train (runtime.supports_training = false)")
            continue
        c, r = profile.compute, profile.radio
        found[name] = Hardware(c.cycles_per_mac, c.cpu_freq_hz, c.wall_kappa, r.max_tx_power_w)
    if problems:
        raise ScenarioError("profiles", problems)
    return found


# ---------------------------------------------------------------- generator


def generate_scenario(
    devices: int,
    seed: int,
    *,
    profiles: Sequence[str] = DEFAULT_PROFILES,
    radius_m: float = 500.0,
    model: str = DEFAULT_MODEL,
    local_epochs: int = 1,
    t_max_s: float | None = None,
    params: Mapping[str, object] | None = None,
) -> Problem:
    """A seeded random problem; ``params`` overrides SystemParams fields, ``t_max_s`` None: the default cap."""
    _check_generator_args(devices, radius_m, local_epochs, profiles)
    shape, hardware = model_shape(model), load_hardware(profiles)
    rng = np.random.default_rng(seed)
    distance_m, fading = place_devices(rng, devices, radius_m)
    path_gain = path_gain_linear(distance_m)
    gain = path_gain * fading
    samples = rng.integers(SAMPLES_RANGE[0], SAMPLES_RANGE[1] + 1, devices) * float(local_epochs)
    names = tuple(profiles[k % len(profiles)] for k in range(devices))
    fleet = _fleet(names, samples, gain, shape, hardware)
    system = _params(shape, params)
    sub_gain = None
    if system.subchannels > 0:
        sub_gain = path_gain[:, None] * rng.exponential(1.0, (devices, system.subchannels))
    problem = Problem(fleet, system, sub_gain)
    if t_max_s is None and "t_max_s" not in (params or {}):
        t_max_s = default_t_max_s(problem)
    if t_max_s is not None:
        problem = dataclasses.replace(problem, params=dataclasses.replace(system, t_max_s=t_max_s))
    return problem


def default_t_max_s(problem: Problem) -> float:
    """T_MAX_FACTOR x the round latency of 8 bits, max power and equal bandwidth (the fixed baseline)."""
    n = len(problem.fleet)
    fixed = AllocationVectors(
        np.full(n, BASELINE_BITS),
        problem.fleet.max_tx_power_w,
        np.full(n, problem.params.total_bandwidth_hz / n),
    )
    return T_MAX_FACTOR * float(np.max(device_latency_s(problem, fixed)))


def _check_generator_args(devices: int, radius_m: float, local_epochs: int, profiles: Sequence[str]) -> None:
    """Raise ScenarioError listing every unusable generator argument."""
    problems = []
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        problems.append(f"devices: must be an integer >= 1, got {devices!r}")
    if not (isinstance(radius_m, (int, float)) and math.isfinite(radius_m) and radius_m > MIN_DISTANCE_M):
        problems.append(f"radius_m: must be a finite number > {MIN_DISTANCE_M:g}, got {radius_m!r}")
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        problems.append(f"local_epochs: must be an integer >= 1, got {local_epochs!r}")
    if isinstance(profiles, str) or not profiles:
        problems.append(f"profiles: must be a non-empty list of profile names, got {profiles!r}")
    if problems:
        raise ScenarioError("scenario", problems)


def place_devices(rng: np.random.Generator, count: int, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances uniform over the disc's area (MIN_DISTANCE_M <= d <= radius_m) and fading |h|^2 ~ Exp(1)."""
    u = rng.uniform(0.0, 1.0, count)
    distance_m = np.sqrt(MIN_DISTANCE_M**2 + u * (radius_m**2 - MIN_DISTANCE_M**2))
    return distance_m, rng.exponential(1.0, count)


def path_gain_linear(distance_m: np.ndarray | float) -> np.ndarray:
    """The linear channel power gain of the path loss alone, 10^(-PL(d) / 10)."""
    return 10.0 ** (-path_loss_db(distance_m) / 10.0)


def _fleet(
    names: tuple[str, ...], samples: np.ndarray, gain: np.ndarray, shape: ModelShape, hardware: Mapping[str, Hardware]
) -> DeviceArrays:
    """A fleet whose hardware comes from each device's profile."""
    hw = [hardware[name] for name in names]
    width = len(str(len(names) - 1))
    return DeviceArrays(
        ids=tuple(f"d{k:0{width}d}" for k in range(len(names))),
        samples=samples,
        cycles_per_sample=np.array([TRAIN_FACTOR * shape.device_macs_per_sample * h.cycles_per_mac for h in hw]),
        cpu_freq_hz=np.array([h.cpu_freq_hz for h in hw]),
        kappa=np.array([h.kappa for h in hw]),
        gain=gain,
        max_tx_power_w=np.array([h.max_tx_power_w for h in hw]),
        activation_range=np.ones(len(names)),
        weight=default_weight(samples),
        profiles=names,
    )


def _params(shape: ModelShape | None, overrides: Mapping[str, object] | None) -> SystemParams:
    """SystemParams from the model's sizes, SCENARIO_DEFAULTS and ``overrides``."""
    known = {f.name for f in dataclasses.fields(SystemParams)}
    given = dict(overrides or {})
    problems = [f"{key}: unknown SystemParams field{did_you_mean(key, known)}" for key in given if key not in known]
    values: dict[str, object] = dict(SCENARIO_DEFAULTS)
    if shape is not None:
        values.update(elements_per_sample=shape.elements_per_sample, weight_bits=shape.device_weight_bits)
    values.update((key, math.inf if value == "inf" else value) for key, value in given.items() if key in known)
    for key in ("allowed_bits", "allowed_bits_down"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if "elements_per_sample" not in values:
        problems.append("elements_per_sample: missing (give it, or a model)")
        values["elements_per_sample"] = 1
    try:
        system = SystemParams(**values)
    except ModelError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ScenarioError("params", problems)
    return system


# ---------------------------------------------------------------- JSON


def problem_to_dict(problem: Problem) -> dict[str, object]:
    """The JSON-able form of ``problem`` (format 1), every number exact."""
    fleet = problem.fleet
    params = dataclasses.asdict(problem.params)
    params["allowed_bits"] = list(problem.params.allowed_bits)
    params["allowed_bits_down"] = list(problem.params.allowed_bits_down)
    params.update((key, "inf") for key, value in params.items() if value == math.inf)  # no cap / unlimited
    devices = [
        {
            "id": fleet.ids[k],
            "profile": fleet.profiles[k],
            "samples": _plain(fleet.samples[k]),
            "channel_gain": float(fleet.gain[k]),
            "cycles_per_sample": float(fleet.cycles_per_sample[k]),
            "cpu_freq_hz": float(fleet.cpu_freq_hz[k]),
            "kappa": float(fleet.kappa[k]),
            "max_tx_power_w": float(fleet.max_tx_power_w[k]),
            "activation_range": float(fleet.activation_range[k]),
            "weight": float(fleet.weight[k]),
        }
        for k in range(len(fleet))
    ]
    data: dict[str, object] = {"format": FORMAT, "params": params, "devices": devices}
    model = infer_model(problem.params)
    if model is not None:
        data = {"format": FORMAT, "model": model, "params": params, "devices": devices}
    if problem.subchannel_gain is not None:
        data["subchannel_gain"] = problem.subchannel_gain.tolist()
    return data


def _plain(value: float) -> int | float:
    """A whole float as an int (450.0 -> 450), so files read naturally."""
    return int(value) if float(value).is_integer() else float(value)


def dump_scenario(problem: Problem, path: str | os.PathLike[str]) -> None:
    """Write ``problem`` as a format-1 JSON scenario file."""
    text = json.dumps(problem_to_dict(problem), indent=1, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_scenario(path: str | os.PathLike[str]) -> Problem:
    """Read a scenario file; one ScenarioError listing every problem of a bad file."""
    source = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(source, [f"not JSON: {exc}"]) from None
    return problem_from_dict(data, source)


def problem_from_dict(data: object, source: str = "scenario") -> Problem:
    """Build a Problem from a parsed scenario (module docstring for the format); every problem listed."""
    if not isinstance(data, dict):
        raise ScenarioError(source, [f"must be a JSON object, got {type(data).__name__}"])
    problems = [f"{key}: unknown key{did_you_mean(key, _TOP_KEYS)}" for key in data if key not in _TOP_KEYS]
    if data.get("format") != FORMAT:
        problems.append(f"format: must be {FORMAT}, got {data.get('format')!r}")
    shape = _read_model(data.get("model"), problems)
    params = _read_params(data.get("params"), shape, problems)
    devices = _read_devices(data.get("devices"), problems)
    hardware = _read_hardware(devices, shape, problems)
    if problems:
        raise ScenarioError(source, problems)
    try:
        fleet = _fleet_from_entries(devices, hardware, shape)
        return Problem(fleet, params, _read_subchannel_gain(data.get("subchannel_gain")))
    except ModelError as exc:
        raise ScenarioError(source, exc.problems) from None


_TOP_KEYS = ("format", "model", "params", "devices", "subchannel_gain")
_HARDWARE_KEYS = ("cycles_per_sample", "cpu_freq_hz", "kappa", "max_tx_power_w")
_DEVICE_NUMBERS = {  # key -> strictly positive
    "samples": True, "distance_m": True, "fading": True, "channel_gain": True, "cycles_per_sample": True,
    "cpu_freq_hz": True, "kappa": False, "max_tx_power_w": True, "activation_range": False, "weight": False,
}
_DEVICE_KEYS = ("id", "profile", *_DEVICE_NUMBERS)


def _read_model(name: object, problems: list[str]) -> ModelShape | None:
    """The shape of the file's optional ``model``."""
    if name is None:
        return None
    problem = _unknown_preset_problem(name)
    if problem:
        problems.append(f"model: {problem}")
        return None
    return model_shape(str(name))


def _read_params(table: object, shape: ModelShape | None, problems: list[str]) -> SystemParams | None:
    """SystemParams from the file's ``params`` table (model sizes and SCENARIO_DEFAULTS fill gaps)."""
    if not isinstance(table, dict):
        problems.append(f"params: must be an object of SystemParams fields, got {table!r}")
        return None
    try:
        return _params(shape, table)
    except ScenarioError as exc:
        problems.extend(f"params.{problem}" for problem in exc.problems)
        return None


def _read_devices(entries: object, problems: list[str]) -> list[dict[str, object]]:
    """The checked device entries (numbers as float)."""
    if not isinstance(entries, list) or not entries:
        problems.append(f"devices: must be a non-empty list of device objects, got {entries!r}")
        return []
    devices = [_read_device(entry, f"devices[{k}]", problems) for k, entry in enumerate(entries)]
    weighted = sum("weight" in device for device in devices)
    if 0 < weighted < len(devices):
        problems.append("devices: give a weight for every device or for none")
    return devices


def _read_device(entry: object, where: str, problems: list[str]) -> dict[str, object]:
    """One device entry, its problems appended under ``where``."""
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be an object, got {entry!r}")
        return {}
    unknown = [key for key in entry if key not in _DEVICE_KEYS]
    problems.extend(f"{where}.{key}: unknown key{did_you_mean(key, _DEVICE_KEYS)}" for key in unknown)
    device: dict[str, object] = {}
    for key in ("id", "profile"):
        if key in entry and not (isinstance(entry[key], str) and entry[key]):
            problems.append(f"{where}.{key}: must be a non-empty string, got {entry[key]!r}")
        elif key in entry:
            device[key] = entry[key]
    for key, strict in _DEVICE_NUMBERS.items():
        if key in entry:
            problem = _number_problem(entry[key], strict)
            if problem:
                problems.append(f"{where}.{key}: {problem}")
            else:
                device[key] = float(entry[key])
    problems.extend(f"{where}.{p}" for p in _device_shape_problems(entry))
    return device


def _number_problem(value: object, strict: bool) -> str | None:
    """Why ``value`` is not a finite number > 0 (``strict``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if value < 0 or (strict and value == 0):
        return f"must be {'>' if strict else '>='} 0, got {value!r}"
    return None


def _device_shape_problems(entry: Mapping[str, object]) -> list[str]:
    """Missing keys and conflicting channel descriptions of one device entry."""
    found = [f"{key}: missing required field" for key in ("id", "samples") if key not in entry]
    channels = [key for key in ("distance_m", "channel_gain") if key in entry]
    if len(channels) != 1:
        found.append("distance_m | channel_gain: give exactly one of them")
    if "fading" in entry and "distance_m" not in entry:
        found.append("fading: only with distance_m (channel_gain already includes it)")
    if "profile" not in entry and any(key not in entry for key in _HARDWARE_KEYS):
        found.append(f"profile: missing, and needed for the hardware fields not given ({', '.join(_HARDWARE_KEYS)})")
    return found


def _read_hardware(devices: list[dict[str, object]], shape: ModelShape | None, problems: list[str]) -> dict[str, Hardware]:
    """The profiles of devices that leave hardware fields to their profile."""
    needed = [str(d["profile"]) for d in devices if "profile" in d and any(k not in d for k in _HARDWARE_KEYS)]
    if shape is None and any("profile" in d and "cycles_per_sample" not in d for d in devices):
        problems.append("model: needed to compute cycles_per_sample from a profile (or give cycles_per_sample)")
    try:
        return load_hardware(needed)
    except ScenarioError as exc:
        problems.extend(exc.problems)
        return {}


def _fleet_from_entries(
    devices: list[dict[str, object]], hardware: Mapping[str, Hardware], shape: ModelShape | None
) -> DeviceArrays:
    """The fleet of checked device entries, hardware gaps filled from the profiles."""
    macs = shape.device_macs_per_sample if shape is not None else math.nan
    profile_values = {
        "cycles_per_sample": lambda hw: TRAIN_FACTOR * macs * hw.cycles_per_mac,
        "cpu_freq_hz": lambda hw: hw.cpu_freq_hz,
        "kappa": lambda hw: hw.kappa,
        "max_tx_power_w": lambda hw: hw.max_tx_power_w,
    }
    columns = {
        key: np.array([d[key] if key in d else value(hardware[str(d["profile"])]) for d in devices])
        for key, value in profile_values.items()
    }
    samples = np.array([d["samples"] for d in devices], dtype=np.float64)
    weights = [d.get("weight") for d in devices]
    return DeviceArrays(
        ids=tuple(str(d["id"]) for d in devices),
        samples=samples,
        gain=np.array([_entry_gain(d) for d in devices]),
        activation_range=np.array([d.get("activation_range", 1.0) for d in devices], dtype=np.float64),
        weight=default_weight(samples) if None in weights else np.array(weights, dtype=np.float64),
        profiles=tuple(str(d.get("profile", "custom")) for d in devices),
        **columns,
    )


def _entry_gain(device: Mapping[str, object]) -> float:
    """A device entry's linear channel gain: given, or path loss at distance_m times fading."""
    if "channel_gain" in device:
        return float(device["channel_gain"])
    return float(path_gain_linear(float(device["distance_m"]))) * float(device.get("fading", 1.0))


def _read_subchannel_gain(value: object) -> np.ndarray | None:
    """The optional (devices x subchannels) gain matrix."""
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelError("problem", ["subchannel_gain: must be a list of lists of numbers"]) from None
