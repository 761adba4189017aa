"""Subchannel assignment by swap matching: no swap or move of subchannels lowers the objective.

Each of the M equal subchannels goes to at most one device; a device splits its power evenly over
the subchannels it holds. Given bits and powers, a device's rate, hence its energy p S / r and
latency a + S / r, depends only on the set it holds. Starting from a greedy assignment, the block
repeatedly applies the best improving exchange, either a swap of two subchannels between two
devices or a move of one subchannel to another device (or back to the free pool), until none
improves. "Improves" is lexicographic: first the total latency shortfall (sum over devices of
1 - r / r_needed, so an infeasible start is repaired first), then the objective. Every candidate
is scored at once (an M x (N + 1) move matrix and an M x M swap matrix), O(N M + M^2) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocator.rates import LN2

SCORE_RTOL = 1e-12  # a candidate must beat the current score by this (relative) to count
MAX_EXCHANGES_PER_SUBCHANNEL = 100


@dataclass(frozen=True)
class MatchingData:
    """What the matching needs: per device and subchannel gains, powers, bits, fixed times, weights."""

    gain: np.ndarray  # (N, M)
    tx_power_w: np.ndarray
    bits: np.ndarray
    fixed_s: np.ndarray
    width_hz: float  # one subchannel
    n0_w_per_hz: float
    t_max_s: float
    lambda_energy: float
    lambda_time: float

    @property
    def needed_rate_bps(self) -> np.ndarray:
        """The rate meeting t_max (inf where the fixed time alone exceeds it; 0 when uncapped)."""
        airtime = self.t_max_s - self.fixed_s
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(airtime > 0, self.bits / np.where(airtime > 0, airtime, 1.0), np.inf)


@dataclass(frozen=True)
class Matching:
    """A stable assignment: ``held`` (N, M) 0/1, the exchanges applied, whether the cap was hit."""

    held: np.ndarray
    exchanges: int
    stable: bool
    shortfall: float


def channel_rates_bps(data: MatchingData, count: np.ndarray) -> np.ndarray:
    """(N, M): each device's rate on each subchannel when splitting its power over ``count`` of them."""
    share = np.where(count > 0, data.tx_power_w / np.maximum(count, 1), 0.0)
    return data.width_hz * np.log1p(share[:, None] * data.gain / (data.n0_w_per_hz * data.width_hz)) / LN2


def device_rates_bps(data: MatchingData, held: np.ndarray) -> np.ndarray:
    """Each device's rate under assignment ``held``."""
    return (channel_rates_bps(data, held.sum(axis=1)) * held).sum(axis=1)


