"""The device loop (``sflam device``): wait for a plan that selects us, train, report.

Per step: forward (embedding + stochastic quantizer) -> publish ``Activations(round, step)`` ->
wait for its ``Gradient`` -> a step of the plan's optimizer (edge_runtime.optimizer: the server's
optimizer, learning rate, momentum and weight decay). After a reconnect the current
step's activations are sent again (the server deduplicates by (device, round, step)); a gradient
is applied at most once (``applied`` set plus the Receiver's duplicate filter). Batches: the
plan's ``batch_size``; a LiteRT backend has a fixed batch (device.json) and then a ragged last
batch is dropped. ``num_samples`` is the number of distinct samples trained in an epoch.

Telemetry energy = compute + radio (docs/allocator.md, docs/profiles.md):

- compute: an energy meter (``--meter``, ``edge_runtime.energy.open_meter``) spans each round's
  training loop (forward, exchanges, train steps; the RoundUpdate publish is not inside it).
  A measured meter (RAPL, Jetson rails, Android battery) labels the round ``measured``;
  otherwise, or when the meter raises MeterError (logged), the estimate CPU seconds x kappa f^3
  of the profile is used and the round is labelled ``estimated``. Never 0.
- radio: the allocation's ``tx_power_w`` x uplink time, the round's uplink being
  ``edge_runtime.link.RoundUplink`` at r = B log2(1 + p h / (N0 B)) over the channel gain
  (``--distance-m`` path loss or ``--channel-gain``). ``--emulate-link``: every uplink frame is
  paced by a TokenBucket and the radio time is its airtime 8 n / r (re-sends included);
  ``uplink_time_s`` = publish time minus the bucket's sleeps plus the airtime. ``--shaped-link
  IFACE`` (kernel links): the device re-rates IFACE's tc filter to r each round, and the radio
  time and ``uplink_time_s`` are the airtime of what IFACE really carried. Both add the
  RoundUpdate's own 8 n / r (from its encoded size, before it is sent). Without either, the
  radio time and ``uplink_time_s`` are the measured wall time of the activation publishes (the
  RoundUpdate's own is not counted: it carries the telemetry). The publishes' wall time of each
  round (first byte to PUBACK) is also kept in ``uplink_wall_s`` with a shaped link.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime import protocol as p
from edge_runtime.bundle import SharedBundle
from edge_runtime.augment import Augment
from edge_runtime.data import DataMismatchError, Samples, check_against_plan
from edge_runtime.link import RoundUplink, ShapedUplink, ShapedUplinkError, channel_gain_from_distance
from edge_runtime.device_profile import (
    PowerModel,
    buffers_for,
    load_device_profile,
    open_compute_meter,
    weights_message_bytes,
)
from edge_runtime.mqtt import DEFAULT_MAX_FRAME_BYTES, LinkConfig, MqttLink, TransportError
from edge_runtime.mqtt_loop import LinkLoop
from edge_runtime.optimizer import DeviceOptimizer
from edge_runtime.quantize import FLOAT_BITS, QuantizedTensor, dequantize, pack_codes, quantize
from sflam_common.version import __version__

log = logging.getLogger(__name__)
SOFTWARE_VERSION = __version__  # what the device announces in its Hello
WEIGHT_NAMES = ("patch_embed.proj.weight", "patch_embed.proj.bias")
HEARTBEAT_S = 10.0  # an idle device re-sends its Hello this often
MODELS_KEPT = 2  # model versions held: the plan's and the one after it (each is the device weights' size)
DEFAULT_DISTANCE_M = 100.0  # --emulate-link without --distance-m / --channel-gain


class RoundAborted(RuntimeError):
    """A round that cannot finish (deadline passed, weights never arrived)."""


@dataclass
class RoundStats:
    """What one round measured."""

    compute_time_s: float = 0.0
    uplink_time_s: float = 0.0
    cpu_time_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0
    airtime_s: float = 0.0  # emulated link: 8 n / r over every paced uplink frame
    pace_wait_s: float = 0.0  # emulated link: how long the bucket slept
    publish_wall_s: float = 0.0  # wall time of the activation publishes (first send of each step)


@dataclass
class DeviceClient:
    """One device: bundle + backend + data + MQTT link; ``run(rounds)`` trains until done."""

    bundle: Path
    broker_url: str
    device_id: str
    data: Samples
    backend: str = "auto"
    run_id: str = "default"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    seed: int = 0
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    meter: str = "auto"  # auto | rapl | jetson | android | estimate
    emulate_link: bool = False
    channel_gain: float | None = None  # emulated or shaped link; None: path loss at DEFAULT_DISTANCE_M
    shaped_link: str | None = None  # an interface whose egress tc shapes at each allocation's rate
    keepalive_s: int = 30  # MQTT keep-alive: how soon a silent link is noticed (both ends)
    threads: int | None = None  # backend intra-op threads; None: the runtime's default
    profile: str | None = None  # hardware profile to announce and estimate energy with; None: the bundle's
    timeout_s: float = 10.0
    resend_after_s: float = 5.0  # no gradient this long: send the step again (the server deduplicates)
    counters: Counter = field(default_factory=Counter)
    last_telemetry: p.Telemetry | None = None  # the last round's, sent in every Hello
    heartbeat_s: float = HEARTBEAT_S  # an idle device's Hello interval (a large fleet spaces them out)
    shared: SharedBundle | None = None  # a device host's bundle, opened once for all its devices
    link_loop: LinkLoop | None = None  # a device host's shared network thread; None: a thread of our own
    broadcast_decode: Callable | None = None  # a device host's shared decoder of plan/model frames
    insecure_plaintext: bool = False  # --insecure-plaintext (edge_runtime.mqtt.plaintext_problem)
    signing_key: p.SigningKey | None = None  # signs every frame we send; None: unsigned (docs/security.md)
    server_keys: p.Keyring | None = None  # the server's public key: refuse any frame it did not sign

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        shared = self.shared or SharedBundle.open(self.bundle, self.backend, self.threads)
        self.manifest, self.device_json, self.engine = shared.manifest, shared.device_json, shared.engine
        self.topics = p.Topics(self.run_id)
        self.profile = self.profile or self.manifest.get("profile")
        # Buffers sized to the device's RAM, not a server's: a 512 MB board must not be allowed to
        # queue 768 MiB of received messages (docs/reliability.md, "Device-sized buffers").
        self.buffers = buffers_for(self.profile, weights_message_bytes(self.bundle, self.manifest))
        if self.signing_key is not None and self.signing_key.key_id != self.device_id:
            raise ValueError(f"the signing key is {self.signing_key.key_id!r}'s, this device is {self.device_id!r}")
        self.receiver = p.Receiver(self.run_id, reassembler=self.buffers.reassembler(),
                                   broadcast_decode=self.broadcast_decode, keys=self.server_keys)
        self.power = PowerModel.for_profile(self.profile)
        self.compute_meter = open_compute_meter(self.meter, load_device_profile(self.profile))
        if self.emulate_link and self.shaped_link:
            raise ValueError("--emulate-link and --shaped-link are two models of the same uplink: choose one")
        if (self.emulate_link or self.shaped_link) and self.channel_gain is None:
            self.channel_gain = channel_gain_from_distance(DEFAULT_DISTANCE_M)
        self.shaper = ShapedUplink(self.shaped_link) if self.shaped_link else None
        self.uplink = RoundUplink()  # this round's (edge_runtime.link)
        self.models: dict[int, dict[str, np.ndarray]] = {}
        self.plan: p.RoundPlan | None = None
        self.plan_received_at = 0.0
        self.gradients: dict[tuple[int, int], p.Gradient] = {}
        self.awaiting: tuple[int, int] | None = None  # the (round, step) whose gradient may be kept
        self.applied: set[tuple[int, int]] = set()
        self.done_rounds: set[int] = set()
        self.uplink_wall_s: dict[int, float] = {}  # shaped link: round -> wall time of its activation publishes
        self._last_hello = time.monotonic()
        self._epoch = self._hello_at = 0.0  # presence stamps (PresenceOrder): strictly increasing
        self.link = MqttLink(self.broker_url, LinkConfig(
            client_id=f"sflam-{self.run_id}-{self.device_id}", will_topic=self.topics.status(self.device_id),
            ca_file=self.ca_file, username=self.username, password=self.password,
            max_frame_bytes=self.max_frame_bytes, timeout_s=self.timeout_s, inbox=self.buffers.inbox,
            keepalive_s=self.keepalive_s, insecure_plaintext=self.insecure_plaintext,
        ), loop=self.link_loop)

    def _env(self, round_: int, step: int = 0, created_at: float | None = None) -> p.Envelope:
        if created_at is None:
            return p.Envelope(self.run_id, round_, self.device_id, step)
        return p.Envelope(self.run_id, round_, self.device_id, step, created_at)

    def _now_after(self, last: float) -> float:
        """Now, or just after ``last`` if the clock has not moved past it (stamps never repeat)."""
        return max(time.time(), last + 1e-3)

    # -- connection --------------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Connect, announce ourselves on every (re)connect, subscribe plan/model/down."""
        self.link.before_connect(self._new_connection)
        self.link.on_connect(self._announce)
        self.link.subscribe([
            self.topics.retained_filter("plan"), self.topics.retained_filter("model"), self.topics.down(self.device_id),
        ])
        self.link.start(wait=wait)

    def _new_connection(self) -> None:
        """Before each connect: a new presence epoch, and the will that goes with it (network thread).

        The connection's online Status is stamped (epoch, step 0) and its will (epoch, step 1):
        the server orders a device's Status messages by that stamp, so the will supersedes the
        online Status it was registered with, and neither can be replayed later (PresenceOrder).
        """
        self._epoch = self._now_after(self._epoch)
        will = p.Status(self._env(0, 1, self._epoch), online=False, reason="connection lost")
        self.link.set_will(p.encode(will, self.signing_key))

    def _announce(self) -> None:
        """Retained Status(online) and a Hello; runs on the network thread, so no waiting here."""
        status = p.encode(p.Status(self._env(0, 0, self._epoch), online=True, reason=""), self.signing_key)
        self.link.publish_nowait(self.topics.status(self.device_id), status, retain=True)
        self._hello(heartbeat=False)

    def _hello(self, heartbeat: bool) -> None:
        """Publish a Hello (profile, backend, samples, last telemetry) without waiting."""
        self._hello_at = self._now_after(self._hello_at)
        hello = p.Hello(self._env(0, 0, self._hello_at), str(self.profile or "unknown"), self.engine.name,
                        SOFTWARE_VERSION, len(self.data), heartbeat=heartbeat, last_telemetry=self.last_telemetry,
                        skipped_samples=self.data.skipped)
        self._last_hello = time.monotonic()
        for frame in p.split(hello, self.max_frame_bytes, self.signing_key):
            self.link.publish_nowait(self.topics.up(self.device_id), frame)

    def close(self, *, wait: bool = True) -> None:
        """Retained Status(offline), stamped after the connection's will, then disconnect
        (``wait=False``: queued on a shared loop, see MqttLink.close)."""
        self._epoch = self._now_after(self._epoch)
        final = p.encode(p.Status(self._env(0, 0, self._epoch), online=False, reason="shutdown"), self.signing_key)
        self.link.close(final=(self.topics.status(self.device_id), final), wait=wait)

    # -- receiving ---------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> bool:
        """Handle at most one incoming publish; False if none came within ``timeout_s``."""
        incoming = self.link.get(timeout_s)
        if incoming is None:
            return False
        duplicates = self.receiver.counters["duplicates"]
        try:
            message = self.receiver.accept(incoming.payload, incoming.topic)
        except p.ProtocolError as exc:
            self.counters[f"protocol_errors.{type(exc).__name__}"] += 1
            self.receiver.log_refusal(incoming.topic, exc)
            return True
        if message is None:
            if self.receiver.counters["duplicates"] > duplicates:
                kind = "gradients" if incoming.topic == self.topics.down(self.device_id) else "broadcasts"
                self.counters[f"duplicate_{kind}"] += 1
            return True
        self._dispatch(message)
        return True

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.ModelWeights):
            self.models[message.version] = p.weights_to_numpy(message.weights)
            for old in sorted(self.models)[:-MODELS_KEPT]:
                del self.models[old]
        elif isinstance(message, p.RoundPlan):
            if self.plan is None or message.envelope.round > self.plan.envelope.round:
                self.plan_received_at = time.monotonic()
                self.plan = message
                # whatever belongs to an earlier round is over now (a round in flight is superseded)
                self.receiver.min_round = max(self.receiver.min_round, message.envelope.round)
            else:  # a new plan round every time (the server's lease): an older one is a replay
                self.counters["stale_plans"] += 1
        elif isinstance(message, p.Gradient):
            key = (message.envelope.round, message.envelope.step)
            if key in self.applied:
                self.counters["duplicate_gradients"] += 1
            elif key != self.awaiting:  # not for the step in flight: nothing may wait on it
                self.counters["unexpected_gradients"] += 1
            else:
                self.gradients[key] = message
        elif isinstance(message, p.ErrorReport):
            log.warning("server reported %s: %s", message.code, message.detail)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, rounds: int | None = None) -> int:
        """Serve plans until ``rounds`` rounds are done (forever when None); returns rounds done."""
        done = 0
        while rounds is None or done < rounds:
            done += self.serve_plan(self._next_plan())
        return done

    def serve_plan(self, plan: p.RoundPlan) -> bool:
        """Train the round ``plan`` selects us for; False if it had to be abandoned."""
        try:
            self.train_round(plan)
            return True
        except DataMismatchError as exc:  # training would teach wrong labels: tell the server, stop
            self._report(plan.envelope.round, "data_mismatch", str(exc))
            raise
        except RoundAborted as exc:
            log.warning("round %d abandoned: %s", plan.envelope.round, exc)
            self.counters["aborted_rounds"] += 1
            return False
        finally:
            self.done_rounds.add(plan.envelope.round)

    def _report(self, round_: int, code: str, detail: str) -> None:
        """An ErrorReport to the server, delivered within ``timeout_s`` if at all (logged either way)."""
        log.error("%s: %s", code, detail)
        report = p.ErrorReport(self._env(round_), code, detail[:500])
        try:
            self._send_reliably(self.topics.up(self.device_id), report, time.monotonic() + self.timeout_s, RoundStats())
        except RoundAborted:
            log.warning("could not deliver the %s report to the server", code)

    def selected_plan(self) -> p.RoundPlan | None:
        """The plan that selects this device for a round it has not done yet, if any."""
        plan = self.plan
        if plan is not None and plan.envelope.round not in self.done_rounds and self._allocation(plan):
            return plan
        return None

    def heartbeat_due(self) -> bool:
        """An idle device re-sends its Hello every ``heartbeat_s``: a server that (re)started after
        our first Hello knows us only by the retained Status."""
        return time.monotonic() - self._last_hello >= self.heartbeat_s

    def heartbeat(self) -> None:
        """Re-send the Hello if an idle device is due (see :meth:`heartbeat_due`)."""
        if self.heartbeat_due():
            self._hello(heartbeat=True)

    def _next_plan(self) -> p.RoundPlan:
        """Block until a plan for a round not yet done selects this device."""
        while True:
            plan = self.selected_plan()
            if plan is not None:
                return plan
            self.heartbeat()
            self.pump(1.0)

    def _allocation(self, plan: p.RoundPlan) -> p.Allocation | None:
        return next((a for a in plan.allocations if a.device_id == self.device_id), None)

    def _deadline(self, plan: p.RoundPlan) -> float:
        return self.plan_received_at + plan.deadline_s

    def _wait_model(self, plan: p.RoundPlan) -> dict[str, np.ndarray]:
        deadline = min(self._deadline(plan), time.monotonic() + max(self.timeout_s, plan.deadline_s))
        while plan.model_version not in self.models:
            if time.monotonic() > deadline:
                raise RoundAborted(f"model version {plan.model_version} never arrived")
            self._check_superseded(plan.envelope.round)
            self.pump(0.2)
        return self.models[plan.model_version]

    def train_round(self, plan: p.RoundPlan) -> p.RoundUpdate:
        """Train one round as the plan says, publish the RoundUpdate, return it."""
        round_, alloc = plan.envelope.round, self._allocation(plan)
        check_against_plan(self.data, plan.num_classes, plan.classes_digest)
        self.receiver.min_round = max(self.receiver.min_round, round_)
        start = self._wait_model(plan)
        # read-only views on the received model: the first step's outputs are new arrays, and a
        # copy here would hold one more weight-sized buffer for the whole round
        weight, bias = (np.asarray(start[name], np.float32) for name in WEIGHT_NAMES)
        optimizer = DeviceOptimizer.for_plan(plan)
        fixed = self.engine.name == "litert"
        batch = int(self.device_json["batch_size"]) if fixed else plan.batch_size
        self.uplink = self._uplink_for(alloc)
        stats, cpu0 = RoundStats(), time.process_time()
        sent0, recv0 = self.link.bytes_sent, self.link.bytes_received
        metering = self._start_meter()
        noise_rng = np.random.default_rng((self.seed, round_, 1))
        augment = Augment.from_plan(plan)
        step = 0
        for epoch in range(plan.local_epochs):
            shuffle_rng, augment_rng = (np.random.default_rng((self.seed, round_, k, epoch)) for k in (0, 2))
            for images, labels in self.data.batches(batch, shuffle_rng, drop_last=fixed, augment=augment,
                                                    augment_rng=augment_rng):
                t0 = time.perf_counter()
                tensor = self._quantized(images, weight, bias, alloc, noise_rng)
                stats.compute_time_s += time.perf_counter() - t0
                message = p.Activations(self._env(round_, step), tensor, p.Tensor.from_numpy(labels.astype(np.int64)))
                grad = self._exchange(plan, message, stats)
                t0 = time.perf_counter()
                weight, bias = optimizer.step(self.engine, weight, bias, images, grad)
                stats.compute_time_s += time.perf_counter() - t0
                self.applied.add((round_, step))
                step += 1
        stats.steps, stats.cpu_time_s = step, time.process_time() - cpu0
        if self.shaper is not None:  # what the kernel link carried this round, at the shaped rate
            try:
                stats.airtime_s += self.uplink.airtime_s()
            except ShapedUplinkError as exc:
                raise RoundAborted(str(exc)) from None
            stats.uplink_time_s = stats.airtime_s
            self.uplink_wall_s[round_] = round(stats.publish_wall_s, 4)
        del optimizer  # its momentum (weight-sized) is not needed while the update is encoded
        compute_j, source = self._compute_energy(metering, stats)
        stats.bytes_sent, stats.bytes_received = self.link.bytes_sent - sent0, self.link.bytes_received - recv0

        def make_update(telemetry: p.Telemetry) -> p.RoundUpdate:
            return p.RoundUpdate(
                self._env(round_, step), plan.model_version, self.data.samples_per_epoch(batch, drop_last=fixed),
                p.weights_from_numpy(dict(zip(WEIGHT_NAMES, (weight, bias)))), telemetry,
            )

        update = self._publish_update(plan, make_update, stats, alloc, compute_j, source)
        self.gradients = {k: v for k, v in self.gradients.items() if k[0] > round_}
        return update

    def _publish_update(self, plan: p.RoundPlan, make_update: Callable[[p.Telemetry], p.RoundUpdate],
                        stats: RoundStats, alloc: p.Allocation, compute_j: float, source: str) -> p.RoundUpdate:
        """Send the round's RoundUpdate; with an emulated link its own airtime (from its encoded
        size) is counted in the telemetry it carries. The telemetry is announced in the next Hello."""
        rate = self.uplink.rate_bps
        if rate:
            frames = p.split(make_update(self._telemetry(stats, alloc, compute_j, source)), self.max_frame_bytes,
                             self.signing_key)
            own = 8.0 * sum(len(f) for f in frames) / rate
            stats.airtime_s += own
            stats.uplink_time_s += own
        update = make_update(self._telemetry(stats, alloc, compute_j, source))
        self._send_reliably(self.topics.up(self.device_id), update, self._deadline(plan), RoundStats())
        self.counters["rounds"] += 1
        self.last_telemetry = update.telemetry
        return update

    def _quantized(self, images: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   alloc: p.Allocation, rng: np.random.Generator) -> QuantizedTensor:
        """Embedding forward + quantizer at the allocation's bits (16/32: embed, then cast)."""
        per = "token" if alloc.per_token else "tensor"
        if alloc.bits_up in FLOAT_BITS:
            return quantize(self.engine.embed(images, weight, bias), alloc.bits_up, per=per)
        shape = (images.shape[0], int(self.device_json["num_patches"]), int(self.device_json["embed_dim"]))
        noise = rng.random(shape, dtype=np.float32)
        codes, lo, hi = self.engine.forward(images, weight, bias, noise, float(2**alloc.bits_up - 1), alloc.per_token)
        lo, hi = np.asarray(lo, np.float32).reshape(-1), np.asarray(hi, np.float32).reshape(-1)
        if not alloc.per_token:
            lo, hi = lo[:1].copy(), hi[:1].copy()
        packed = pack_codes(np.asarray(codes).astype(np.uint8), alloc.bits_up)
        return QuantizedTensor(alloc.bits_up, tuple(int(s) for s in codes.shape), per, lo, hi, packed)

    def _exchange(self, plan: p.RoundPlan, message: p.Activations, stats: RoundStats) -> np.ndarray:
        """Publish activations, wait for their gradient; re-send after every reconnect."""
        key = self.awaiting = (message.envelope.round, message.envelope.step)
        deadline = self._deadline(plan)
        topic = self.topics.up(self.device_id)
        t0, air0, wait0 = time.perf_counter(), stats.airtime_s, stats.pace_wait_s
        generation, sent_at = self._send_reliably(topic, message, deadline, stats), time.monotonic()
        wall = time.perf_counter() - t0
        stats.publish_wall_s += wall
        # emulated: loopback publish time without the bucket's sleeps, plus the airtime
        stats.uplink_time_s += wall - (stats.pace_wait_s - wait0) + (stats.airtime_s - air0)
        while key not in self.gradients:
            if time.monotonic() > deadline:
                raise RoundAborted(f"no gradient for round {key[0]} step {key[1]} before the deadline")
            self._check_superseded(key[0])
            reconnected = self.link.connections != generation and self.link.connected
            if reconnected or time.monotonic() - sent_at > self.resend_after_s:
                self.counters["resent_activations"] += 1
                log.info("re-sending activations of round %d step %d", *key)
                air0 = stats.airtime_s
                generation, sent_at = self._send_reliably(topic, message, deadline, stats), time.monotonic()
                stats.uplink_time_s += stats.airtime_s - air0  # emulated radio busy again (0 otherwise)
            self.pump(0.1)
        grad = self.gradients.pop(key)
        self.awaiting = None
        return dequantize(grad.tensor)

    def _check_superseded(self, round_: int) -> None:
        """RoundAborted when the server has moved on to a later plan (e.g. it restarted)."""
        if self.plan is not None and self.plan.envelope.round > round_:
            raise RoundAborted(f"superseded by plan round {self.plan.envelope.round}")

    def _send_reliably(self, topic: str, message: p.Message, deadline: float, stats: RoundStats) -> int:
        """Send until PUBACKed, retrying across reconnects; returns the connection generation used.

        With an emulated link every frame is paced by the round's token bucket; its airtime and
        the time the bucket slept are added to ``stats``.
        """
        pace = None
        if self.uplink.bucket is not None:
            bucket = self.uplink.bucket

            def pace(nbytes: int) -> None:
                stats.airtime_s += bucket.pace(nbytes)
                stats.pace_wait_s += bucket.last_delay_s

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoundAborted(f"could not deliver {type(message).__name__} before the deadline")
            try:
                generation = self.link.connections
                self.link.send(topic, message, timeout_s=min(remaining, self.timeout_s), pace=pace,
                               signer=self.signing_key)
                return generation
            except TransportError as exc:
                self.counters["send_retries"] += 1
                log.info("send failed (%s); retrying", exc)

    def _uplink_for(self, alloc: p.Allocation) -> RoundUplink:
        """This round's uplink (module docstring); RoundAborted when it cannot have one."""
        try:
            uplink = RoundUplink.start(alloc.bandwidth_hz, alloc.tx_power_w, self.channel_gain,
                                       emulate=self.emulate_link, shaper=self.shaper,
                                       burst_bits=8.0 * self.max_frame_bytes)
        except (ValueError, ShapedUplinkError) as exc:
            raise RoundAborted(f"cannot emulate the uplink of this allocation: {exc}") from None
        if uplink.rate_bps is not None:
            log.info("%s uplink: %.3g bit/s (B=%.3g Hz, p=%.3g W, h=%.3g)", "shaped" if self.shaper else "emulated",
                     uplink.rate_bps, alloc.bandwidth_hz, alloc.tx_power_w, self.channel_gain)
        return uplink

    def _start_meter(self) -> bool:
        """Start the compute meter; False (logged) when there is none or it fails."""
        if self.compute_meter is None:
            return False
        from edge_runtime.energy import MeterError

        try:
            self.compute_meter.start()
            return True
        except MeterError as exc:
            log.warning("energy meter %s failed to start (%s): using the estimate", self.compute_meter.name, exc)
            self.counters["meter_errors"] += 1
            return False

    def _compute_energy(self, metering: bool, stats: RoundStats) -> tuple[float, str]:
        """(joules, "measured" | "estimated") of the round's compute; the estimate when the meter fails."""
        if metering:
            from edge_runtime.energy import MEASURED, MeterError

            try:
                reading = self.compute_meter.stop()
                return reading.energy_j, ("measured" if reading.kind == MEASURED else "estimated")
            except MeterError as exc:
                log.warning("energy meter %s: %s; using the estimate", self.compute_meter.name, exc)
                self.counters["meter_errors"] += 1
        cpu_s = stats.cpu_time_s or stats.compute_time_s or 1e-6  # never a silent 0
        return cpu_s * self.power.cpu_power_w, "estimated"

    def _telemetry(self, stats: RoundStats, alloc: p.Allocation, compute_j: float, source: str) -> p.Telemetry:
        """Energy = compute (meter or estimate) + the allocation's tx power x radio time (module doc)."""
        radio_s = stats.airtime_s if self.emulate_link or self.shaper is not None else stats.uplink_time_s
        energy_j = compute_j + alloc.tx_power_w * radio_s
        return p.Telemetry(stats.compute_time_s, stats.uplink_time_s, energy_j, source,
                           stats.bytes_sent, stats.bytes_received, stats.steps)
