"""The per-round latency/energy model of docs/allocator.md, vectorized over devices.

Every public value is SI (Hz, W, s, bit, J). :class:`DeviceArrays` holds the selected devices as
a struct of arrays, one entry per device; :class:`SystemParams` holds what all devices share;
:class:`AllocationVectors` is one candidate decision (q, p, B), a vector each; :func:`evaluate`
scores it. The functions below are pure and cost O(N) numpy operations, so a 10,000-device fleet
evaluates in well under a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from sflam_common.bits import BIT_WIDTHS, BIT_WIDTHS_TEXT
from sflam_common.problems import ProblemsError

N0_DBM_PER_HZ = -174.0
FEASIBILITY_RTOL = 1e-9  # relative slack of the latency, power and bandwidth checks
FLOAT32_BITS = 32  # activations sent as float32 carry no quantization error


class ModelError(ProblemsError):
    """Inputs the system model cannot use; ``problems`` holds every reason, ``source`` the input."""


# ---------------------------------------------------------------- channel


def noise_psd_w_per_hz(dbm_per_hz: float = N0_DBM_PER_HZ) -> float:
    """Noise power spectral density in W/Hz from dBm/Hz (-174 dBm/Hz: thermal noise at 290 K)."""
    return 10.0 ** ((dbm_per_hz - 30.0) / 10.0)


def path_loss_db(distance_m: np.ndarray | float) -> np.ndarray:
    """Urban macro path loss 128.1 + 37.6 log10(d / 1 km) in dB (3GPP TR 36.814)."""
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=np.float64) / 1000.0)


def shannon_rate_bps(
    bandwidth_hz: np.ndarray | float,
    tx_power_w: np.ndarray | float,
    gain: np.ndarray | float,
    n0_w_per_hz: float,
) -> np.ndarray:
    """Shannon rate B log2(1 + p h / (N0 B)) in bit/s, broadcast; 0 where B == 0 or p == 0."""
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    p = np.asarray(tx_power_w, dtype=np.float64)
    h = np.asarray(gain, dtype=np.float64)
    active = (b > 0) & (p > 0)
    safe_b = np.where(active, b, 1.0)
    snr = np.where(active, p * h, 0.0) / (n0_w_per_hz * safe_b)
    return np.where(active, safe_b * np.log1p(snr) / math.log(2.0), 0.0)


# ---------------------------------------------------------------- inputs


def _problems_of_array(
    name: str, value: np.ndarray, length: int, lower: float, strict: bool
) -> list[str]:
    """Why a per-device array is unusable: shape, non-finite entries, or values out of range."""
    if value.shape != (length,):
        return [f"{name}: expected {length} entries, got shape {value.shape}"]
    problems = []
    bad = ~np.isfinite(value)
    if bad.any():
        problems.append(f"{name}: not finite at index {int(np.argmax(bad))} ({bad.sum()} entries)")
    low = (value <= lower) if strict else (value < lower)
    if low.any():
        relation = ">" if strict else ">="
        index = int(np.argmax(low))
        problems.append(f"{name}: must be {relation} {lower:g}, got {float(value[index]):g} at index {index}")
    return problems


def _as_float_array(name: str, value: object, problems: list[str]) -> np.ndarray | None:
    """``value`` as a float64 array, or None and a problem when it is not numeric."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        problems.append(f"{name}: not an array of numbers")
        return None


_FLEET_BOUNDS = {  # field -> (lower bound, strict)
    "samples": (0.0, True),
    "cycles_per_sample": (0.0, False),
    "cpu_freq_hz": (0.0, True),
    "kappa": (0.0, False),
    "gain": (0.0, True),
    "max_tx_power_w": (0.0, True),
    "activation_range": (0.0, False),
    "weight": (0.0, False),
}


