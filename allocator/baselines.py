"""The comparison points of docs/allocator.md, scored by the same system model as the solver.

- ``fixed``: 8 bits, max power, equal bandwidth (what the server did before the allocator).
- ``fp32_sfl``: split federated learning sending float32 activations, max power, equal bandwidth.
- ``sequential_sl``: vanilla split learning, one device at a time with the whole band, float32,
  max power; the round takes the sum of the device latencies.
- ``fl``: federated learning, the whole model on each device: compute scaled by the model's MACs
  over the device part's, and the uplink carries the full model's float32 weights once.

With subchannels the baselines still split the band evenly (continuous bandwidth): they are
reference points, not matchings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from allocator.system import (
    FEASIBILITY_RTOL,
    AllocationVectors,
    Evaluation,
    ModelError,
    Problem,
    compute_energy_j,
    evaluate,
    shannon_rate_bps,
    weighted_objective,
)

# FL defaults for ViT-B/32 (allocator.scenario.full_model_* recompute them for any preset):
# whole model 4.409 GMACs per sample forward (12 blocks of 50 tokens: qkv + proj 4 d^2, MLP 8 d^2,
# attention 2 n^2 d; plus patch embedding and head) vs the device part's patch embedding
# 49 x 768 x 3072 = 115.6 MMACs: ratio 38.14. Parameters 88,224,232 (timm), float32.
FL_COMPUTE_RATIO_VIT_B32 = 4_409_186_304 / 115_605_504
FL_MODEL_BITS_VIT_B32 = 32.0 * 88_224_232
FP32_BITS = 32
FIXED_BITS = 8
NAMES = ("fixed", "fp32_sfl", "sequential_sl", "fl")


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's allocation and its figures on the problem."""

    name: str
    allocation: AllocationVectors
    evaluation: Evaluation


def _with_bits(problem: Problem, bits: int) -> Problem:
    """``problem`` with ``bits`` allowed, so a baseline outside the allowed set can still be scored."""
    params = problem.params
    if bits in params.allowed_bits:
        return problem
    return dataclasses.replace(problem, params=dataclasses.replace(params, allowed_bits=(*params.allowed_bits, bits)))


def _equal_share(problem: Problem, bits: int) -> AllocationVectors:
    """``bits`` for every device, max power, the band split evenly."""
    n = len(problem.fleet)
    return AllocationVectors(
        np.full(n, bits, dtype=np.int64),
        problem.fleet.max_tx_power_w.copy(),
        np.full(n, problem.params.total_bandwidth_hz / n),
    )


def fixed(problem: Problem, bits: int = FIXED_BITS) -> BaselineResult:
    """8 bits (or ``bits``), max power, equal bandwidth."""
    alloc = _equal_share(problem, bits)
    return BaselineResult("fixed", alloc, evaluate(_with_bits(problem, bits), alloc))


def fp32_sfl(problem: Problem) -> BaselineResult:
    """Split federated learning with float32 activations, max power, equal bandwidth."""
    alloc = _equal_share(problem, FP32_BITS)
    return BaselineResult("fp32_sfl", alloc, evaluate(_with_bits(problem, FP32_BITS), alloc))


def sequential_sl(problem: Problem) -> BaselineResult:
    """One device at a time with the whole band, float32, max power; round latency = sum of latencies."""
    n, params = len(problem.fleet), problem.params
    alloc = AllocationVectors(
        np.full(n, FP32_BITS, dtype=np.int64),
        problem.fleet.max_tx_power_w.copy(),
        np.full(n, params.total_bandwidth_hz),
    )
    each = evaluate(_with_bits(problem, FP32_BITS), alloc)  # per device as if alone on the band
    round_latency = float(np.sum(each.latency_s))
    broken = () if round_latency <= params.t_max_s * (1 + FEASIBILITY_RTOL) else (
        f"the devices in turn take {round_latency:.6g} s > t_max_s = {params.t_max_s:g}",
    )
    objective = weighted_objective(params, float(np.sum(each.energy_j)), round_latency, each.phi)
    evaluation = dataclasses.replace(
        each, round_latency_s=round_latency, objective=objective, feasible=not broken, violations=broken
    )
    return BaselineResult("sequential_sl", alloc, evaluation)


def fl(
    problem: Problem,
    model_to_device_compute_ratio: float = FL_COMPUTE_RATIO_VIT_B32,
    model_weight_bits: float = FL_MODEL_BITS_VIT_B32,
) -> BaselineResult:
    """Federated learning: the whole model trains on each device, which then uploads its weights."""
    if not (np.isfinite(model_to_device_compute_ratio) and model_to_device_compute_ratio > 0):
        raise ModelError("fl", [f"model_to_device_compute_ratio: must be > 0, got {model_to_device_compute_ratio!r}"])
    if not (np.isfinite(model_weight_bits) and model_weight_bits > 0):
        raise ModelError("fl", [f"model_weight_bits: must be > 0, got {model_weight_bits!r}"])
    fleet, params = problem.fleet, problem.params
    n = len(fleet)
    alloc = AllocationVectors(
        np.full(n, FP32_BITS, dtype=np.int64), fleet.max_tx_power_w.copy(), np.full(n, params.total_bandwidth_hz / n)
    )
    cycles = fleet.samples * fleet.cycles_per_sample * model_to_device_compute_ratio
    rate = shannon_rate_bps(alloc.bandwidth_hz, alloc.tx_power_w, fleet.gain, params.noise_psd_w_per_hz)
    uplink_s = (model_weight_bits + params.overhead_bits) / rate
    latency = cycles / fleet.cpu_freq_hz + uplink_s + model_weight_bits / params.downlink_rate_bps
    energy = compute_energy_j(fleet) * model_to_device_compute_ratio + alloc.tx_power_w * uplink_s
    round_latency = float(np.max(latency))
    late = int(np.sum(latency > params.t_max_s * (1 + FEASIBILITY_RTOL)))
    broken = (f"{late} devices exceed t_max_s = {params.t_max_s:g} s",) if late else ()
    objective = weighted_objective(params, float(np.sum(energy)), round_latency, 0.0)
    evaluation = Evaluation(energy, latency, round_latency, 0.0, objective, not broken, broken)
    return BaselineResult("fl", alloc, evaluation)


def all_baselines(
    problem: Problem,
    model_to_device_compute_ratio: float = FL_COMPUTE_RATIO_VIT_B32,
    model_weight_bits: float = FL_MODEL_BITS_VIT_B32,
) -> dict[str, BaselineResult]:
    """Every baseline on ``problem``, by name in NAMES order."""
    return {
        "fixed": fixed(problem),
        "fp32_sfl": fp32_sfl(problem),
        "sequential_sl": sequential_sl(problem),
        "fl": fl(problem, model_to_device_compute_ratio, model_weight_bits),
    }
