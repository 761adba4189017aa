"""Rank 0's side of the trainer ranks: assign devices, tell the ranks, watch them, reduce.

Control records go out as ``ctl/{seq}`` in the store (server_runtime/ranks.py); each worker
acknowledges a round once it is subscribed to its devices' ``up`` topics, so the plan is
published only when every rank can hear its devices. A rank that stops beating loses its
devices for the round (they fail with a reason, even those that already uploaded: their server
copies died with the rank) and gets none in later rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from edge_runtime import protocol as p
from server_runtime.config import RunConfig
from server_runtime.coordinator import RoundState
from server_runtime.ranks import POLL_S, Liveness, RankError, RankGroup, assign_ranks, tensor_shapes
from server_runtime.trainer import SplitTrainer

log = logging.getLogger(__name__)
ACK_TIMEOUT_S = 60.0  # a live rank that has not subscribed by then is treated as lost


class RankCoordinator:
    """Rank 0's handle on ranks 1..N-1 for a whole run."""

    def __init__(self, group: RankGroup, config: RunConfig) -> None:
        self.group, self.config = group, config
        self.alive = set(group.members)
        self.liveness = Liveness(group, config.compute.rank_timeout_s)
        self.seq, self.assignment = 0, {}
        self.lost: list[int] = []
        self._fail_lines, self._next_poll = 0, 0.0

    @property
    def workers(self) -> list[int]:
        return sorted(self.alive - {0})

    def post(self, op: str, **fields: object) -> int:
        self.seq += 1
        self.group.set(f"ctl/{self.seq}", {"op": op, "seq": self.seq, "members": sorted(self.alive), **fields})
        return self.seq

    def start(self, trainer: SplitTrainer, num_classes: int, digest: str) -> None:
        """Every rank builds the model and takes rank 0's weights (also after a resume)."""
        seq = self.post("start", num_classes=num_classes, layout=trainer.model.config.layout,
                        shapes=tensor_shapes(trainer.model), digest=digest)
        for rank, ack in self._acks(seq).items():
            if ack.get("problem"):
                raise RankError(f"trainer rank {rank}: {ack['problem']}")
        trainer.sync(self.group.reduce_sum, coordinator=True)
        log.info("trainer ranks %s ready", ", ".join(map(str, sorted(self.alive))))

    def assign(self, selected: tuple[str, ...], loads: Mapping[str, float]) -> dict[str, int]:
        """Device -> rank for a round: V1 balanced by predicted load over the live ranks; V2's
        shared server part is sequential by definition and stays on rank 0."""
        if self.config.training.mode != "v1":
            self.assignment = {d: 0 for d in selected}
        else:
            self.assignment = assign_ranks({d: loads[d] for d in selected}, sorted(self.alive))
        return self.assignment

    def begin(self, state: RoundState) -> None:
        """Tell the workers their devices; return once every live worker listens on their topics."""
        devices = {d: {"rank": r, "allocation": _allocation_dict(state.devices[d].allocation)}
                   for d, r in self.assignment.items() if r != 0}
        self._fail_lines = 0
        seq = self.post("round", round=state.round, plan_round=state.plan_round, lr=state.lr, devices=devices)
        self._acks(seq, state)

    def poll(self, state: RoundState, count: Callable[[str], None]) -> None:
        """Apply what the workers reported since the last call: refused batches, lost ranks."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        lines = self.group.lines(f"r{state.plan_round}/fail")
        for entry in lines[self._fail_lines:]:
            count("rejected.activations")
            state.fail(entry["device"], entry["reason"])
        self._fail_lines = len(lines)
        for rank in self.liveness.lost():
            self._lose(rank, state)

    def _lose(self, rank: int, state: RoundState | None) -> None:
        if rank not in self.alive:
            return
        self.alive.discard(rank)
        self.lost.append(rank)
        log.error("trainer rank %d lost (no heartbeat for %g s); its devices fail this round and later rounds "
                  "use ranks %s", rank, self.config.compute.rank_timeout_s, ", ".join(map(str, sorted(self.alive))))
        if state is not None:
            for device_id, owner in self.assignment.items():
                if owner == rank:
                    state.revoke(device_id, f"trainer rank {rank} lost")

    def end(self, state: RoundState, counted: Callable[[], bool], finish: Callable[[Callable | None], None],
            abort: Callable[[], None]) -> dict[str, dict]:
        """Close the round on every rank and return the workers' per-device statistics. Counted:
        ``finish(reduce)`` aggregates through the ranks' weighted all-reduce; a rank lost on the
        way loses its devices and the reduce is redone with the others."""
        while True:
            completed = state.completed()
            is_counted = counted()
            counts = {d: state.devices[d].update.num_samples for d in completed}
            seq = self.post("end", plan_round=state.plan_round, counted=is_counted, counts=counts)
            stats = self._stats(seq, state)
            if not is_counted:
                abort()
                return stats
            try:
                self.group.regroup(sorted(self.alive))
                finish(self.group.reduce_sum)
                return stats
            except RuntimeError as exc:
                log.warning("round-end reduce failed (%s); finding the lost rank", str(exc).splitlines()[0][:200])
                self._await_loss(state)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the workers the run is over and give them ``timeout_s`` to read it before this
        process (which hosts the control store) exits; best effort."""
        try:
            seq = self.post("stop")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(self.group.get(f"ack/{seq}/{r}") is None for r in self.workers):
                time.sleep(0.02)
        except (RuntimeError, OSError) as exc:
            log.info("could not tell the trainer ranks to stop: %s", exc)

    # -- waiting on workers ------------------------------------------------------------------

    def _acks(self, seq: int, state: RoundState | None = None) -> dict[int, dict]:
        return self._collect(lambda rank: f"ack/{seq}/{rank}", state, ACK_TIMEOUT_S)

    def _stats(self, seq: int, state: RoundState) -> dict[str, dict]:
        merged: dict[str, dict] = {}
        for stats in self._collect(lambda rank: f"stats/{seq}/{rank}", state, math.inf).values():
            merged.update(stats)
        return merged

    def _collect(self, key: Callable[[int], str], state: RoundState | None, timeout_s: float) -> dict[int, dict]:
        """Each live worker's record at ``key(rank)``; a rank that dies (or misses ``timeout_s``) is lost."""
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for rank in self.workers:
                if rank not in got:
                    value = self.group.get(key(rank))
                    if value is not None:
                        got[rank] = value
            missing = [rank for rank in self.workers if rank not in got]
            if not missing:
                return {rank: got[rank] for rank in self.workers}
            for rank in self.liveness.lost() + (missing if time.monotonic() > deadline else []):
                self._lose(rank, state)
            time.sleep(0.01)

    def _await_loss(self, state: RoundState) -> None:
        """After a failed collective: wait until the heartbeats say which rank is gone."""
        deadline = time.monotonic() + 3 * self.config.compute.rank_timeout_s
        while time.monotonic() < deadline:
            lost = self.liveness.lost()
            for rank in lost:
                self._lose(rank, state)
            if lost:
                return
            time.sleep(0.1)
        raise RankError("a round-end reduce failed but every trainer rank is still beating")


def _allocation_dict(a: p.Allocation) -> dict:
    return {"bits_up": a.bits_up, "bits_down": a.bits_down, "tx_power_w": a.tx_power_w,
            "bandwidth_hz": a.bandwidth_hz, "per_token": a.per_token}
