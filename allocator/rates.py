"""Vectorized channel math shared by the blocks and the brute force: Shannon-rate inversions.

With c = p h / N0 (Hz) a device's rate is r(B) = B log2(1 + c / B), concave and increasing in B
with r -> c / ln 2 as B -> inf. The functions below invert the curves the blocks need:

- :func:`bandwidth_for_rate_hz`: the least B with r(B) >= R (Lambert W, Newton-polished);
- :func:`bandwidth_for_marginal_hz`: B where the energy p S / r(B) has slope -nu (KKT of the
  bandwidth block), through phi(x) = x^2 (ln(1 + x) - x / (1 + x)) / ln(1 + x)^2, x = c / B;
- :func:`psi_inverse`: y >= 0 with psi(y) = (y - 1) e^y + 1 = v, from the energy
  (N0 / h) B t (2^(S / (B t)) - 1) of a device that meets its latency with the least power
  (KKT of the joint power-bandwidth problem), y = S ln 2 / (B t).

Series expansions keep the small-argument ends accurate (no cancellation).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import lambertw

LN2 = math.log(2.0)
NEWTON_STEPS = 60  # cap; every inversion below converges in under 10 from its start
NEWTON_RTOL = 1e-14  # the step after one this small is at rounding level (quadratic convergence)
_SERIES_X = 0.05  # below this, ln(1 + x) - x / (1 + x) and psi use their series
_LOG_HUGE = 700.0  # exp() of more overflows


_D_SERIES = np.array([(-1) ** n * (n - 1) / n for n in range(16, 1, -1)])  # x^n, n = 16..2


def log1p_minus_ratio(x: np.ndarray) -> np.ndarray:
    """D(x) = ln(1 + x) - x / (1 + x) >= 0, by its series sum (-1)^n (n - 1) x^n / n for small x."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log1p(x) - x / (1.0 + x)
    small = x < _SERIES_X
    if small.any():
        xs = x[small]
        out[small] = np.polyval(_D_SERIES, xs) * xs**2
    return out


_PSI_SERIES_Y = 0.1  # below: psi by its series; above: y + log(y - 1 + e^-y) loses < 3e-14
_PSI_SERIES = np.array([(n - 1) / math.factorial(n) for n in range(13, 1, -1)])  # y^n, n = 13..2


def log_psi(y: np.ndarray) -> np.ndarray:
    """log psi(y), psi(y) = (y - 1) e^y + 1 = sum (n - 1) y^n / n!: no overflow, no cancellation."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = y + np.log(y - 1.0 + np.exp(-y))
        small = y < _PSI_SERIES_Y
        if small.any():
            ys = y[small]
            out[small] = 2.0 * np.log(ys) + np.log(np.polyval(_PSI_SERIES, ys))
    return out


def psi_slope_ratio(y: np.ndarray) -> np.ndarray:
    """d log psi / d log y = y^2 e^y / psi(y) (2 at y -> 0, about y for large y)."""
    y = np.asarray(y, dtype=np.float64)
    return np.exp(2.0 * np.log(y) + y - log_psi(y))


def psi_inverse(log_v: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """y >= 0 with log psi(y) = log_v (psi increasing from 0): Newton on log y.

    The start is ``start`` where it is a positive number (a warm start), else Lambert W's closed
    form y = 1 + W0((v - 1) / e).
    """
    log_v = np.asarray(log_v, dtype=np.float64)
    y0 = np.full(log_v.shape, np.nan)
    if start is not None:
        y0 = np.broadcast_to(np.asarray(start, np.float64), log_v.shape).copy()
    cold = ~(y0 > 0) | ~np.isfinite(y0)
    if cold.any():
        cold_v = log_v[cold]
        v = np.exp(np.minimum(cold_v, _LOG_HUGE))
        closed = 1.0 + lambertw((v - 1.0) / math.e, k=0).real
        y0[cold] = np.where(cold_v < -20.0, np.sqrt(2.0 * v), closed)  # psi ~ y^2 / 2: W loses digits there
    u = np.log(np.maximum(y0, 1e-300))
    for _ in range(NEWTON_STEPS):
        y = np.exp(u)
        value = log_psi(y)
        step = (value - log_v) / np.exp(2.0 * u + y - value)  # d log psi / d log y = y^2 e^y / psi
        u = u - np.clip(step, -2.0, 2.0)
        if np.all(np.abs(step) <= NEWTON_RTOL * np.maximum(1.0, np.abs(u))):
            break
    return np.exp(u)


_RATIO_SERIES = np.array([(-1) ** (n - 1) / n for n in range(16, 0, -1)])  # x^(n-1), n = 16..1


def log_rate_ratio(x: np.ndarray) -> np.ndarray:
    """log(ln(1 + x) / x), which is r(B) ln 2 / c at x = c / B (0 at x -> 0, decreasing)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.log1p(x) / x)
    small = x < _SERIES_X
    if small.any():
        out[small] = np.log(np.polyval(_RATIO_SERIES, x[small]))
    return out