class _Score:
    """Per-device terms of the score at the current rates, and the score of changing two of them."""

    def __init__(self, data: MatchingData, rate: np.ndarray) -> None:
        self.data = data
        self.need = data.needed_rate_bps
        self.short, self.cost, self.latency = self.terms(np.arange(rate.size), rate)
        self.dead = rate <= 0
        order = np.argsort(-np.where(self.dead, -np.inf, self.latency))[:3]
        self.top = np.pad(order, (0, 3 - order.size), constant_values=-1)
        self.top_value = np.where(self.top >= 0, self.latency[self.top], -np.inf)
        self.shortfall = float(self.short.sum())
        self.objective = self.pair(np.array([-1]), np.array([0.0]), np.array([-1]), np.array([0.0]))[1][0]

    def terms(self, device: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shortfall, energy term, latency) of ``device`` at ``rate`` (0 for device -1)."""
        d, k = self.data, np.maximum(device, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            short = np.clip(1.0 - rate / self.need[k] - SCORE_RTOL, 0.0, 1.0)
            short = np.where(np.isinf(self.need[k]) | (rate <= 0), 1.0, np.nan_to_num(short))
            safe = np.where(rate > 0, rate, 1.0)
            cost = np.where(rate > 0, d.lambda_energy * d.tx_power_w[k] * d.bits[k] / safe, 0.0)
            latency = np.where(rate > 0, d.fixed_s[k] + d.bits[k] / safe, np.inf)
        none = device < 0
        return np.where(none, 0.0, short), np.where(none, 0.0, cost), np.where(none, -np.inf, latency)

    def pair(self, u: np.ndarray, ru: np.ndarray, v: np.ndarray, rv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shortfall, objective) after devices u and v (-1: none) take rates ru and rv."""
        su, cu, tu = self.terms(u, ru)
        sv, cv, tv = self.terms(v, rv)
        old_s = np.where(u >= 0, self.short[u], 0.0) + np.where(v >= 0, self.short[v], 0.0)
        old_c = np.where(u >= 0, self.cost[u], 0.0) + np.where(v >= 0, self.cost[v], 0.0)
        old_dead = np.where(u >= 0, self.dead[u], False).astype(int) + np.where(v >= 0, self.dead[v], False)
        dead = int(self.dead.sum()) - old_dead + (u >= 0) * (ru <= 0) + (v >= 0) * (rv <= 0)
        shortfall = self.shortfall - old_s + su + sv
        energy = float(self.cost.sum()) - old_c + cu + cv
        latency = np.maximum(np.maximum(self._others_max(u, v), tu), tv)
        objective = energy + (self.data.lambda_time * latency if self.data.lambda_time > 0 else 0.0)
        return np.maximum(shortfall, 0.0), np.where(dead > 0, np.inf, objective)

    def _others_max(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """max latency over devices other than u and v (from the top three)."""
        best = np.full(np.broadcast(u, v).shape, -np.inf)
        for rank in range(2, -1, -1):
            keep = (self.top[rank] != u) & (self.top[rank] != v)
            best = np.where(keep, self.top_value[rank], best)
        return best

    def improves(self, shortfall: np.ndarray, objective: np.ndarray) -> np.ndarray:
        """Whether each candidate beats the current score lexicographically."""
        tol = SCORE_RTOL * max(1.0, self.shortfall)
        with np.errstate(invalid="ignore"):
            better_obj = objective < self.objective - SCORE_RTOL * abs(self.objective)
            if np.isinf(self.objective):
                better_obj = np.isfinite(objective)
        return (shortfall < self.shortfall - tol) | ((shortfall <= self.shortfall + tol) & better_obj)


def _one_rate_bps(data: MatchingData, device: int, held_row: np.ndarray) -> float:
    """Device ``device``'s rate holding the subchannels marked in ``held_row``."""
    share = data.tx_power_w[device] / max(int(held_row.sum()), 1)
    snr = share * data.gain[device] / (data.n0_w_per_hz * data.width_hz)
    return float((data.width_hz * np.log1p(snr) * held_row).sum() / LN2)


def greedy_assignment(data: MatchingData) -> np.ndarray:
    """Each subchannel in turn to the device with the best gain on it among those still short of
    the rate t_max needs (any device once none is short)."""
    n, m = data.gain.shape
    held = np.zeros((n, m), dtype=np.int64)
    rate = np.zeros(n)
    need = data.needed_rate_bps
    for channel in range(m):
        short = (rate < need * (1 + SCORE_RTOL)) | (rate <= 0)
        pool = np.nonzero(short)[0] if short.any() else np.arange(n)
        device = int(pool[np.argmax(data.gain[pool, channel])])
        held[device, channel] = 1
        rate[device] = _one_rate_bps(data, device, held[device])
    return held


def _best_exchange(data: MatchingData, held: np.ndarray, score: _Score) -> tuple[str, int, int] | None:
    """The most improving move (channel, target; target N = the free pool) or swap (channel, channel)."""
    n, m = held.shape
    count = held.sum(axis=1)
    owner = np.where(held.any(axis=0), held.argmax(axis=0), -1)
    rate = device_rates_bps(data, held)
    now, less, more = (channel_rates_bps(data, c) for c in (count, count - 1, count + 1))
    r_less = (less * held).sum(axis=1)
    r_more = (more * held).sum(axis=1)
    o = np.maximum(owner, 0)
    loser_rate = np.where(owner >= 0, r_less[o] - less[o, np.arange(m)], 0.0)  # (M,)
    # moves: channel c to device j (j = n: free pool)
    targets = np.arange(n + 1)
    gain_rate = np.concatenate([r_more[:, None] + more, np.zeros((1, m))]).T  # (M, N + 1)
    mu = np.broadcast_to(owner[:, None], (m, n + 1))
    mv = np.where(targets < n, targets, -1)[None, :].repeat(m, axis=0)
    valid_move = mv != mu
    ms, mo = score.pair(mu, np.broadcast_to(loser_rate[:, None], (m, n + 1)), mv, gain_rate)
    # swaps: channel a (owner u) and channel b (owner v), both devices, u != v
    cross = now[o] - now[o, np.arange(m)][:, None]  # (M, M): owner of a, b for a
    su_rate = rate[o][:, None] + cross
    su, sv = np.broadcast_to(owner[:, None], (m, m)), np.broadcast_to(owner[None, :], (m, m))
    valid_swap = (su >= 0) & (sv >= 0) & (su != sv) & np.triu(np.ones((m, m), dtype=bool), 1)
    ss, so = score.pair(su, su_rate, sv, su_rate.T)
    candidates = [
        ("move", np.where(valid_move & score.improves(ms, mo), ms, np.inf), mo),
        ("swap", np.where(valid_swap & score.improves(ss, so), ss, np.inf), so),
    ]
    best = None
    for kind, short, objective in candidates:
        flat = np.lexsort((objective.ravel(), short.ravel()))[0]
        key = (short.ravel()[flat], objective.ravel()[flat])
        if np.isfinite(key[0]) and (best is None or key < best[0]):
            best = (key, kind, *np.unravel_index(flat, short.shape))
    return None if best is None else (best[1], int(best[2]), int(best[3]))


def swap_matching(data: MatchingData, held: np.ndarray) -> Matching:
    """Apply the best improving swap or move until none is left (or the exchange cap is reached)."""
    held = np.array(held, dtype=np.int64)
    n, m = held.shape
    cap = MAX_EXCHANGES_PER_SUBCHANNEL * m
    for exchanges in range(cap + 1):
        score = _Score(data, device_rates_bps(data, held))
        best = _best_exchange(data, held, score)
        if best is None:
            return Matching(held, exchanges, True, score.shortfall)
        kind, a, b = best
        owner_a = int(held[:, a].argmax()) if held[:, a].any() else -1
        if kind == "move":
            if owner_a >= 0:
                held[owner_a, a] = 0
            if b < n:
                held[b, a] = 1
        else:
            owner_b = int(held[:, b].argmax())
            held[owner_a, a], held[owner_b, b] = 0, 0
            held[owner_a, b], held[owner_b, a] = 1, 1
    return Matching(held, cap, False, _Score(data, device_rates_bps(data, held)).shortfall)