@dataclass(frozen=True)
class DeviceArrays:
    """The selected devices as a struct of float64 arrays, one entry per device."""

    ids: tuple[str, ...]
    samples: np.ndarray  # D_k: samples processed per round (local epochs x samples)
    cycles_per_sample: np.ndarray  # c_k: device cycles per sample (forward + train_step)
    cpu_freq_hz: np.ndarray  # f_k
    kappa: np.ndarray  # effective capacitance, J / (cycle Hz^2)
    gain: np.ndarray  # h_k, linear uplink channel power gain (fading included)
    max_tx_power_w: np.ndarray  # p_max_k
    activation_range: np.ndarray  # R_k = hi - lo of the device's activations
    weight: np.ndarray  # w_k of the quantization term
    profiles: tuple[str, ...]  # firmware profile names (for display)

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "profiles", tuple(str(p) for p in self.profiles))
        n = len(self.ids)
        if n == 0:
            problems.append("ids: a fleet needs at least one device")
        if len(set(self.ids)) != n:
            problems.append("ids: device ids must be distinct")
        if len(self.profiles) != n:
            problems.append(f"profiles: expected {n} entries, got {len(self.profiles)}")
        for name, (lower, strict) in _FLEET_BOUNDS.items():
            value = _as_float_array(name, getattr(self, name), problems)
            if value is not None:
                object.__setattr__(self, name, value)
                problems.extend(_problems_of_array(name, value, n, lower, strict))
        if problems:
            raise ModelError("fleet", problems)

    def __len__(self) -> int:
        return len(self.ids)


def default_weight(samples: np.ndarray) -> np.ndarray:
    """The quantization-term weights w_k = D_k / sum D (a device's share of the round's data)."""
    d = np.asarray(samples, dtype=np.float64)
    return d / d.sum()


