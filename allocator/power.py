"""Power against rate: each device's rate curve, its inversions, and the Dinkelbach power program.

A device's rate is r(p) = sum_m (W_m / ln 2) ln(1 + p gamma_m) over the channels it holds: one
channel of width B_k and gamma = h_k / (N0 B_k) with continuous bandwidth, or its subchannels with
gamma = h_km / (n_k N0 B_sub) (power split evenly over the n_k it holds). r is concave and
increasing, so the uplink energy p S / r(p) increases with p: the least power meeting a latency is
optimal, and Newton's method from p = 0 converges monotonically on both inversions below (r is
concave; 1 / r'(p) is concave by Cauchy-Schwarz).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocator.rates import LN2

INVERSION_STEPS = 200
INVERSION_RTOL = 1e-15
DINKELBACH_STEPS = 500
DINKELBACH_RTOL = 1e-14


def minimal_power_w(
    bits: np.ndarray, airtime_s: np.ndarray, bandwidth_hz: np.ndarray, gain: np.ndarray, n0_w_per_hz: float
) -> np.ndarray:
    """The closed form p = (2^(S / (B t)) - 1) N0 B / h: the least power sending S bits in t seconds."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        spectral = np.where(airtime_s > 0, bits / (bandwidth_hz * airtime_s), np.inf)
        return np.expm1(spectral * LN2) * n0_w_per_hz * bandwidth_hz / gain


@dataclass(frozen=True)
class RateCurve:
    """r_k(p) = sum_m (W_km / ln 2) ln(1 + p gamma_km), one row per device (W = 0: not held)."""

    width_hz: np.ndarray  # (N, M)
    snr_per_w: np.ndarray  # (N, M), gamma

    @classmethod
    def continuous(cls, bandwidth_hz: np.ndarray, gain: np.ndarray, n0_w_per_hz: float) -> RateCurve:
        """One channel of width B_k per device."""
        b = np.asarray(bandwidth_hz, dtype=np.float64)
        with np.errstate(divide="ignore"):
            gamma = np.where(b > 0, gain / (n0_w_per_hz * np.where(b > 0, b, 1.0)), 0.0)
        return cls(b[:, None], gamma[:, None])

    @classmethod
    def subchannels(cls, held: np.ndarray, gain: np.ndarray, width_hz: float, n0_w_per_hz: float) -> RateCurve:
        """The subchannels each device holds (``held`` 0/1, ``gain`` per device and subchannel)."""
        held = np.asarray(held, dtype=np.float64)
        count = np.maximum(held.sum(axis=1, keepdims=True), 1.0)
        return cls(held * width_hz, held * gain / (count * n0_w_per_hz * width_hz))

    def rate_bps(self, power_w: np.ndarray) -> np.ndarray:
        """r_k(p_k)."""
        return (self.width_hz * np.log1p(np.asarray(power_w)[:, None] * self.snr_per_w)).sum(axis=1) / LN2

    def slope(self, power_w: np.ndarray) -> np.ndarray:
        """dr_k/dp at p_k."""
        per_channel = self.width_hz * self.snr_per_w / (1.0 + np.asarray(power_w)[:, None] * self.snr_per_w)
        return per_channel.sum(axis=1) / LN2

    def power_for_rate_w(self, rate_bps: np.ndarray) -> np.ndarray:
        """The least p_k with r_k(p_k) >= R_k: closed form for one channel (R may be (N, ...)), else Newton."""
        rate_bps = np.asarray(rate_bps, dtype=np.float64)
        if self.width_hz.shape[1] == 1:
            shape = (-1,) + (1,) * (rate_bps.ndim - 1)
            w, gamma = self.width_hz[:, 0].reshape(shape), self.snr_per_w[:, 0].reshape(shape)
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                power = np.expm1(rate_bps * LN2 / w) / gamma
            return np.where(rate_bps <= 0, 0.0, np.where((w > 0) & (gamma > 0), power, np.inf))
        return invert_rate_w(self, rate_bps)


def invert_rate_w(curve: RateCurve, rate_bps: np.ndarray) -> np.ndarray:
    """p with r(p) = R by Newton from p = 0 (monotone from below since r is concave); inf: no such p."""
    rate = np.asarray(rate_bps, dtype=np.float64)
    reachable = (curve.width_hz * curve.snr_per_w).sum(axis=1) > 0
    goal = np.where(reachable & np.isfinite(rate), np.maximum(rate, 0.0), 0.0)
    power = np.zeros_like(goal)
    for _ in range(INVERSION_STEPS):
        step = (goal - curve.rate_bps(power)) / curve.slope(power)
        power = power + np.maximum(step, 0.0)
        if np.all(step <= INVERSION_RTOL * power):
            break
    return np.where(reachable & np.isfinite(rate), power, np.where(rate <= 0, 0.0, np.inf))


def invert_slope_w(curve: RateCurve, slope: np.ndarray) -> np.ndarray:
    """p >= 0 with r'(p) = s (0 where r'(0) <= s): Newton on the concave 1 / r'(p) from p = 0."""
    target = 1.0 / np.asarray(slope, dtype=np.float64)
    power = np.zeros_like(target)
    for _ in range(INVERSION_STEPS):
        gamma = curve.snr_per_w
        h = curve.slope(power)
        dh = -(curve.width_hz * gamma**2 / (1.0 + power[:, None] * gamma) ** 2).sum(axis=1) / LN2
        step = (target - 1.0 / h) / (-dh / h**2)
        power = power + np.maximum(step, 0.0)
        if np.all(step <= INVERSION_RTOL * power):
            break
    return power


def dinkelbach_power_w(
    curve: RateCurve, required_rate_bps: np.ndarray, max_power_w: np.ndarray
) -> tuple[np.ndarray, int]:
    """min p / r(p) s.t. r(p) >= R, p <= p_max per device by Dinkelbach's method; (power, iterations).

    Each iteration minimizes p - lambda r(p) (convex) over the feasible [p_lo, p_max] and sets
    lambda = p / r(p); it stops when min (p - lambda r(p)) = 0. Devices whose p_lo exceeds p_max
    get p_lo (the caller reports them infeasible).
    """
    low = invert_rate_w(curve, required_rate_bps)
    high = np.maximum(np.asarray(max_power_w, dtype=np.float64), low)
    power = high.copy()
    ratio = power / curve.rate_bps(power)
    for iteration in range(1, DINKELBACH_STEPS + 1):
        power = np.clip(invert_slope_w(curve, 1.0 / ratio), low, high)
        gap = power - ratio * curve.rate_bps(power)  # F(lambda) <= 0, = 0 at the optimum
        ratio = power / curve.rate_bps(power)
        if np.all(np.abs(gap) <= DINKELBACH_RTOL * power):
            return power, iteration
    return power, DINKELBACH_STEPS
