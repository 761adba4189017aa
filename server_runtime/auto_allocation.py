"""``quant.bits = "auto"``: the SFLAM allocator every round, calibrated by what devices measured.

Before a device has reported, its model comes from its firmware profile (clock, effective
capacitance, cycles per MAC, maximum transmit power) and a path-loss channel at
``allocator.default_distance_m``. Each RoundUpdate then recalibrates it (docs/allocator.md):

- cycles per sample  = measured compute time x f / samples, so the model's T_cmp is the measured one;
- kappa              = (energy - tx power x uplink time) / (cycles x f^2), the compute share of the energy;
- channel gain       = the h that makes the Shannon rate at the round's (B, p) equal the measured
  uplink rate (bytes sent x 8 / uplink time); with an emulated link that is the emulated channel;
- activation range R = the mean hi - lo of the device's activations this round;
- server seconds per sample = the median of the last SERVER_WINDOW measurements (the server's step
  time / samples, one per device and round): one slow round on a loaded host moves it no more
  than one sample of the window, and a faster server brings it down again.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from allocator.scenario import TRAIN_FACTOR, ModelShape
from allocator.system import (
    AllocationVectors,
    DeviceArrays,
    Problem,
    SystemParams,
    bits_down_of,
    noise_psd_w_per_hz,
    path_loss_db,
)
from edge_runtime import protocol as p
from edge_runtime.quantize import QuantizedTensor
from server_runtime.config import RunConfig
from server_runtime.coordinator import DeviceRegistry
from server_runtime.presets import ViTConfig

log = logging.getLogger(__name__)
SERVER_WINDOW = 32  # server step-time measurements the calibration keeps (a few rounds of devices)
FALLBACK = {"cpu_freq_hz": 1.0e9, "kappa": 1e-28, "cycles_per_mac": 1.0, "max_tx_power_w": 0.1}
GAIN_LIMITS = (1e-20, 1e2)  # a calibrated linear gain outside this is a measurement artefact


@dataclass(frozen=True)
class DeviceCalibration:
    """One device's model parameters, from its profile and then from its telemetry."""

    cycles_per_sample: float
    cpu_freq_hz: float
    kappa: float
    gain: float
    max_tx_power_w: float
    activation_range: float = 1.0
    calibrated: bool = False