@dataclass(frozen=True)
class SystemParams:
    """What all devices of a round share: the model's sizes, the server, the channel, the weights."""

    elements_per_sample: int  # s: activation elements per sample (tokens x embed dim)
    label_bits: int = 64  # per sample on the uplink (int64 labels)
    weight_bits: float = 0.0  # |w|: device-part weight bits uploaded at round end
    overhead_bits: float = 0.0  # per-round protocol overhead on the uplink
    gradient_bits: int = 32  # g: bits per gradient element on the downlink (when allowed_bits_down is empty)
    server_cycles_per_sample: float = 0.0  # c_S
    server_freq_hz: float = 1e9  # f_S
    downlink_rate_bps: float = 100e6  # r_dn, per device on a separate fixed channel
    noise_psd_w_per_hz: float = noise_psd_w_per_hz()
    total_bandwidth_hz: float = 20e6
    t_max_s: float = 60.0
    lambda_energy: float = 1.0  # per joule
    lambda_time: float = 0.0  # per second of round latency
    lambda_quant: float = 0.0  # per unit of Phi
    allowed_bits: tuple[int, ...] = BIT_WIDTHS
    subchannels: int = 0  # 0: continuous bandwidth; N > 0: N equal subchannels
    allowed_bits_down: tuple[int, ...] = ()  # g_k the allocator may choose; empty: every device gradient_bits
    downlink_quant_weight: float = 1.0  # mu: a gradient's quantization term relative to an activation's

    def __post_init__(self) -> None:
        problems = [_param_problem(f.name, getattr(self, f.name)) for f in fields(self)]
        problems = [p for p in problems if p]
        for name in ("allowed_bits", "allowed_bits_down"):
            value = getattr(self, name)
            if name == "allowed_bits_down" and isinstance(value, (tuple, list)) and not value:
                object.__setattr__(self, name, ())
                continue
            bits = _allowed_bits_problem(value, name)
            if bits:
                problems.append(bits)
            else:
                object.__setattr__(self, name, tuple(sorted(int(q) for q in value)))
        if problems:
            raise ModelError("system parameters", problems)

    @property
    def bits_down_options(self) -> tuple[int, ...]:
        """The downlink bit-widths a device may get: ``allowed_bits_down``, or ``gradient_bits`` alone."""
        return self.allowed_bits_down or (int(self.gradient_bits),)

    @property
    def bit_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every allowed (q, g), q major: two int64 vectors of |Q| x |G| entries."""
        up, down = np.meshgrid(self.allowed_bits, self.bits_down_options, indexing="ij")
        return up.ravel().astype(np.int64), down.ravel().astype(np.int64)


_PARAM_RULES = {  # field -> (kind, lower bound, strict, infinity allowed)
    "elements_per_sample": ("int", 1, False, False),
    "label_bits": ("int", 0, False, False),
    "weight_bits": ("float", 0.0, False, False),
    "overhead_bits": ("float", 0.0, False, False),
    "gradient_bits": ("int", 1, False, False),
    "server_cycles_per_sample": ("float", 0.0, False, False),
    "server_freq_hz": ("float", 0.0, True, False),
    "downlink_rate_bps": ("float", 0.0, True, True),
    "noise_psd_w_per_hz": ("float", 0.0, True, False),
    "total_bandwidth_hz": ("float", 0.0, True, False),
    "t_max_s": ("float", 0.0, True, True),
    "lambda_energy": ("float", 0.0, False, False),
    "lambda_time": ("float", 0.0, False, False),
    "lambda_quant": ("float", 0.0, False, False),
    "subchannels": ("int", 0, False, False),
    "downlink_quant_weight": ("float", 0.0, False, False),
}


def _param_problem(name: str, value: object) -> str | None:
    """Why one scalar SystemParams field is unusable, or None."""
    if name not in _PARAM_RULES:
        return None
    kind, lower, strict, inf_ok = _PARAM_RULES[name]
    numeric = (int, np.integer) if kind == "int" else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return f"{name}: must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
    if math.isnan(value) or (math.isinf(value) and not inf_ok):
        return f"{name}: must be finite, got {value!r}"
    if value < lower or (strict and value == lower):
        return f"{name}: must be {'>' if strict else '>='} {lower}, got {value!r}"
    return None


def _allowed_bits_problem(bits: object, name: str = "allowed_bits") -> str | None:
    """Why the allowed bit-widths are unusable (each a wire bit width, distinct, at least one)."""
    if not isinstance(bits, (tuple, list)) or not bits:
        return f"{name}: must be a non-empty list of bit widths ({BIT_WIDTHS_TEXT}), got {bits!r}"
    bad = [q for q in bits if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or int(q) not in BIT_WIDTHS]
    if bad:
        return f"{name}: each must be one of {BIT_WIDTHS_TEXT}, got {bad!r}"
    if len(set(bits)) != len(bits):
        return f"{name}: lists a width twice: {list(bits)!r}"
    return None


@dataclass(frozen=True)
class Problem:
    """One round's allocation problem: the devices, the shared parameters, per-subchannel gains."""

    fleet: DeviceArrays
    params: SystemParams
    subchannel_gain: np.ndarray | None = None  # (N_devices, N_subchannels) when subchannels > 0

    def __post_init__(self) -> None:
        n, m = len(self.fleet), self.params.subchannels
        if m == 0:
            if self.subchannel_gain is not None:
                raise ModelError("problem", ["subchannel_gain given but params.subchannels is 0"])
            return
        if self.subchannel_gain is None:  # flat fading: every subchannel sees the device's gain
            object.__setattr__(self, "subchannel_gain", np.repeat(self.fleet.gain[:, None], m, axis=1))
            return
        gain = np.asarray(self.subchannel_gain, dtype=np.float64)
        object.__setattr__(self, "subchannel_gain", gain)
        if gain.shape != (n, m):
            raise ModelError("problem", [f"subchannel_gain: expected shape ({n}, {m}), got {gain.shape}"])
        if not (np.isfinite(gain).all() and (gain > 0).all()):
            raise ModelError("problem", ["subchannel_gain: every entry must be finite and > 0"])