def bandwidth_for_rate_hz(rate_bps: np.ndarray, snr_hz: np.ndarray, start_hz: np.ndarray | None = None) -> np.ndarray:
    """The least B with B log2(1 + c / B) >= R, c = p h / N0: 0 for R <= 0, inf when R >= c / ln 2.

    Newton on log(c / B) from ``start_hz`` where it is a positive number (a warm start), else from
    the closed form with Lambert W: 1 + c / B = -W_-1(-rho e^-rho) / rho, rho = R ln 2 / c.
    """
    rate, c = np.broadcast_arrays(np.asarray(rate_bps, dtype=np.float64), np.asarray(snr_hz, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = rate * LN2 / c
        ok = (rho > 0) & (rho < 1) & (c > 0)
        r = np.where(ok, rho, 0.5)
        x0 = np.full(r.shape, np.nan) if start_hz is None else c / np.broadcast_to(start_hz, r.shape)
    cold = ~(x0 > 0) | ~np.isfinite(x0)
    if cold.any():
        rc = r[cold]
        x0[cold] = -lambertw(-rc * np.exp(-rc), k=-1).real / rc - 1.0
    u = np.log(np.maximum(x0, 1e-300))
    log_r = np.log(r)
    for _ in range(NEWTON_STEPS):
        x = np.exp(u)
        slope = x / ((1.0 + x) * np.log1p(x)) - 1.0  # d log_rate_ratio / d log x, in (-1, 0)
        step = (log_rate_ratio(x) - log_r) / slope
        u = u - np.clip(step, -2.0, 2.0)
        if np.all(np.abs(step) <= NEWTON_RTOL * np.maximum(1.0, np.abs(u))):
            break
    bandwidth = np.where(ok, c / np.exp(u), np.inf)
    return np.where(rate <= 0, 0.0, bandwidth)


def log_phi(x: np.ndarray) -> np.ndarray:
    """log phi(x), phi(x) = x^2 D(x) / ln(1 + x)^2: the energy's marginal value of bandwidth, scaled."""
    x = np.asarray(x, dtype=np.float64)
    return np.log(log1p_minus_ratio(x)) - 2.0 * log_rate_ratio(x)


def phi_slope_ratio(x: np.ndarray) -> np.ndarray:
    """d log phi / d log x, in (1, 2]."""
    x = np.asarray(x, dtype=np.float64)
    dx = x / (1.0 + x) ** 2  # D'(x)
    return x * dx / log1p_minus_ratio(x) - 2.0 * (x / ((1.0 + x) * np.log1p(x)) - 1.0)


def phi_inverse(log_v: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """x > 0 with log phi(x) = log_v (phi increases from 0 to inf): Newton on log x."""
    log_v = np.asarray(log_v, dtype=np.float64)
    u = 0.5 * (log_v + LN2) if start is None else np.log(start)  # phi ~ x^2 / 2 near 0
    for _ in range(NEWTON_STEPS):
        x = np.exp(u)
        step = (log_phi(x) - log_v) / phi_slope_ratio(x)
        u = u - np.clip(step, -2.0, 2.0)
        if np.all(np.abs(step) <= NEWTON_RTOL * np.maximum(1.0, np.abs(u))):
            break
    return np.exp(u)


def rate_slope_bps_per_hz(bandwidth_hz: np.ndarray, snr_hz: np.ndarray) -> np.ndarray:
    """dr/dB = D(c / B) / ln 2 of r(B) = B log2(1 + c / B)."""
    return log1p_minus_ratio(np.asarray(snr_hz) / np.asarray(bandwidth_hz)) / LN2
