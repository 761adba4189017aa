"""Trainer ranks with torch.distributed: launch, the control store, liveness and the FedAvg reduce.

A run with ``compute.trainers = N`` has N trainer processes (docs/server.md, "Trainer ranks").
Rank 0 is the daemon: registry, plan, allocator, aggregation, checkpoints, metrics, and a share
of the training. Every other rank trains the devices the plan assigns to it. Launch follows
torchrun's conventions (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``); without them, ``sflam server`` starts the other ranks on its own machine.

Two channels join the ranks. The *control store* (a ``TCPStore`` hosted by rank 0, or by
torchrun's agent) carries small JSON records: the round's assignment, acknowledgements, worker
failures, per-device statistics and heartbeats, so no rank ever blocks another to say something.
The *process group* (gloo on CPU, NCCL on GPU) carries tensors: the start-of-run model and the
round-end weighted FedAvg sum. Nothing received over either channel is unpickled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.5
POLL_S = 0.2  # how often rank 0 reads worker failures and heartbeats during a round
IDENTITY_SECTIONS = ("model", "training", "quant")  # what every rank's run.toml must agree on


class RankError(RuntimeError):
    """Ranks that cannot start or go on (bad launch variables, a lost coordinator, mismatched configs)."""


@dataclass(frozen=True)
class RankLaunch:
    """Where this process sits among the trainer ranks (torchrun's environment variables)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0
    agent_store: bool = False  # torchrun's agent already hosts the store on MASTER_PORT

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RankLaunch | None:
        """The launch the environment describes; None when ``WORLD_SIZE`` is unset (no launcher)."""
        if "WORLD_SIZE" not in env:
            return None
        problems, values = [], {}
        for name, low in (("RANK", 0), ("WORLD_SIZE", 1), ("MASTER_PORT", 1), ("LOCAL_RANK", 0)):
            text = env.get(name, "0" if name == "LOCAL_RANK" else "")
            if not text.strip().isdigit() or int(text) < low:
                problems.append(f"{name} must be a whole number >= {low}, got {text!r}")
            else:
                values[name] = int(text)
        if not env.get("MASTER_ADDR"):
            problems.append("MASTER_ADDR must name rank 0's host")
        if not problems and values["RANK"] >= values["WORLD_SIZE"]:
            problems.append(f"RANK {values['RANK']} is not below WORLD_SIZE {values['WORLD_SIZE']}")
        if problems:
            raise RankError("trainer rank launch: " + "; ".join(problems))
        return cls(values["RANK"], values["WORLD_SIZE"], env["MASTER_ADDR"], values["MASTER_PORT"],
                   values["LOCAL_RANK"], env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")

    def env_for(self, rank: int) -> dict[str, str]:
        """The variables that launch ``rank`` of this world on this machine."""
        return {"RANK": str(rank), "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port), "LOCAL_RANK": str(rank)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_digest(config_dict: Mapping[str, object]) -> str:
    """A digest of what every rank must share: the seed, model, training and quant sections."""
    shared = {key: config_dict.get(key) for key in ("seed", *IDENTITY_SECTIONS)}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def assign_ranks(loads: Mapping[str, float], ranks: Sequence[int]) -> dict[str, int]:
    """Each device to one rank, balancing the predicted load (largest first onto the least
    loaded rank; ties go to the lower rank and the lower device id, so the result is seeded by
    nothing but its input)."""
    if not ranks:
        raise ValueError("no trainer rank is left to assign devices to")
    total = {rank: 0.0 for rank in sorted(ranks)}
    out: dict[str, int] = {}
    for device_id in sorted(loads, key=lambda d: (-loads[d], d)):
        rank = min(total, key=lambda r: (total[r], r))
        out[device_id] = rank
        total[rank] += loads[device_id]
    return out


class RankGroup:
    """This process's handle on the other ranks: the control store and the live process group."""

    def __init__(self, launch: RankLaunch, backend: str, timeout_s: float = 60.0) -> None:
        self.launch, self.rank, self.backend = launch, launch.rank, backend
        timeout = datetime.timedelta(seconds=timeout_s)
        is_master = launch.rank == 0 and not launch.agent_store
        try:
            base = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master,
                                 timeout=timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise RankError(f"rank {launch.rank}: cannot reach the control store at "
                            f"{launch.master_addr}:{launch.master_port}: {exc}") from None
        self.store = dist.PrefixStore("sflam/", base)
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", base), rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
        self.members: tuple[int, ...] = tuple(range(launch.world_size))
        self.group = None  # the default group while every rank is alive
        self._lock = threading.Lock()  # one store connection, several threads

    # -- control store -------------------------------------------------------------------------

    def set(self, key: str, value: object) -> None:
        with self._lock:
            self.store.set(key, json.dumps(value))

    def get(self, key: str) -> object | None:
        """The JSON value at ``key``, or None when it is not set yet (never blocks)."""
        with self._lock:
            if not self.store.check([key]):
                return None
            return json.loads(self.store.get(key))

    def append(self, key: str, value: object) -> None:
        with self._lock:
            self.store.append(key, json.dumps(value) + "\n")

    def lines(self, key: str) -> list[object]:
        with self._lock:
            if not self.store.check([key]):
                return []
            text = self.store.get(key).decode()
        return [json.loads(line) for line in text.splitlines() if line]

    def counter(self, key: str) -> int:
        with self._lock:
            return int(self.store.add(key, 0))

    # -- tensors ---------------------------------------------------------------------------------

    def regroup(self, members: Sequence[int]) -> None:
        """Continue with ``members`` only (a rank was lost); every member calls this."""
        members = tuple(sorted(members))
        if members != self.members:
            self.members = members
            self.group = dist.new_group(list(members), use_local_synchronization=True)
            log.info("rank %d: trainer group is now ranks %s", self.rank, ", ".join(map(str, members)))

    def reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        """The sum of ``vector`` over the live ranks (RuntimeError when a rank is lost meanwhile)."""
        on = vector.to(f"cuda:{torch.cuda.current_device()}") if self.backend == "nccl" else vector.cpu()
        dist.all_reduce(on, group=self.group)
        return on.to(vector.device)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class Heartbeat:
    """A worker's pulse: a counter in the store, bumped every HEARTBEAT_S on its own connection."""

    def __init__(self, launch: RankLaunch) -> None:
        base = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, False,
                             timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
        self.store, self.key = dist.PrefixStore("sflam/", base), f"beat/{launch.rank}"
        self.lost = threading.Event()  # set when the store (rank 0) stopped answering
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sflam-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(self.key, 1)
            except (RuntimeError, OSError):
                self.lost.set()
                return

    def close(self) -> None:
        self._stop.set()


class Liveness:
    """Rank 0's view of the workers' heartbeats: a rank whose counter stands still for
    ``timeout_s`` (killed, frozen, partitioned) is lost."""

    def __init__(self, group: RankGroup, timeout_s: float) -> None:
        self.group, self.timeout_s = group, timeout_s
        now = time.monotonic()
        self.seen = {rank: (-1, now) for rank in group.members if rank != 0}

    def lost(self) -> list[int]:
        """Ranks that stopped beating since the last call (each reported once)."""
        now, gone = time.monotonic(), []
        for rank, (count, since) in list(self.seen.items()):
            current = self.group.counter(f"beat/{rank}")
            if current != count:
                self.seen[rank] = (current, now)
            elif now - since >= self.timeout_s:
                gone.append(rank)
                del self.seen[rank]
        return gone


def tensor_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor of ``model``'s state: what every rank's model must share."""
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def start_local_ranks(config_path: str, world_size: int, extra_args: Sequence[str]) -> tuple[RankLaunch, list[subprocess.Popen]]:
    """Ranks 1..N-1 as child processes of this one (rank 0), torchrun's ``--nproc-per-node`` way:
    the same run.toml, the launch variables in their environment, torch threads split evenly."""
    launch = RankLaunch(0, world_size, "127.0.0.1", free_port())
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    children = []
    for rank in range(1, world_size):
        command = [sys.executable, "-m", "server_runtime.rank_worker", "--config", config_path, *extra_args]
        children.append(subprocess.Popen(command, env={**env, **launch.env_for(rank)}))
        log.info("trainer rank %d started (pid %d)", rank, children[-1].pid)
    return launch, children


def stop_local_ranks(children: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """Wait for the child ranks to end (they stop on rank 0's ``stop``); kill what does not."""
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