@dataclass(frozen=True)
class AllocationVectors:
    """A candidate decision: bits, transmit power and bandwidth, one vector entry per device.

    Not the wire's per-device ``edge_runtime.protocol.Allocation``, which the server builds from it.
    """

    bits: np.ndarray  # int64, each in params.allowed_bits (the uplink's activations)
    tx_power_w: np.ndarray
    bandwidth_hz: np.ndarray  # with subchannels: (count held) x (total / N)
    subchannels: np.ndarray | None = None  # (N_devices, N_sub) 0/1 assignment when matching
    bits_down: np.ndarray | None = None  # int64, each in params.bits_down_options; None: gradient_bits

    def __post_init__(self) -> None:
        problems: list[str] = []
        bits = _as_float_array("bits", self.bits, problems)
        n = bits.shape[0] if bits is not None and bits.ndim == 1 else 0
        if bits is not None:
            problems.extend(_bits_problems(bits))
            object.__setattr__(self, "bits", np.nan_to_num(bits).astype(np.int64))
        if self.bits_down is not None:
            down = _as_float_array("bits_down", self.bits_down, problems)
            if down is not None:
                problems.extend(_bits_problems(down, "bits_down"))
                if down.shape != (n,):
                    problems.append(f"bits_down: expected {n} entries, got shape {down.shape}")
                object.__setattr__(self, "bits_down", np.nan_to_num(down).astype(np.int64))
        for name in ("tx_power_w", "bandwidth_hz"):
            value = _as_float_array(name, getattr(self, name), problems)
            if value is not None:
                object.__setattr__(self, name, value)
                problems.extend(_problems_of_array(name, value, n, 0.0, False))
        if self.subchannels is not None:
            assignment = np.asarray(self.subchannels)
            problems.extend(_assignment_problems(assignment, n))
            object.__setattr__(self, "subchannels", assignment.astype(np.int64))
        if problems:
            raise ModelError("allocation", problems)


def _bits_problems(bits: np.ndarray, name: str = "bits") -> list[str]:
    """Why a bit-width array is malformed (not 1-D, not whole numbers)."""
    if bits.ndim != 1:
        return [f"{name}: expected a 1-D array, got shape {bits.shape}"]
    if not np.array_equal(bits, np.round(bits)):
        return [f"{name}: must be whole numbers"]
    return []


def bits_down_of(params: SystemParams, alloc: AllocationVectors) -> np.ndarray:
    """Each device's downlink gradient bits: ``alloc.bits_down``, or ``params.gradient_bits``."""
    if alloc.bits_down is not None:
        return alloc.bits_down
    return np.full(alloc.bits.shape, int(params.gradient_bits), dtype=np.int64)


def _assignment_problems(assignment: np.ndarray, n: int) -> list[str]:
    """Why a subchannel assignment matrix is malformed (shape, entries not 0/1)."""
    if assignment.ndim != 2 or assignment.shape[0] != n:
        return [f"subchannels: expected shape ({n}, N_sub), got {assignment.shape}"]
    if not np.isin(assignment, (0, 1)).all():
        return ["subchannels: entries must be 0 or 1"]
    return []


def check_allocation(problem: Problem, alloc: AllocationVectors) -> None:
    """Raise ModelError listing every way ``alloc`` does not fit ``problem`` (sizes, bits, subchannels)."""
    n, params = len(problem.fleet), problem.params
    problems = []
    if alloc.bits.shape != (n,):
        problems.append(f"allocation has {alloc.bits.shape[0]} devices, the problem {n}")
    else:
        bad = ~np.isin(alloc.bits, params.allowed_bits)
        if bad.any():
            index = int(np.argmax(bad))
            problems.append(
                f"bits: {int(alloc.bits[index])} at index {index} is not one of {list(params.allowed_bits)}"
                f" ({int(bad.sum())} such entries)"
            )
        if alloc.bits_down is not None and alloc.bits_down.shape == (n,):
            bad = ~np.isin(alloc.bits_down, params.bits_down_options)
            if bad.any():
                index = int(np.argmax(bad))
                problems.append(f"bits_down: {int(alloc.bits_down[index])} at index {index} is not one of"
                                f" {list(params.bits_down_options)} ({int(bad.sum())} such entries)")
    problems.extend(_subchannel_problems(problem, alloc))
    if problems:
        raise ModelError("allocation", problems)


def _subchannel_problems(problem: Problem, alloc: AllocationVectors) -> list[str]:
    """Why ``alloc``'s subchannel assignment does not match the problem's subchannel mode."""
    m = problem.params.subchannels
    if alloc.subchannels is None:
        return []
    if m == 0:
        return ["subchannels: an assignment is given but params.subchannels is 0"]
    if alloc.subchannels.shape != (len(problem.fleet), m):
        return [f"subchannels: expected shape ({len(problem.fleet)}, {m}), got {alloc.subchannels.shape}"]
    held = alloc.subchannels.sum(axis=1) * (problem.params.total_bandwidth_hz / m)
    if alloc.bandwidth_hz.shape == held.shape and not np.allclose(alloc.bandwidth_hz, held, rtol=1e-9, atol=0):
        return ["bandwidth_hz: must equal (subchannels held) x total_bandwidth_hz / subchannels"]
    return []