class AutoAllocation:
    """Builds the allocation problem of the selected devices and solves it each round."""

    def __init__(self, config: RunConfig, model: ViTConfig) -> None:
        self.config = config
        shape = ModelShape.from_preset(model)
        self.macs_per_sample = shape.device_macs_per_sample
        a, q = config.allocator, config.quant
        choose_down = q.gradient_bits == "auto"
        self.params = SystemParams(
            elements_per_sample=shape.elements_per_sample, label_bits=64,
            weight_bits=shape.device_weight_bits, gradient_bits=32 if choose_down else int(q.gradient_bits),
            allowed_bits_down=tuple(a.allowed_bits_down) if choose_down else (),
            downlink_quant_weight=a.downlink_quant_weight,
            server_cycles_per_sample=0.0, server_freq_hz=1.0, downlink_rate_bps=a.downlink_rate_bps,
            noise_psd_w_per_hz=noise_psd_w_per_hz(), total_bandwidth_hz=config.round.total_bandwidth_hz,
            t_max_s=a.t_max_s or config.round.deadline_s, lambda_energy=a.lambda_energy,
            lambda_time=a.lambda_time, lambda_quant=a.lambda_quant, allowed_bits=tuple(a.allowed_bits),
        )
        self.calibration: dict[str, DeviceCalibration] = {}
        self.ranges: dict[str, list[float]] = {}
        self.server_times: deque[float] = deque(maxlen=SERVER_WINDOW)  # server s per sample, newest last
        self.last_result = None
        self.last_fixed = None  # the fixed baseline scored on the last round's problem

    # -- calibration -----------------------------------------------------------------------------

    def from_profile(self, profile: str, device_id: str | None = None) -> DeviceCalibration:
        """The uncalibrated model of a device with firmware profile ``profile`` (and its known gain)."""
        values = dict(FALLBACK)
        try:
            from firmware_profiles import load_profile

            prof = load_profile(profile)
            values.update(cpu_freq_hz=prof.compute.cpu_freq_hz, kappa=prof.compute.wall_kappa,
                          cycles_per_mac=prof.compute.cycles_per_mac, max_tx_power_w=prof.radio.max_tx_power_w)
        except (ImportError, ValueError, OSError) as exc:
            log.info("allocator: no profile %r (%s); generic device assumed", profile, exc)
        gain = self.config.allocator.channel_gains.get(device_id or "")
        if gain is None:
            gain = 10 ** (-float(path_loss_db(np.array([self.config.allocator.default_distance_m]))[0]) / 10)
        return DeviceCalibration(TRAIN_FACTOR * self.macs_per_sample * values["cycles_per_mac"],
                                 values["cpu_freq_hz"], values["kappa"], gain, values["max_tx_power_w"])

    def observe_activations(self, device_id: str, tensor: QuantizedTensor) -> None:
        """Remember the range of a device's activations (R in the quantization term)."""
        lo, hi = np.asarray(tensor.lo, np.float64), np.asarray(tensor.hi, np.float64)
        if lo.size and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
            self.ranges.setdefault(device_id, []).append(float(np.mean(hi - lo)))

    def observe_round(self, device_id: str, profile: str, update: p.RoundUpdate, allocation: p.Allocation,
                      server_time_s: float) -> DeviceCalibration:
        """Recalibrate a device from its RoundUpdate telemetry (module docstring)."""
        old = self.calibration.get(device_id) or self.from_profile(profile, device_id)
        tel = update.telemetry
        samples = max(1, update.num_samples * self.config.training.local_epochs)
        new = old
        if tel.compute_time_s > 0:
            new = replace(new, cycles_per_sample=tel.compute_time_s * old.cpu_freq_hz / samples)
            compute_j = tel.energy_j - allocation.tx_power_w * tel.uplink_time_s
            if compute_j > 0:
                new = replace(new, kappa=compute_j / (new.cycles_per_sample * samples * old.cpu_freq_hz ** 2))
        gain = self._measured_gain(tel, allocation)
        if gain is not None:
            new = replace(new, gain=gain)
        ranges = self.ranges.pop(device_id, [])
        if ranges:
            new = replace(new, activation_range=float(np.mean(ranges)))
        if server_time_s > 0:
            self.server_times.append(server_time_s / samples)
        self.calibration[device_id] = replace(new, calibrated=True)
        return self.calibration[device_id]

    def _measured_gain(self, tel: p.Telemetry, allocation: p.Allocation) -> float | None:
        """h such that B log2(1 + p h / (N0 B)) equals the measured uplink rate, or None."""
        b, power = allocation.bandwidth_hz, allocation.tx_power_w
        if tel.uplink_time_s <= 0 or tel.bytes_sent <= 0 or b <= 0 or power <= 0:
            return None
        spectral = 8.0 * tel.bytes_sent / tel.uplink_time_s / b
        if spectral > 60:  # faster than any radio: a loopback link, not a channel
            return GAIN_LIMITS[1]
        gain = math.expm1(spectral * math.log(2)) * self.params.noise_psd_w_per_hz * b / power
        return float(min(max(gain, GAIN_LIMITS[0]), GAIN_LIMITS[1]))

    @property
    def server_s_per_sample(self) -> float:
        """The server's seconds per sample: the median of its recent measurements (0 before any)."""
        return statistics.median(self.server_times) if self.server_times else 0.0

    # -- allocation ------------------------------------------------------------------------------

    def problem(self, selected: tuple[str, ...], registry: DeviceRegistry) -> Problem:
        """The allocation problem of this round's devices."""
        cals, samples = [], []
        for device_id in selected:
            info = registry.devices.get(device_id)
            profile = info.profile if info is not None else "unknown"
            cals.append(self.calibration.get(device_id) or self.from_profile(profile, device_id))
            samples.append(max(1, (info.num_samples if info is not None else 0) * self.config.training.local_epochs))
        d = np.asarray(samples, np.float64)
        fleet = DeviceArrays(
            ids=tuple(selected), samples=d,
            cycles_per_sample=np.array([c.cycles_per_sample for c in cals]),
            cpu_freq_hz=np.array([c.cpu_freq_hz for c in cals]), kappa=np.array([c.kappa for c in cals]),
            gain=np.array([c.gain for c in cals]), max_tx_power_w=np.array([c.max_tx_power_w for c in cals]),
            activation_range=np.array([c.activation_range for c in cals]), weight=d / d.sum(),
            profiles=tuple(registry.devices[i].profile if i in registry.devices else "unknown" for i in selected),
        )
        params = replace(self.params, server_cycles_per_sample=self.server_s_per_sample)
        return Problem(fleet, params)

    def allocate(self, selected: tuple[str, ...], registry: DeviceRegistry) -> tuple[p.Allocation, ...]:
        """Solve this round's problem; the fallback allocation when it is infeasible (logged)."""
        from allocator.baselines import fixed
        from allocator.bcd import solve

        problem = self.problem(selected, registry)
        result = solve(problem)
        self.last_result, self.last_fixed = result, fixed(problem).evaluation  # the page's comparison
        if result.status == "infeasible":
            log.warning("allocator: infeasible (%s); using its fallback", result.message)
        alloc: AllocationVectors = result.allocation
        per_token = self.config.quant.per_token
        down = bits_down_of(self.params, alloc)
        return tuple(
            p.Allocation(d, int(alloc.bits[i]), int(down[i]), float(alloc.tx_power_w[i]),
                         float(alloc.bandwidth_hz[i]), per_token)
            for i, d in enumerate(selected)
        )

    def summary(self) -> dict | None:
        """The last solve for the metrics line: status, objective, solve time, iterations, and the
        fixed baseline scored on the same problem (the fleet page's comparison)."""
        r, base = self.last_result, self.last_fixed
        if r is None:
            return None
        summary = {"status": r.status, "objective": float(r.evaluation.objective), "solve_time_s": r.solve_time_s,
                   "iterations": r.iterations, "predicted_round_latency_s": float(r.evaluation.round_latency_s)}
        compared = {"predicted_energy_j": float(np.sum(r.evaluation.energy_j))}
        if base is not None:
            compared.update(fixed_objective=float(base.objective), fixed_round_latency_s=float(base.round_latency_s),
                            fixed_energy_j=float(np.sum(base.energy_j)))
        return summary | {k: v for k, v in compared.items() if math.isfinite(v)}
