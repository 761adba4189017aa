"""``sflam server``: the long-running trainer daemon (docs/server.md, docs/architecture.md).

Every round: wait until enough devices are online, select K of them (seeded), allocate, publish
the global device weights and the plan (retained), serve every activation batch on a worker
thread (the MQTT network loop runs on its own thread and is never blocked by training), collect
the round updates, fail the devices that miss the deadline or go offline, apply the
minimum-completion policy, aggregate, evaluate, checkpoint, and write a metrics line.

Plan rounds (the envelope's ``round`` on the wire) are unique per attempt and never reused, even
across a restart (``issued.json``); the training round advances only when a round counts. A
device that already tried plan round r therefore joins the retry r' > r like any new round.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edge_runtime import protocol as p
from edge_runtime.data import Preprocess, preprocess
from edge_runtime.mqtt import LinkConfig, MqttLink, TransportError, read_password_file
from server_runtime.aggregate import broadcast_weights
from server_runtime.auto_allocation import AutoAllocation, DeviceCalibration
from server_runtime.budgets import server_reassembler
from server_runtime.checkpoint import create_model
from server_runtime.config import RunConfig
from server_runtime.coordinator import DeviceRegistry, DeviceRound, FixedAllocation, RoundState, select_devices
from server_runtime.dashboard import start_dashboard
from server_runtime.data import ImageSet, load_dataset
from server_runtime.metrics import MetricsLog, PrometheusExporter
from server_runtime.presets import TOKEN_LAYOUT
from server_runtime.rank_coordinator import RankCoordinator
from server_runtime.rank_worker import batch_steps, rank_device
from server_runtime.ranks import RankGroup, RankLaunch, config_digest
from server_runtime.retained import Lease, RetainedPublisher
from server_runtime.round_record import AllocatorSummary, PhaseTimes, RoundRecord
from server_runtime.run_state import RunState, capture_rng, load_run_state, restore_rng, save_run_state
from server_runtime.signing import load_signing
from server_runtime.steps import StepServer, receive
from server_runtime.trainer import OptimizerSpec, SplitTrainer, StepError, use_bf16

log = logging.getLogger(__name__)
DEADLINE_GRACE_S = 2.0  # devices count the deadline from when they receive the plan
IDENTITY_KEYS = ("model", "training.mode")  # what a resumed run must share with its checkpoint


class DaemonError(RuntimeError):
    """The daemon cannot start or go on (no devices in time, checkpoint clash, broker gone)."""


@dataclass(frozen=True)
class RunSummary:
    """How a run ended."""

    rounds: int
    plan_rounds: int
    accuracy: float | None
    counters: dict[str, int]


class ServerDaemon:
    """One run: broker link, coordinator, trainer, checkpoints and metrics."""

    def __init__(self, config: RunConfig, *, resume: bool = False,
                 on_round: Callable[[RoundRecord], None] | None = None, launch: RankLaunch | None = None,
                 dashboard_token: str | None = None) -> None:
        self.config, self.on_round = config, on_round
        cfg = config
        self.signing = load_signing(cfg)  # first: a key that cannot be used stops the run before any work
        self.topics = p.Topics(cfg.broker.run_id)
        self.receiver = p.Receiver(cfg.broker.run_id, reassembler=server_reassembler(cfg), keys=self.signing.keys)
        self.registry = DeviceRegistry()
        self.counters: Counter[str] = Counter()
        split = load_dataset(cfg.data.eval, seed=cfg.seed, validation_fraction=cfg.data.validation_fraction)
        self.eval_set, self.validation_set = split.test, split.validation
        self.classes_digest = p.classes_digest(self.eval_set.class_names)  # devices check their labels against it
        device = rank_device(cfg.compute.device, launch.local_rank if launch is not None else 0)
        model = create_model(cfg.model.preset, checkpoint=cfg.model.checkpoint, num_classes=self.eval_set.num_classes,
                             layout=cfg.model.layout, seed=cfg.seed)
        spec = OptimizerSpec(cfg.training.optimizer, cfg.training.lr, cfg.training.momentum, cfg.training.weight_decay)
        self.trainer = SplitTrainer(model, cfg.training.mode, spec, device, use_bf16(cfg.compute.amp, device))
        self.auto = AutoAllocation(cfg, model.config) if cfg.quant.bits == "auto" else None
        self.allocation = self.auto or FixedAllocation(int(cfg.quant.bits), cfg.quant.gradient_bits,
                                                       cfg.quant.per_token, cfg.round.total_bandwidth_hz)
        self.round, self.plan_round, self.last_accuracy = 0, 0, None
        self._gathered = False  # the first round's quorum (training.min_devices) was met
        last_record = self._restore(resume)
        self.metrics = MetricsLog(cfg.metrics_path, resume_after=self.plan_round if resume else None,
                                  last_record=last_record.to_dict() if last_record is not None else None)
        self.dashboard = start_dashboard(cfg, dashboard_token, resume=resume)  # None unless metrics.dashboard_port
        self.lease = Lease.read(cfg.checkpoint_dir)
        self.plan_round = max(self.plan_round, self.lease.plan_round)  # never reuse an issued plan round
        self.current: RoundState | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ranks = self._start_ranks(launch, device)
        self.assignment: dict[str, int] = {}  # device -> trainer rank, this round
        self._deferred: list[tuple[str, p.RoundUpdate]] = []  # updates of other ranks' devices, for the allocator
        self.link = self._make_link()
        self.steps = StepServer(self.trainer, self.link, self.topics, seed=cfg.seed, workers=cfg.compute.workers,
                                batch=batch_steps(cfg.compute.batch_steps, device), lock=self._lock,
                                counters=self.counters, on_refused=lambda state, d, reason: state.fail(d, reason),
                                signer=self.signing.key)
        self.publisher = RetainedPublisher(self.link, self.topics, cfg.broker.max_frame_bytes, self.lease,
                                           cfg.checkpoint_dir, signer=self.signing.key)
        self.prometheus = (PrometheusExporter(cfg.metrics.prometheus_port, cfg.metrics.prometheus_addr)
                           if cfg.metrics.prometheus_port else None)

    # -- setup -----------------------------------------------------------------------------------

    def _restore(self, resume: bool) -> RoundRecord | None:
        """Load the checkpoint when resuming; refuse to overwrite a run otherwise."""
        state = load_run_state(self.config.checkpoint_dir)
        if state is None:
            if resume:
                log.warning("--resume: no checkpoint in %s; starting the run from round 0", self.config.checkpoint_dir)
            return None
        if not resume:
            raise DaemonError(f"{self.config.checkpoint_dir} already holds a run at round {state.round}; "
                              "pass --resume to continue it, or set another checkpoint.dir")
        self._check_identity(state.config)
        saved, layout = state.extra.get("layout", TOKEN_LAYOUT), self.trainer.model.config.layout
        if saved != layout:
            raise DaemonError(f"cannot resume: the model's layout was {saved} in the checkpoint, {layout} now "
                              "(model.checkpoint or its layout keys changed)")
        self.trainer.load(state.model, state.optimizer)
        if state.rng:
            restore_rng(state.rng)
        self.round, self.plan_round = state.round, state.plan_round
        if self.auto is not None:
            self.auto.calibration = {d: DeviceCalibration(**c) for d, c in state.extra.get("calibration", {}).items()}
            self.auto.server_times.extend(float(t) for t in state.extra.get("server_times", []))
        self.last_accuracy = state.record.accuracy if state.record is not None else None
        log.info("resuming after round %d (plan round %d)", state.round, state.plan_round)
        return state.record

    def _check_identity(self, saved: dict) -> None:
        now = self.config.to_dict()
        for key in IDENTITY_KEYS:
            section, _, name = key.partition(".")
            old, new = saved.get(section, {}), now.get(section, {})
            if name:
                old, new = old.get(name), new.get(name)
            if old != new:
                raise DaemonError(f"cannot resume: {key} was {old!r} in the checkpoint, the config says {new!r}")

    def _start_ranks(self, launch: RankLaunch | None, device) -> RankCoordinator | None:
        """With several trainer ranks: join them and hand them the global model."""
        if launch is None or launch.world_size == 1:
            return None
        group = RankGroup(launch, "nccl" if device.type == "cuda" else "gloo")
        ranks = RankCoordinator(group, self.config)
        if self.config.training.mode != "v1":
            log.warning("SFL-%s's shared server part is sequential: it trains on rank 0 and the other %d trainer "
                        "rank(s) idle", self.config.training.mode.upper(), launch.world_size - 1)
        ranks.start(self.trainer, self.eval_set.num_classes, config_digest(self.config.to_dict()))
        return ranks

    def _make_link(self) -> MqttLink:
        b = self.config.broker
        password = read_password_file(b.password_file) if b.password_file else None
        return MqttLink(b.url, LinkConfig(
            client_id=f"sflam-{b.run_id}-server", ca_file=b.ca_file, username=b.username, password=password,
            max_frame_bytes=b.max_frame_bytes, insecure_plaintext=b.insecure_plaintext, reconnect_max_s=5.0,
        ))

    # -- the run ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to end after the current round (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> RunSummary:
        """Train until ``training.rounds`` rounds have counted (or :meth:`stop`)."""
        self.link.subscribe([self.topics.all_devices("up"), self.topics.all_devices("status")])
        try:
            self.link.start(timeout_s=30.0)
        except TransportError as exc:
            raise DaemonError(f"cannot reach the broker at {self.config.broker.url}: {exc}") from None
        try:
            while self.round < self.config.training.rounds and not self._stop.is_set():
                self.run_round()
            if self.round >= self.config.training.rounds:
                self.publisher.clear("plan")
        finally:
            self.close()
        return RunSummary(self.round, self.plan_round, self.last_accuracy, dict(self.all_counters()))

    def close(self) -> None:
        """Stop workers, the other trainer ranks, the metrics endpoint and the broker link."""
        self.steps.close()
        if self.ranks is not None:
            self.ranks.stop()
        if self.prometheus is not None:
            self.prometheus.close()
        if self.dashboard is not None:
            self.dashboard.close()
        self.metrics.close()
        self.link.close()

    def all_counters(self) -> Counter[str]:
        """The daemon's counters, the receiver's, its reassembler's and the link inbox's, merged."""
        merged = Counter(self.counters)
        merged.update({f"receiver.{k}": v for k, v in self.receiver.counters.items()})
        merged.update({f"reassembler.{k}": v for k, v in self.receiver.reassembler.counters.items()})
        merged.update({f"inbox.{k}": v for k, v in self.link.inbox.counters.items()})
        return merged

    def run_round(self) -> RoundRecord:
        """One attempt at the next training round; returns its metrics record."""
        cfg, t0 = self.config, time.monotonic()
        online = self.wait_for_devices()
        phases = {"wait_devices": time.monotonic() - t0}
        plan_round = self.plan_round + 1
        self.publisher.issue(plan_round)
        self.plan_round = plan_round
        selected = select_devices(online, cfg.training.devices_per_round, cfg.seed, plan_round)
        allocations = self.allocation.allocate(selected, self.registry)
        lr = cfg.training.lr_at(self.round + 1)
        self.assignment = self._assign(selected)
        self.trainer.begin_round([d for d in selected if self.assignment[d] == 0], lr)
        deadline = time.monotonic() + cfg.round.deadline_s + DEADLINE_GRACE_S
        state = RoundState(self.round + 1, plan_round, {a.device_id: DeviceRound(a) for a in allocations}, deadline, lr)
        self.receiver.min_round = plan_round
        with self._lock:
            self.current, self.steps.replies, self._deferred = state, {}, []
        if self.ranks is not None:
            self.ranks.begin(state)
        t1 = time.monotonic()
        broadcast = self._publish_round(state, allocations)
        self._serve(state)
        phases["train"] = time.monotonic() - t1
        record = self._conclude(state, phases, broadcast, t0)
        return record

    def _assign(self, selected: tuple[str, ...]) -> dict[str, int]:
        """Device -> trainer rank; the predicted load of a device is its steps this round."""
        if self.ranks is None:
            return {d: 0 for d in selected}
        training = self.config.training
        loads = {d: training.local_epochs * max(1, -(-self.registry.devices[d].num_samples // training.batch_size))
                 for d in selected}
        return self.ranks.assign(selected, loads)

    def devices_needed(self) -> int:
        """Devices that must be online before the next round starts: ``min_devices`` (default
        ``devices_per_round``) before this process's first round, a quorum to start on; after
        that at most ``devices_per_round``, so a fleet that lost devices (a host, a region) goes
        on with the survivors instead of waiting for devices that are gone."""
        training = self.config.training
        quorum = training.min_devices or training.devices_per_round
        return quorum if not self._gathered else min(quorum, training.devices_per_round)

    def wait_for_devices(self) -> list[str]:
        """Pump messages until ``devices_needed()`` are online; DaemonError after ``wait_for_devices_s``."""
        cfg = self.config
        need = self.devices_needed()
        deadline, next_note = time.monotonic() + cfg.round.wait_for_devices_s, 0.0
        while True:
            online = self.registry.online()
            if len(online) >= need:
                self._gathered = True
                return online
            now = time.monotonic()
            if self._stop.is_set():
                raise DaemonError("stopped while waiting for devices")
            if now > deadline:
                raise DaemonError(f"only {len(online)} of the {need} devices needed came online within "
                                  f"{cfg.round.wait_for_devices_s:g} s (online: {', '.join(online) or 'none'})")
            if now >= next_note:
                log.info("waiting for devices: %d/%d online", len(online), need)
                next_note = now + 10.0
            self.pump(0.2)

    def _publish_round(self, state: RoundState, allocations: tuple[p.Allocation, ...]) -> int:
        cfg = self.config
        env = p.Envelope(cfg.broker.run_id, state.plan_round, p.SERVER_ID)
        weights = broadcast_weights(self.trainer.device_weights(), cfg.quant.model_bits)
        model = p.ModelWeights(env, state.plan_round, p.weights_from_numpy(weights))
        training = cfg.training
        plan = p.RoundPlan(env, state.plan_round, cfg.round.deadline_s, training.local_epochs, training.batch_size,
                           state.lr, allocations, training.optimizer, training.momentum, training.weight_decay,
                           num_classes=self.eval_set.num_classes, classes_digest=self.classes_digest,
                           crop_padding=cfg.data.augment_crop_padding, hflip=cfg.data.augment_hflip)
        sent = self.publisher.publish("model", model)
        sent += self.publisher.publish("plan", plan)
        log.info("round %d (plan round %d): %s", state.round, state.plan_round, ", ".join(state.devices))
        return sent

    def _serve(self, state: RoundState) -> None:
        """Pump messages until every selected device finished or failed."""
        while True:
            with self._lock:
                state.expire(time.monotonic(), self.config.round.offline_grace_s)
                if self.ranks is not None:
                    self.ranks.poll(state, self.counters.update)
                if state.done:
                    break
            self.pump(0.05)
        self.steps.wait()

    # -- receiving -------------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> None:
        """Handle at most one incoming publish."""
        if self.dashboard is not None and self.dashboard.view.due():
            self.dashboard.view.refresh(self.registry, self.current, round=self.round, plan_round=self.plan_round,
                                        needed=self.devices_needed())
        message = receive(self.link, self.receiver, self.steps, timeout_s, self._count_bytes)
        if message is not None:
            self._dispatch(message)
        elif self.receiver.last_duplicate is not None:
            self._repeated(self.receiver.last_duplicate)

    def _repeated(self, envelope: p.Envelope) -> None:
        """A message the device sent again (a step after a lost reply or a reconnect): the round's
        record counts it for the device (it is answered, never trained twice)."""
        with self._lock:
            state = self.current
            if state is not None and envelope.round == state.plan_round and envelope.device_id in state.devices:
                state.devices[envelope.device_id].repeated += 1

    def _count_bytes(self, incoming) -> None:
        try:
            ref = self.topics.parse(incoming.topic)
        except p.ProtocolError:
            return
        with self._lock:
            state = self.current
            if state is not None and ref.kind == "up" and ref.device_id in state.devices:
                state.devices[ref.device_id].bytes_up += len(incoming.payload)

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Hello):
            self.registry.on_hello(message)
            self._presence(message.envelope.device_id, online=True)
        elif isinstance(message, p.Status):
            info = self.registry.on_status(message)
            self._presence(info.device_id, info.online, message.reason or "no reason")
        elif isinstance(message, p.Activations):
            self._on_activations(message)
        elif isinstance(message, p.RoundUpdate):
            self._on_update(message)
        elif isinstance(message, p.ErrorReport):
            self.counters[f"device_errors.{message.code}"] += 1
            log.warning("device %s reported %s: %s", message.envelope.device_id, message.code, message.detail)
            if message.code == "data_mismatch":
                log.error("the run's classes: %s", ", ".join(f"{i}={n}" for i, n in enumerate(self.eval_set.class_names)))

    def _presence(self, device_id: str, online: bool, reason: str = "") -> None:
        """A selected device that goes offline fails unless it is back within round.offline_grace_s."""
        with self._lock:
            if self.current is None:
                return
            if online:
                self.current.came_online(device_id)
            else:
                self.current.went_offline(device_id, reason, time.monotonic())

    def _round_member(self, message: p.Message, what: str) -> DeviceRound | None:
        """The sender's DeviceRound when ``message`` belongs to the round in flight, else None (counted)."""
        env, state = message.envelope, self.current
        member = None
        if state is not None and env.round == state.plan_round:
            member = state.devices.get(env.device_id)
        if member is None or member.finished:
            self.counters[f"unexpected.{what}"] += 1
            self.steps.report(env.device_id, env.round, "not_in_round",
                              f"{what} for plan round {env.round}: this device is not training in the round in flight")
            return None
        return member

    def _on_activations(self, message: p.Activations) -> None:
        self.registry.seen(message.envelope.device_id)
        with self._lock:
            member = self._round_member(message, "activations")
            if member is None:
                return
            if self.auto is not None:
                self.auto.observe_activations(message.envelope.device_id, message.tensor)
            if self.assignment.get(message.envelope.device_id, 0) == 0:  # else another rank serves it
                self.steps.submit(self.current, message, member)

    def _on_update(self, message: p.RoundUpdate) -> None:
        env = message.envelope
        with self._lock:
            member = self._round_member(message, "round_updates")
            if member is None:
                return
            problem = self._update_problem(message)
            if problem is not None:
                self.counters["rejected.round_updates"] += 1
                self.current.fail(env.device_id, f"bad update: {problem}")
            else:
                member.update = message
                self.registry.on_update(message)
                if self.assignment.get(env.device_id, 0) == 0:
                    self._observe(env.device_id, message, member)
                else:  # its server time arrives with its rank's statistics at the round's end
                    self._deferred.append((env.device_id, message))
        if problem is not None:
            self.steps.report(env.device_id, env.round, "bad_update", problem)

    def _observe(self, device_id: str, update: p.RoundUpdate, member: DeviceRound) -> None:
        """Calibrate the allocator from a device's round (``quant.bits = "auto"``)."""
        if self.auto is not None:
            self.auto.observe_round(device_id, self.registry.devices[device_id].profile, update,
                                    member.allocation, member.server_time_s)

    def _update_problem(self, message: p.RoundUpdate) -> str | None:
        if message.model_version != self.current.plan_round:
            return f"trained model version {message.model_version}, the round's is {self.current.plan_round}"
        if message.num_samples < 1:
            return f"num_samples must be >= 1, got {message.num_samples}"
        try:
            self.trainer.check_device_weights(p.weights_to_numpy(message.weights))
        except StepError as exc:
            return str(exc)
        return None

    # -- round end -------------------------------------------------------------------------------

    def _conclude(self, state: RoundState, phases: dict[str, float], broadcast: int, t0: float) -> RoundRecord:
        cfg = self.config
        with self._lock:
            self.current = None
        t = time.monotonic()
        if self.ranks is None:
            completed = state.completed()
            counted = state.counts(cfg.round.min_completed)
            train_loss = self.trainer.train_loss(completed or sorted(state.devices))
            if counted:
                self.trainer.finish_round(state.uploads())
        else:
            counted, train_loss = self._conclude_ranks(state)
            completed = state.completed()
        if counted:
            self.round += 1
        else:
            log.warning("round %d does not count: %d of %d devices completed", state.round, len(completed),
                        len(state.devices))
            self.trainer.abort_round()
        phases["aggregate"] = time.monotonic() - t
        accuracy = test_loss = validation = None
        t = time.monotonic()
        if counted and (self.round % cfg.data.eval_every == 0 or self.round == cfg.training.rounds):
            accuracy, test_loss = self.trainer.evaluate(self._eval_batches(self.eval_set))
            self.last_accuracy = accuracy
            if self.validation_set is not None:
                validation, _ = self.trainer.evaluate(self._eval_batches(self.validation_set))
        phases["evaluate"] = time.monotonic() - t
        record = self._record(state, counted, (accuracy, test_loss, train_loss, validation), phases, broadcast, t0)
        t = time.monotonic()
        save_run_state(cfg.checkpoint_dir, RunState(
            self.round, self.plan_round, self.trainer.state_dict(), self.trainer.optimizer_state(),
            capture_rng(), record, cfg.to_dict(), self._extra_state()), keep=cfg.checkpoint.keep)
        record = dataclasses.replace(record, phases_s=dataclasses.replace(
            record.phases_s, checkpoint=time.monotonic() - t))
        self.metrics.write(record.to_dict())
        if self.prometheus is not None:
            self.prometheus.observe_round(record)
            self.prometheus.set_online(len(self.registry.online()))
            self.prometheus.set_counters(self.all_counters())
        if self.dashboard is not None:
            self.dashboard.view.add_round(record)
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _conclude_ranks(self, state: RoundState) -> tuple[bool, float | None]:
        """The round's end on every trainer rank: their statistics into the record, FedAvg through
        the reduce; returns (counted, train loss). A rank lost on the way fails its devices first."""
        cfg = self.config
        losses = {d: list(c.losses) for d, c in self.trainer.copies.items()} if cfg.training.mode == "v1" else {}
        shared_loss = self.trainer.train_loss(sorted(state.devices)) if cfg.training.mode != "v1" else None
        stats = self.ranks.end(state, lambda: state.counts(cfg.round.min_completed),
                               lambda reduce: self.trainer.finish_round(state.uploads(), reduce=reduce),
                               self.trainer.abort_round)
        for device_id, figures in stats.items():
            member = state.devices[device_id]
            member.steps, member.server_time_s = figures["steps"], figures["server_time_s"]
            member.bytes_down, member.downlink_time_s = figures["bytes_down"], figures["downlink_time_s"]
            losses[device_id] = figures["losses"]
        for device_id, update in self._deferred:
            if state.devices[device_id].update is not None:
                self._observe(device_id, update, state.devices[device_id])
        completed = state.completed()
        if shared_loss is not None:
            return state.counts(cfg.round.min_completed), shared_loss
        kept = [x for d in (completed or sorted(state.devices)) for x in losses.get(d, [])]
        return state.counts(cfg.round.min_completed), (float(np.mean(kept)) if kept else None)

    def _extra_state(self) -> dict:
        """What else a resumed run needs: the model's pooling layout, the allocator's per-device
        calibration and server times."""
        extra: dict = {"layout": self.trainer.model.config.layout}
        if self.auto is not None:
            extra |= {"calibration": {d: dataclasses.asdict(c) for d, c in self.auto.calibration.items()},
                      "server_times": list(self.auto.server_times)}
        return extra

    def _eval_batches(self, data: ImageSet) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``data`` (the test or validation set), preprocessed batch by batch exactly as devices
        preprocess theirs."""
        cfg = self.trainer.model.config
        spec = Preprocess(cfg.img_size, tuple(cfg.mean), tuple(cfg.std))
        size = self.config.data.eval_batch_size
        for start in range(0, len(data), size):
            yield preprocess(data.images[start:start + size], spec), data.labels[start:start + size]

    def _record(self, state: RoundState, counted: bool, figures: tuple[float | None, ...],
                phases: dict[str, float], broadcast: int, t0: float) -> RoundRecord:
        """The round's metrics record, all but the checkpoint's time (it goes into the checkpoint);
        ``figures``: test accuracy, test loss, train loss and validation accuracy (None: not evaluated)."""
        accuracy, test_loss, train_loss, validation = figures
        completed = state.completed()
        summary = self.auto.summary() if self.auto is not None else None
        return RoundRecord(
            event="round", round=state.round, plan_round=state.plan_round, counted=counted,
            mode=self.config.training.mode, time=time.time(), selected=tuple(sorted(state.devices)),
            completed=tuple(completed), failed=state.failures(), accuracy=accuracy, test_loss=test_loss,
            train_loss=train_loss, validation_accuracy=validation, samples=sum(state.devices[d].update.num_samples for d in completed),
            duration_s=time.monotonic() - t0, phases_s=PhaseTimes(**phases), bytes_broadcast=broadcast,
            devices={d: member.record(self.assignment.get(d, 0)) for d, member in state.devices.items()},
            counters=dict(self.all_counters()),
            allocator=AllocatorSummary.from_dict(summary) if summary is not None else None,
        )

