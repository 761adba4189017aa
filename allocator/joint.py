"""Power and bandwidth together at fixed bits: the convex (p, B) problem, vectorized and batched.

At a latency level T every device meets it with the least power, so p_k = (2^(S_k / (B_k t_k)) - 1)
N0 B_k / h_k (t_k = T - a_k) and its uplink energy is e_k(B_k, t_k) = (N0 / h_k) B_k t_k (2^(S_k /
(B_k t_k)) - 1): jointly convex in (B, t) (the Hessian of u (2^(S/u) - 1) at u = B t has
determinant -phi'(u) (2 u phi''(u) + phi'(u)) >= 0). The power cap p_k <= p_max_k is B_k >= beta_k(T),
the bandwidth at which max power just meets T. For fixed T, with nu on sum B = B_total:
-de_k/dB = (N0 t_k / h_k) psi(y_k) = nu, y_k = S_k ln 2 / (B_k t_k), psi(y) = (y - 1) e^y + 1, so
B_k(nu) = max(beta_k, S_k ln 2 / (t_k psi^-1(nu h_k / (N0 t_k)))): a safeguarded Newton on log nu
per batch row. The value V(T) = lE sum e_k + lT T is convex in T; :func:`level_slope` is its
derivative (envelope theorem) for a root search.

Arrays are (..., K): any leading batch shape (the brute force batches bit combinations and levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from allocator.rates import LN2, bandwidth_for_rate_hz, log_psi, psi_inverse, psi_slope_ratio, rate_slope_bps_per_hz

FILL_RTOL = 1e-14  # budget residual, relative to B_total
FILL_STEPS = 200


@dataclass(frozen=True)
class JointLevel:
    """The (p, B) optimum at given latency levels: per row feasibility, per device B, p and energy."""

    feasible: np.ndarray  # (...,) bool
    bandwidth_hz: np.ndarray  # (..., K)
    tx_power_w: np.ndarray
    energy_j: np.ndarray  # uplink energy per device
    log_nu: np.ndarray  # (...,) the budget multiplier (energy units), log
    bound: np.ndarray  # (..., K) at the power cap (B_k = beta_k)


def cap_bandwidth_hz(
    bits: np.ndarray, airtime_s: np.ndarray, gain_per_n0: np.ndarray, max_power_w: np.ndarray
) -> np.ndarray:
    """beta: the least bandwidth at which max power sends ``bits`` in ``airtime_s`` (inf: none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(airtime_s > 0, bits / np.where(airtime_s > 0, airtime_s, 1.0), np.inf)
    return bandwidth_for_rate_hz(rate, max_power_w * gain_per_n0)


def _log_nu_at(
    bandwidth_hz: np.ndarray, bits: np.ndarray, airtime_s: np.ndarray, gain_per_n0: np.ndarray
) -> np.ndarray:
    """log nu at which a device's unconstrained bandwidth is ``bandwidth_hz``."""
    y = bits * LN2 / (airtime_s * bandwidth_hz)
    return log_psi(y) + np.log(airtime_s / gain_per_n0)


def _free(
    log_nu: np.ndarray,
    bits: np.ndarray,
    airtime_s: np.ndarray,
    gain_per_n0: np.ndarray,
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each device's unconstrained bandwidth at nu, and y there (``start``: a nearby y)."""
    y = psi_inverse(log_nu[..., None] + np.log(gain_per_n0 / airtime_s), start)
    return bits * LN2 / (airtime_s * y), y


def _fill_log_nu(
    bits: np.ndarray,
    airtime_s: np.ndarray,
    gain_per_n0: np.ndarray,
    beta: np.ndarray,
    total_hz: float,
    start: np.ndarray,
) -> np.ndarray:
    """log nu per row making sum_k max(beta_k, B_k(nu)) = B_total (rows with room to spare)."""
    k = bits.shape[-1]
    slack = total_hz - beta.sum(axis=-1)
    lo = _log_nu_at(np.full_like(bits, total_hz), bits, airtime_s, gain_per_n0).min(axis=-1)
    hi = _log_nu_at(beta + slack[..., None] / k, bits, airtime_s, gain_per_n0).max(axis=-1)
    s = np.where(np.isfinite(start) & (start > lo) & (start < hi), start, 0.5 * (lo + hi))
    y = None
    for _ in range(FILL_STEPS):
        free, y = _free(s, bits, airtime_s, gain_per_n0, y)
        excess = np.maximum(beta, free).sum(axis=-1) - total_hz
        lo, hi = np.where(excess > 0, s, lo), np.where(excess > 0, hi, s)
        slope = -np.where(free > beta, free / psi_slope_ratio(y), 0.0).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = s - excess / slope
        inside = np.isfinite(newton) & (newton >= lo) & (newton <= hi)
        done = (np.abs(excess) <= FILL_RTOL * total_hz) | (hi - lo <= 1e-15 * np.maximum(1.0, np.abs(s)))
        if done.all():
            break
        s = np.where(done, s, np.where(inside, newton, 0.5 * (lo + hi)))
    return s


def solve_level(
    bits: np.ndarray,
    airtime_s: np.ndarray,
    gain_per_n0: np.ndarray,
    max_power_w: np.ndarray,
    total_hz: float,
    start_log_nu: np.ndarray | float = np.nan,
) -> JointLevel:
    """The energy-minimal (p, B) meeting the airtimes ``airtime_s`` (..., K) under the budget.

    ``start_log_nu`` (per row, or one value) warm-starts the multiplier search, e.g. from a
    nearby level's solution.
    """
    bits, airtime_s = np.broadcast_arrays(np.asarray(bits, np.float64), np.asarray(airtime_s, np.float64))
    shape = bits.shape
    start = np.broadcast_to(np.asarray(start_log_nu, np.float64), shape[:-1]).reshape(-1)
    flat = _solve_rows(
        bits.reshape(-1, shape[-1]), airtime_s.reshape(-1, shape[-1]), gain_per_n0, max_power_w, total_hz, start
    )
    return JointLevel(*(np.reshape(a, shape[:-1] if a.ndim == 1 else shape) for a in (
        flat.feasible, flat.bandwidth_hz, flat.tx_power_w, flat.energy_j, flat.log_nu, flat.bound)))


def _solve_rows(
    bits: np.ndarray, airtime_s: np.ndarray, gain_per_n0: np.ndarray, max_power_w: np.ndarray, total_hz: float,
    start: np.ndarray,
) -> JointLevel:
    """:func:`solve_level` on (rows, K) arrays."""
    beta = cap_bandwidth_hz(bits, airtime_s, gain_per_n0, max_power_w)
    usable = np.isfinite(beta).all(axis=-1) & (airtime_s > 0).all(axis=-1)
    beta_sum = np.where(usable, np.where(np.isfinite(beta), beta, 0.0).sum(axis=-1), np.inf)
    feasible = usable & (beta_sum <= total_hz * (1 + 1e-12))
    roomy = feasible & (beta_sum < total_hz * (1 - 1e-13))
    safe_t = np.where(feasible[:, None], airtime_s, 1.0)
    safe_beta = np.where(feasible[:, None], beta, 0.0)
    log_nu = np.full(feasible.shape, -np.inf)
    bandwidth = safe_beta * (total_hz / np.where(feasible, np.maximum(beta_sum, 1e-300), 1.0))[:, None]
    if roomy.any():
        s = _fill_log_nu(bits[roomy], safe_t[roomy], gain_per_n0, safe_beta[roomy], total_hz, start[roomy])
        free, _ = _free(s, bits[roomy], safe_t[roomy], gain_per_n0)
        bandwidth[roomy] = _exact_budget(np.maximum(safe_beta[roomy], free), safe_beta[roomy], total_hz)
        log_nu[roomy] = s
    tight = feasible & ~roomy
    at_cap = _log_nu_at(np.maximum(bandwidth, 1e-300), bits, safe_t, gain_per_n0).max(axis=-1)
    log_nu = np.where(tight, at_cap, log_nu)
    power, energy = _power_energy(bits, safe_t, gain_per_n0, bandwidth)
    power = np.minimum(power, max_power_w)
    bound = bandwidth <= safe_beta * (1 + 1e-12)
    return JointLevel(feasible, bandwidth, power, np.where(feasible[:, None], energy, np.inf), log_nu, bound)


def _exact_budget(bandwidth_hz: np.ndarray, beta: np.ndarray, total_hz: float) -> np.ndarray:
    """Rescale each row's devices above their cap bandwidth so the row sums exactly to the budget."""
    free = bandwidth_hz > beta
    room = total_hz - np.where(free, 0.0, bandwidth_hz).sum(axis=-1)
    free_sum = np.where(free, bandwidth_hz, 0.0).sum(axis=-1)
    scale = np.where(free_sum > 0, room / np.where(free_sum > 0, free_sum, 1.0), 1.0)
    return np.where(free, bandwidth_hz * scale[..., None], bandwidth_hz)


def _power_energy(
    bits: np.ndarray, airtime_s: np.ndarray, gain_per_n0: np.ndarray, bandwidth_hz: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The least power meeting each airtime on ``bandwidth_hz``, and the energy p t."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = bits * LN2 / (airtime_s * bandwidth_hz)
        power = bandwidth_hz / gain_per_n0 * np.expm1(y)
    return power, power * airtime_s


def level_slope(
    level: JointLevel, bits: np.ndarray, airtime_s: np.ndarray, gain_per_n0: np.ndarray, max_power_w: np.ndarray
) -> np.ndarray:
    """d(sum_k e_k)/dT at the level's solution (envelope theorem; add lT for the objective's slope)."""
    b = level.bandwidth_hz
    y = bits * LN2 / (airtime_s * b)
    psi = np.exp(log_psi(y))
    direct = -(b / gain_per_n0) * psi  # de/dt at fixed B
    mu = np.maximum(np.exp(level.log_nu)[..., None] - airtime_s / gain_per_n0 * psi, 0.0)
    dbeta_dt = -bits / (airtime_s**2 * rate_slope_bps_per_hz(b, max_power_w * gain_per_n0))
    return (direct + np.where(level.bound, mu * dbeta_dt, 0.0)).sum(axis=-1)


def min_level_s(
    bits: np.ndarray, fixed_s: np.ndarray, gain_per_n0: np.ndarray, max_power_w: np.ndarray, total_hz: float
) -> np.ndarray:
    """Per row, the least round latency T with sum_k beta_k(T) <= B_total (vectorized bisection).

    Bisects log((T - floor) / floor) to 1e-12, floor being the infinite-band latency, each step's
    bandwidths warm-started from the last.
    """
    floor = (fixed_s + bits * LN2 / (max_power_w * gain_per_n0)).max(axis=-1)
    scale = np.maximum(floor, 1e-9)
    lo, hi = np.full(floor.shape, -40.0), np.full(floor.shape, 40.0)
    snr = max_power_w * gain_per_n0
    need = None
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        airtime = (floor + scale * np.exp(mid))[..., None] - fixed_s
        need = bandwidth_for_rate_hz(bits / airtime, snr, need)
        over = need.sum(axis=-1) > total_hz
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
        if np.all(hi - lo < 1e-12):
            break
    return floor + scale * np.exp(hi)


def uncapped_level_s(lower_s: float, lambda_time: float, lambda_energy: float, energy_at_lower_j: float) -> float:
    """An upper bound on the best T when T_max = inf and lT > 0: beyond it lT T alone exceeds V(lower)."""
    return lower_s + lambda_energy * energy_at_lower_j / lambda_time + math.ulp(lower_s)