# ---------------------------------------------------------------- the model


def compute_time_s(fleet: DeviceArrays) -> np.ndarray:
    """On-device compute time D c / f."""
    return fleet.samples * fleet.cycles_per_sample / fleet.cpu_freq_hz


def compute_energy_j(fleet: DeviceArrays) -> np.ndarray:
    """On-device compute energy kappa c D f^2."""
    return fleet.kappa * fleet.cycles_per_sample * fleet.samples * fleet.cpu_freq_hz**2


def uplink_bits(fleet: DeviceArrays, params: SystemParams, bits: np.ndarray) -> np.ndarray:
    """Bits a device sends per round: D (s q + label bits) + |w| + overhead."""
    per_sample = params.elements_per_sample * np.asarray(bits, dtype=np.float64) + params.label_bits
    return fleet.samples * per_sample + params.weight_bits + params.overhead_bits


def uplink_rate_bps(problem: Problem, alloc: AllocationVectors) -> np.ndarray:
    """Uplink rate: Shannon on B_k, or with subchannels the sum over held ones at power p / n_held."""
    params = problem.params
    if alloc.subchannels is None:
        return shannon_rate_bps(alloc.bandwidth_hz, alloc.tx_power_w, problem.fleet.gain, params.noise_psd_w_per_hz)
    held = alloc.subchannels.astype(np.float64)
    count = held.sum(axis=1)
    power_each = np.where(count > 0, alloc.tx_power_w / np.maximum(count, 1.0), 0.0)
    b_sub = params.total_bandwidth_hz / params.subchannels
    rates = shannon_rate_bps(b_sub, power_each[:, None], problem.subchannel_gain, params.noise_psd_w_per_hz)
    return (rates * held).sum(axis=1)


def uplink_time_s(problem: Problem, alloc: AllocationVectors) -> np.ndarray:
    """Uplink airtime uplink_bits / rate (inf where the rate is 0)."""
    rate = uplink_rate_bps(problem, alloc)
    size = uplink_bits(problem.fleet, problem.params, alloc.bits)
    return np.where(rate > 0, size / np.where(rate > 0, rate, 1.0), np.inf)


def uplink_energy_j(problem: Problem, alloc: AllocationVectors) -> np.ndarray:
    """Transmit energy p x uplink time (0 for a silent device)."""
    airtime = uplink_time_s(problem, alloc)
    talking = alloc.tx_power_w > 0
    return np.where(talking, alloc.tx_power_w * np.where(talking, airtime, 0.0), 0.0)


def downlink_time_s(fleet: DeviceArrays, params: SystemParams, bits_down: np.ndarray | None = None) -> np.ndarray:
    """Gradient download D s g_k / r_dn plus the model download |w| / r_dn (g_k: gradient_bits if None)."""
    g = params.gradient_bits if bits_down is None else np.asarray(bits_down, dtype=np.float64)
    gradient = fleet.samples * params.elements_per_sample * g
    return (gradient + params.weight_bits) / params.downlink_rate_bps


def server_time_s(fleet: DeviceArrays, params: SystemParams) -> np.ndarray:
    """Server compute for the device's samples, D c_S / f_S."""
    return fleet.samples * params.server_cycles_per_sample / params.server_freq_hz


def fixed_time_s(fleet: DeviceArrays, params: SystemParams, bits_down: np.ndarray | None = None) -> np.ndarray:
    """Compute + downlink + server time a_k: the part of T_k that neither power nor bandwidth changes."""
    return compute_time_s(fleet) + downlink_time_s(fleet, params, bits_down) + server_time_s(fleet, params)


def device_latency_s(problem: Problem, alloc: AllocationVectors) -> np.ndarray:
    """A device's round latency T_k = fixed time + uplink time."""
    return fixed_time_s(problem.fleet, problem.params, alloc.bits_down) + uplink_time_s(problem, alloc)


