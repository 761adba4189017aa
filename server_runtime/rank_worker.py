"""A trainer rank other than 0 (docs/server.md, "Trainer ranks"): it trains the devices rank 0
assigns to it, round by round, and joins the round-end FedAvg reduce.

Per round it subscribes to its devices' ``up`` topics (acknowledged before rank 0 publishes the
plan), serves their activation steps through the same :class:`StepServer` as rank 0, reports
refused batches and per-device statistics to the control store, and unsubscribes at the end.
Started by ``sflam server`` (a rank > 0 of a launch) or as ``python -m server_runtime.rank_worker``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from collections import Counter

from edge_runtime import protocol as p
from edge_runtime.mqtt import LinkConfig, MqttLink, TransportError, read_password_file
from server_runtime.budgets import server_reassembler
from server_runtime.checkpoint import create_model
from server_runtime.config import ConfigError, RunConfig, load_config
from server_runtime.coordinator import DeviceRound, RoundState
from server_runtime.ranks import Heartbeat, RankError, RankGroup, RankLaunch, config_digest, tensor_shapes
from server_runtime.signing import load_signing
from server_runtime.steps import StepServer, receive
from server_runtime.trainer import OptimizerSpec, SplitTrainer, pick_device, use_bf16

log = logging.getLogger(__name__)
SUBSCRIBE_TIMEOUT_S = 30.0
CONTROL_POLL_S = 0.02  # how often a worker looks for rank 0's next control record


def rank_device(name: str, local_rank: int):
    """The rank's compute device: ``auto`` and ``cuda`` pick GPU ``LOCAL_RANK`` when there is one."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        import torch

        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def batch_steps(setting: str, device) -> bool:
    """``compute.batch_steps``: ``auto`` batches on CUDA, where fewer and larger kernels pay."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def rank_model(config: RunConfig, start: dict):
    """The model rank 0 trains, built from its start message: rank 0's class count and pooling
    layout (its checkpoint's, which this rank does not read: the weights come from rank 0).
    RankError when it cannot be built or its tensors differ from rank 0's (another sflam?), so
    the run stops at once instead of in the first weight sync."""
    try:
        model = create_model(config.model.preset, num_classes=int(start["num_classes"]), layout=start["layout"],
                             seed=config.seed)
    except ValueError as exc:  # PresetError, CheckpointError: a layout this sflam cannot build
        raise RankError(f"cannot build rank 0's model: {exc}") from None
    mine, theirs = tensor_shapes(model), start.get("shapes", {})
    differ = sorted(set(mine) ^ set(theirs) | {k for k in set(mine) & set(theirs) if mine[k] != theirs[k]})
    if differ:
        raise RankError(f"its model differs from rank 0's in {', '.join(differ[:6])}"
                        f"{f' and {len(differ) - 6} more' if len(differ) > 6 else ''} (another sflam version?)")
    return model


class TrainerRank:
    """One worker rank for a whole run."""

    def __init__(self, config: RunConfig, launch: RankLaunch) -> None:
        self.config, self.launch, self.rank = config, launch, launch.rank
        self.signing = load_signing(config)
        self.device = rank_device(config.compute.device, launch.local_rank)
        self.group = RankGroup(launch, "nccl" if self.device.type == "cuda" else "gloo")
        self.heartbeat = Heartbeat(launch)
        self.topics = p.Topics(config.broker.run_id)
        self.receiver = p.Receiver(config.broker.run_id, reassembler=server_reassembler(config),
                                   keys=self.signing.keys)
        self.counters: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.seq, self.state = 0, None
        self.link: MqttLink | None = None
        start = self.next_control()
        try:
            problem = self._check_start(start)
            model = None if problem else rank_model(config, start)
        except RankError as exc:
            problem, model = str(exc), None
        self.group.set(f"ack/{start['seq']}/{self.rank}", {"problem": problem})
        if problem:
            raise RankError(problem)
        cfg = config
        spec = OptimizerSpec(cfg.training.optimizer, cfg.training.lr, cfg.training.momentum, cfg.training.weight_decay)
        self.trainer = SplitTrainer(model, cfg.training.mode, spec, self.device, use_bf16(cfg.compute.amp, self.device))
        self.trainer.sync(self.group.reduce_sum, coordinator=False)
        self.link = self._make_link()
        self.steps = StepServer(self.trainer, self.link, self.topics, seed=cfg.seed, workers=cfg.compute.workers,
                                batch=batch_steps(cfg.compute.batch_steps, self.device), lock=self.lock,
                                counters=self.counters, on_refused=self._refused, signer=self.signing.key)

    def _check_start(self, start: dict) -> str:
        if start.get("op") != "start":
            return f"expected the run's start from rank 0, got {start.get('op')!r}"
        if start.get("digest") != config_digest(self.config.to_dict()):
            return ("its run.toml differs from rank 0's in seed, [model], [training] or [quant]; "
                    "every rank must run the same configuration")
        return ""

    def _make_link(self) -> MqttLink:
        b = self.config.broker
        password = read_password_file(b.password_file) if b.password_file else None
        return MqttLink(b.url, LinkConfig(
            client_id=f"sflam-{b.run_id}-server-r{self.rank}", ca_file=b.ca_file, username=b.username,
            password=password, max_frame_bytes=b.max_frame_bytes, insecure_plaintext=b.insecure_plaintext, reconnect_max_s=5.0))

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve rounds until rank 0 says stop; RankError when rank 0 is gone."""
        try:
            self.link.start(timeout_s=30.0)
        except TransportError as exc:
            raise RankError(f"rank {self.rank} cannot reach the broker at {self.config.broker.url}: {exc}") from None
        log.info("trainer rank %d of %d ready", self.rank, self.launch.world_size)
        try:
            while True:
                control = self.next_control()
                if control["op"] == "round":
                    self._begin(control)
                elif control["op"] == "end":
                    self._end(control)
                elif control["op"] == "stop":
                    self.group.set(f"ack/{control['seq']}/{self.rank}", {})
                    return
        finally:
            self.close()

    def next_control(self) -> dict:
        """The next control record, serving MQTT meanwhile; RankError when rank 0 stopped answering."""
        key, next_check = f"ctl/{self.seq + 1}", 0.0
        while True:
            control, now = None, time.monotonic()
            if now >= next_check:  # one store round trip per CONTROL_POLL_S, not per message served
                next_check = now + CONTROL_POLL_S
                try:
                    control = self.group.get(key)
                except (RuntimeError, OSError):
                    self.heartbeat.lost.set()
            if control is not None:
                self.seq += 1
                return control
            if self.heartbeat.lost.is_set():
                raise RankError("rank 0 (the coordinator) is gone: the run stopped. Restart every rank with "
                                "--resume to continue from the last checkpoint")
            self.pump(0.02)

    def pump(self, timeout_s: float) -> None:
        """Serve at most one incoming publish (activations of this rank's devices)."""
        if self.link is None:
            threading.Event().wait(timeout_s)
            return
        message = receive(self.link, self.receiver, self.steps, timeout_s)
        if isinstance(message, p.Activations):
            env = message.envelope
            with self.lock:
                state = self.state
                member = state.devices.get(env.device_id) if state is not None and env.round == state.plan_round else None
                if member is not None:
                    self.steps.submit(state, message, member)

    def _begin(self, control: dict) -> None:
        mine = {d: info["allocation"] for d, info in control["devices"].items() if info["rank"] == self.rank}
        members = {d: DeviceRound(p.Allocation(d, **a)) for d, a in mine.items()}
        self.trainer.begin_round(sorted(mine), control["lr"])
        with self.lock:
            self.state = RoundState(control["round"], control["plan_round"], members, math.inf, control["lr"])
            self.steps.replies = {}
        self.receiver.min_round = control["plan_round"]
        try:
            self.link.subscribe([self.topics.up(d) for d in sorted(mine)], timeout_s=SUBSCRIBE_TIMEOUT_S)
        except TransportError as exc:
            log.error("rank %d could not subscribe to its devices: %s", self.rank, exc)
            for device_id in mine:
                self._refused(self.state, device_id, f"trainer rank {self.rank} could not subscribe: {exc}")
        self.group.set(f"ack/{control['seq']}/{self.rank}", {})
        if mine:
            log.info("round %d (plan round %d): rank %d trains %s", control["round"], control["plan_round"],
                     self.rank, ", ".join(sorted(mine)))

    def _end(self, control: dict) -> None:
        self.steps.wait()
        state = self.state
        stats = {} if state is None else {d: _device_stats(m, self.trainer, d, self.rank) for d, m in state.devices.items()}
        self.group.set(f"stats/{control['seq']}/{self.rank}", stats)
        if control["counted"]:
            try:
                self.group.regroup(control["members"])
                self.trainer.finish_round({}, counts=control["counts"], reduce=self.group.reduce_sum, coordinator=False)
            except RuntimeError as exc:  # a rank died: rank 0 re-issues the end without it
                log.warning("rank %d: round-end reduce failed (%s); waiting for rank 0", self.rank,
                            str(exc).splitlines()[0][:200])
                return
        else:
            self.trainer.abort_round()
        if state is not None:
            self.link.unsubscribe([self.topics.up(d) for d in state.devices])
        with self.lock:
            self.state = None

    def _refused(self, state: RoundState, device_id: str, reason: str) -> None:
        """A batch this rank could not train on: rank 0 fails the device (it owns the round)."""
        self.group.append(f"r{state.plan_round}/fail", {"device": device_id, "reason": reason})

    def close(self) -> None:
        self.heartbeat.close()
        if self.link is not None:
            self.steps.close()
            self.link.close()
        self.group.close()


def _device_stats(member: DeviceRound, trainer: SplitTrainer, device_id: str, rank: int) -> dict:
    server = trainer.copies.get(device_id)
    return {"rank": rank, "steps": member.steps, "server_time_s": member.server_time_s,
            "bytes_down": member.bytes_down, "downlink_time_s": member.downlink_time_s,
            "losses": list(server.losses) if server is not None else []}


def run_worker(config: RunConfig, launch: RankLaunch) -> int:
    """Run one worker rank to the end; 0 when rank 0 said stop, 2 with a message otherwise."""
    try:
        TrainerRank(config, launch).run()
    except RankError as exc:
        print(f"sflam server (rank {launch.rank}): error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One trainer rank > 0 (launch variables in the environment).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--broker")
    parser.add_argument("--resume", action="store_true", help="accepted for symmetry with rank 0 (which restores)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, {"broker.url": args.broker} if args.broker else None)
        launch = RankLaunch.from_env()
    except (ConfigError, RankError) as exc:
        print(f"sflam server: error: {exc}", file=sys.stderr)
        return 2
    if launch is None or launch.rank == 0:
        print("sflam server: error: a worker rank needs RANK >= 1 and WORLD_SIZE in its environment", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {launch.rank} %(name)s: %(message)s")
    return run_worker(config, launch)


if __name__ == "__main__":
    sys.exit(main())