def relative_variance(bits: np.ndarray) -> np.ndarray:
    """1 / (4 (2^b - 1)^2): the stochastic quantizer's variance per element in units of range^2; 0 for float32."""
    b = np.asarray(bits, dtype=np.float64)
    return np.where(b >= FLOAT32_BITS, 0.0, 1.0 / (4.0 * (np.exp2(b) - 1.0) ** 2))


def quant_variance(fleet: DeviceArrays, params: SystemParams, bits: np.ndarray,
                   bits_down: np.ndarray | None = None) -> np.ndarray:
    """Phi_k = w s R^2 (1 / (4 (2^q - 1)^2) + mu / (4 (2^g - 1)^2)): the activations' quantization
    variance plus the gradients', priced as an activation error of the same relative step (docs/allocator.md);
    each part 0 at 32 bits (g: ``gradient_bits`` when ``bits_down`` is None)."""
    g = np.full(np.shape(bits), params.gradient_bits) if bits_down is None else bits_down
    return quant_spread(fleet, params) * (relative_variance(bits) + params.downlink_quant_weight * relative_variance(g))


def quant_spread(fleet: DeviceArrays, params: SystemParams) -> np.ndarray:
    """w s R^2 per device: what Phi_k multiplies the relative variances by."""
    return fleet.weight * params.elements_per_sample * fleet.activation_range**2


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """An allocation's figures: per-device energy and latency, the round's totals, the objective."""

    energy_j: np.ndarray  # compute + uplink, per device
    latency_s: np.ndarray  # T_k, per device
    round_latency_s: float  # max_k T_k
    phi: float  # sum_k Phi_k
    objective: float
    feasible: bool
    violations: tuple[str, ...] = ()  # why it is infeasible, one line per violated constraint


def weighted_objective(params: SystemParams, energy_j: float, round_latency_s: float, phi: float) -> float:
    """lambda_E E + lambda_T T + lambda_Q Phi, where a zero weight drops its term (even if inf)."""
    terms = ((params.lambda_energy, energy_j), (params.lambda_time, round_latency_s), (params.lambda_quant, phi))
    return float(sum(weight * value for weight, value in terms if weight > 0))


def violations(problem: Problem, alloc: AllocationVectors, latency_s: np.ndarray) -> tuple[str, ...]:
    """The constraints ``alloc`` breaks: latency cap, power range, bandwidth budget, subchannel reuse."""
    params, slack = problem.params, 1.0 + FEASIBILITY_RTOL
    found = []
    late = ~(latency_s <= params.t_max_s * slack)
    if late.any():
        found.append(f"{int(late.sum())} devices exceed t_max_s = {params.t_max_s:g} s (worst {np.max(latency_s):.6g} s)")
    over = alloc.tx_power_w > problem.fleet.max_tx_power_w * slack
    if over.any():
        found.append(f"{int(over.sum())} devices transmit above their max_tx_power_w")
    total = float(np.sum(alloc.bandwidth_hz))
    if total > params.total_bandwidth_hz * slack:
        found.append(f"bandwidth sum {total:.6g} Hz exceeds total_bandwidth_hz = {params.total_bandwidth_hz:g}")
    if alloc.subchannels is not None and (alloc.subchannels.sum(axis=0) > 1).any():
        found.append("a subchannel is assigned to more than one device")
    return tuple(found)


def evaluate(problem: Problem, alloc: AllocationVectors) -> Evaluation:
    """Score ``alloc`` on ``problem``: energies, latencies, Phi, the objective and feasibility."""
    check_allocation(problem, alloc)
    fleet, params = problem.fleet, problem.params
    energy = compute_energy_j(fleet) + uplink_energy_j(problem, alloc)
    latency = device_latency_s(problem, alloc)
    round_latency = float(np.max(latency))
    phi = float(np.sum(quant_variance(fleet, params, alloc.bits, alloc.bits_down)))
    objective = weighted_objective(params, float(np.sum(energy)), round_latency, phi)
    broken = violations(problem, alloc, latency)
    return Evaluation(energy, latency, round_latency, phi, objective, not broken, broken)
