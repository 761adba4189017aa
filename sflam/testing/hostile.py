"""Hostile input at a live server and live devices: malformed, mutated, oversized, replayed, stale.

:class:`Corpus` makes the messages. It learns from real frames captured off the broker (a spy
subscribed to the run's topics), so that replays are byte-exact copies of traffic the receivers
have already seen and mutations start from frames they would otherwise accept. Each shot is one
publish, aimed at a topic a server reads (``d/{id}/up``, ``d/{id}/status``) or a device reads
(``d/{id}/down``, ``plan``, ``model``) and built so that a correct receiver must refuse it:

- **malformed**: random bytes, truncated frames, a wrong magic, version or type code, bytes after
  the CRC;
- **mutated**: real frames with bytes flipped (the CRC catches them), re-encoded for another run,
  with another device's envelope than the topic's, or of a type that does not belong on the topic;
- **oversized**: frames declaring sizes beyond the decoder's limits (a chunk set of 4 GiB or of a
  million chunks, a body longer than the frame), large junk payloads, and first chunks of sets
  that never complete (they take buffer space until evicted or expired);
- **replayed**: captured frames published again, verbatim;
- **stale**: real messages re-encoded for a finished round, or presence older than the device's
  newest;
- **forged** (signed runs only): well-formed *new* messages a receiver would act on if it did not
  check signatures: a plan for a later round with another learning rate, zeroed model weights, a
  gradient for a new step, activations and a round update under a device's id, a newer Hello or
  Status; unsigned, signed by the attacker's own key under the rightful signer's id, or a real
  signed frame with one payload byte changed and its CRC recomputed.

In a signed run (the default) the attacker holds the broker rights of the server but none of its
keys, so most shots of the other categories are refused for their signature before the rule they
aim at is reached; replayed frames carry valid signatures and meet the replay rules.

Nothing a valid sender would send is in the corpus: a receiver that accepted one of these shots
would have a bug. :func:`run_attack` drives a whole run (provisioned TLS broker, a server process,
device processes, the attacker) and returns the figures; ``benchmarks/bench_hostile.py`` prints
them and ``tests/test_hostile.py`` checks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime import protocol as p
from edge_runtime.protocol.codec import MAGIC, PREFIX_SIZE
from server_runtime.config import config_toml
from server_runtime.round_record import RoundRecord
from server_runtime.data import write_digits_shards
from sflam.processes import ProcessError, ProcessGroup, sflam_command
from sflam.testing.local_fleet import LocalFleet, local_fleet

CATEGORIES = ("malformed", "mutated", "oversized", "replayed", "stale", "forged")
UNSIGNED_CATEGORIES = CATEGORIES[:-1]  # forged shots would be accepted where nothing is signed: that is the point
ATTACKER = "intruder"  # the attacker's broker user: may read and write every topic of the run
BIG_JUNK_BYTES = 200 * 1024  # under the provisioned broker's max_packet_size (a larger one costs the connection)
BASELINE_ROUNDS = 4  # rounds trained before the first shot, to compare round times with
# Counters that record a refused (or dropped, or held-then-evicted) message; their sum over a
# run is at least the number of hostile shots a receiver got.
SERVER_REFUSALS = ("receiver.rejected.", "receiver.duplicates", "receiver.chunks", "inbox.dropped", "inbox.expired",
                   "unexpected.")
DEVICE_REFUSALS = ("receiver.rejected.", "receiver.duplicates", "receiver.chunks", "inbox.dropped", "inbox.expired",
                   "counters.unexpected_gradients", "counters.stale_plans")
CAPTURE_KINDS = {  # what may be replayed or mutated, by the topic it was captured on
    "up": (p.Hello, p.Activations, p.RoundUpdate),
    "status": (p.Status,),
    "down": (p.Gradient,),
    "plan": (p.RoundPlan,),
    "model": (p.ModelWeights,),
}


@dataclass(frozen=True)
class Shot:
    """One hostile publish."""

    category: str
    what: str
    topic: str
    payload: bytes


@dataclass
class Captured:
    """A legitimate frame seen on the wire, decoded."""

    topic: str
    frame: bytes
    message: p.Message


class Corpus:
    """Hostile shots built from captured traffic (module doc); seeded, so a run can be repeated."""

    def __init__(self, run_id: str, seed: int = 0, keep: int = 64, signed: bool = True) -> None:
        self.topics = p.Topics(run_id)
        self.run_id = run_id
        self.rng = random.Random(seed)
        self.categories = CATEGORIES if signed else UNSIGNED_CATEGORIES
        self._thieves: dict[str, p.SigningKey] = {}  # the attacker's own keys, one per id it poses as
        self.captured: dict[str, deque[Captured]] = defaultdict(lambda: deque(maxlen=keep))
        self._lock = threading.Lock()

    # -- learning ------------------------------------------------------------------------------

    def capture(self, topic: str, payload: bytes) -> None:
        """Keep a legitimate unchunked frame of a kind worth replaying (others are ignored)."""
        try:
            ref = self.topics.parse(topic)
            message = p.decode(payload)
        except p.ProtocolError:
            return
        if isinstance(message, CAPTURE_KINDS.get(ref.kind, ())):
            with self._lock:
                self.captured[topic].append(Captured(topic, bytes(payload), message))

    def ready(self, topics: list[str]) -> bool:
        """True once a frame of each of ``topics`` has been captured."""
        with self._lock:
            return all(self.captured.get(t) for t in topics)

    def _pick(self, topic: str) -> Captured:
        with self._lock:
            return self.rng.choice(list(self.captured[topic]))

    # -- shots ---------------------------------------------------------------------------------

    def shot(self, topic: str, category: str | None = None) -> Shot:
        """One hostile publish on ``topic`` (a captured frame of it must exist)."""
        category = category or self.rng.choice(self.categories)
        make: Callable[[Captured], tuple[str, str, bytes]] = getattr(self, f"_{category}")
        what, target, payload = make(self._pick(topic))
        return Shot(category, what, target, payload)

    def _malformed(self, c: Captured) -> tuple[str, str, bytes]:
        rng, frame = self.rng, c.frame
        kind = rng.choice(("random", "truncated", "magic", "version", "type", "trailing"))
        if kind == "random":
            data = rng.randbytes(rng.randint(1, 2048))
            if data.startswith(MAGIC):
                data = b"X" + data[1:]
        elif kind == "truncated":
            data = frame[:rng.randint(1, len(frame) - 1)]
        elif kind == "magic":
            data = b"SFLX" + frame[4:]
        elif kind == "version":
            data = frame[:4] + bytes([rng.choice([0, 2, 7, 255])]) + frame[5:]
        elif kind == "type":
            data = _recrc(frame[:5] + bytes([rng.randint(200, 255)]) + frame[6:-4])
        else:
            data = frame + rng.randbytes(rng.randint(1, 64))
        return kind, c.topic, data

    def _mutated(self, c: Captured) -> tuple[str, str, bytes]:
        rng, message = self.rng, c.message
        kind = rng.choice(("flipped", "foreign_run", "other_device", "wrong_type"))
        if kind == "flipped":  # header or body bytes changed in transit; the CRC no longer matches
            data = bytearray(c.frame)
            for i in rng.sample(range(PREFIX_SIZE, len(data) - 4), min(rng.randint(1, 8), len(data) - 4 - PREFIX_SIZE)):
                data[i] ^= rng.randint(1, 255)
            return kind, c.topic, bytes(data)
        if kind == "foreign_run":
            env = dataclasses.replace(message.envelope, run_id=f"{self.run_id}-evil")
            return kind, c.topic, p.encode(dataclasses.replace(message, envelope=env))
        if kind == "other_device":  # an envelope that names another device than the topic does
            env = dataclasses.replace(message.envelope, device_id=_other(message.envelope.device_id))
            return kind, c.topic, p.encode(dataclasses.replace(message, envelope=env))
        # a real message of one kind on a topic of another kind
        ref = self.topics.parse(c.topic)
        with self._lock:
            donors = [d for t, frames in self.captured.items() for d in frames
                      if type(d.message) not in _allowed_on(ref.kind)]
        donor = rng.choice(donors) if donors else None
        if donor is None:
            return self._malformed(c)
        env = dataclasses.replace(donor.message.envelope, device_id=c.message.envelope.device_id)
        return kind, c.topic, p.encode(dataclasses.replace(donor.message, envelope=env))

    def _oversized(self, c: Captured) -> tuple[str, str, bytes]:
        rng, env = self.rng, c.message.envelope
        kind = rng.choice(("huge_set", "many_chunks", "long_body", "big_junk", "open_set", "open_set"))
        if kind == "huge_set":
            chunk = p.Chunk(env, rng.getrandbits(64), 0, 4, 2**32 - 1, rng.randbytes(64))
            return kind, c.topic, p.encode(chunk)
        if kind == "many_chunks":
            chunk = p.Chunk(env, rng.getrandbits(64), 0, 2**24, 2**24, rng.randbytes(64))
            return kind, c.topic, p.encode(chunk)
        if kind == "long_body":  # a prefix that claims a body far longer than what follows
            head = bytearray(c.frame[:PREFIX_SIZE])
            head[8:12] = (2**31 - 1).to_bytes(4, "little")
            return kind, c.topic, bytes(head) + c.frame[PREFIX_SIZE:]
        if kind == "big_junk":
            return kind, c.topic, b"JUNK" + rng.randbytes(BIG_JUNK_BYTES)
        # the first chunk of a set whose other chunks never come: held, then evicted or expired
        chunk = p.Chunk(env, rng.getrandbits(64), 0, 2, 2048, rng.randbytes(1024))
        return kind, c.topic, p.encode(chunk)

    def _replayed(self, c: Captured) -> tuple[str, str, bytes]:
        return type(c.message).__name__, c.topic, c.frame

    def _stale(self, c: Captured) -> tuple[str, str, bytes]:
        message, env = c.message, c.message.envelope
        if isinstance(message, (p.Hello, p.Status)):  # presence made before the newest the receiver saw
            older = dataclasses.replace(env, created_at=env.created_at - self.rng.uniform(0.01, 3600.0))
            return f"old_{type(message).__name__}", c.topic, p.encode(dataclasses.replace(message, envelope=older))
        if env.round == 0:
            return self._replayed(c)
        earlier = dataclasses.replace(env, round=self.rng.randint(0, env.round - 1), created_at=time.time())
        stale = dataclasses.replace(message, envelope=earlier)
        if isinstance(message, p.ModelWeights):
            stale = dataclasses.replace(stale, version=earlier.round)
        return f"old_round_{type(message).__name__}", c.topic, p.encode(stale)


    def _forged(self, c: Captured) -> tuple[str, str, bytes]:
        rng, message = self.rng, c.message
        if rng.random() < 0.25:  # a real signed frame, one payload byte changed, the CRC made to match
            data = bytearray(c.frame)
            body = PREFIX_SIZE + int.from_bytes(data[6:8], "little")  # the body follows the envelope
            data[rng.randrange(body, body + int.from_bytes(data[8:12], "little"))] ^= rng.randint(1, 255)
            return "tampered", c.topic, _recrc(bytes(data[:-4]))
        forged = _new_work(message, rng)
        ref = self.topics.parse(c.topic)
        signer_id = ref.device_id if ref.kind in ("up", "status") else p.SERVER_ID
        signer = None if rng.random() < 0.5 else self._thief(signer_id)
        how = "unsigned" if signer is None else "thief_key"
        return f"{type(forged).__name__}_{how}", c.topic, p.encode(forged, signer)

    def _thief(self, key_id: str) -> p.SigningKey:
        if key_id not in self._thieves:
            self._thieves[key_id] = p.SigningKey.generate(key_id)
        return self._thieves[key_id]


def _new_work(message: p.Message, rng: random.Random) -> p.Message:
    """A well-formed message a receiver that trusted its sender would act on: new round or step."""
    env = message.envelope
    later = dataclasses.replace(env, round=env.round + rng.randint(1, 3), created_at=time.time() + 1.0)
    if isinstance(message, p.RoundPlan):
        return dataclasses.replace(message, envelope=later, lr=10.0)
    if isinstance(message, p.ModelWeights):
        zeros = p.weights_from_numpy({k: v * 0 for k, v in p.weights_to_numpy(message.weights).items()})
        return dataclasses.replace(message, envelope=later, version=later.round, weights=zeros)
    if isinstance(message, (p.Hello, p.Status)):
        return dataclasses.replace(message, envelope=dataclasses.replace(env, created_at=time.time() + 3600.0))
    if isinstance(message, p.RoundUpdate):
        return dataclasses.replace(message, envelope=later)
    step = dataclasses.replace(env, step=env.step + rng.randint(1000, 10**6))  # Activations, Gradient
    return dataclasses.replace(message, envelope=step)


def _recrc(frame_without_crc: bytes) -> bytes:
    import struct
    import zlib

    return frame_without_crc + struct.pack("<I", zlib.crc32(frame_without_crc))


def _other(device_id: str) -> str:
    return "dev-1" if device_id != "dev-1" else "dev-0"


def _allowed_on(kind: str) -> tuple[type, ...]:
    from edge_runtime.protocol.receive import ALLOWED_ON

    return ALLOWED_ON[kind]


# ------------------------------------------------------------------------------ a whole run


@dataclass
class AttackConfig:
    """A hostile run: a provisioned fleet, a server, ``devices`` devices, ``shots`` hostile messages."""

    workdir: Path
    bundle: Path
    shots: int = 10_000
    devices: int = 2
    samples: int = 96
    seed: int = 0
    run_id: str = "srv"
    timeout_s: float = 600.0
    progress: Callable[[str], None] = print
    signed: bool = True  # the fleet signs (as provisioned); False: unsigned mode, no forged shots


@dataclass
class AttackReport:
    """What a hostile run measured (see :func:`run_attack`)."""

    sent: Counter = field(default_factory=Counter)  # by "target/category"
    sent_by_target: Counter = field(default_factory=Counter)  # server, dev-0, dev-1, ...
    kinds: Counter = field(default_factory=Counter)  # by "category/what"
    refused: dict[str, int] = field(default_factory=dict)  # by process: summed refusal counters
    slack: dict[str, int] = field(default_factory=dict)  # by process: refusals legitimate traffic may cause
    counters: dict[str, dict] = field(default_factory=dict)  # by process: every counter
    rss_mib: dict[str, dict[str, float]] = field(default_factory=dict)  # by process: before, peak, after
    rounds_during_attack: int = 0  # counted rounds that ended while shots were being fired
    round_s_before: float = float("nan")  # median round duration before the attack (s)
    round_s_during: float = float("nan")  # ... and of the rounds that ended during it
    rounds_total: int = 0
    completed_during_attack: list[list[str]] = field(default_factory=list)
    attack_s: float = 0.0
    alive_after: dict[str, bool] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs
        return {f.name: (dict(v) if isinstance(v, dict) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _summary(out: str, tag: str) -> dict:
    line = next((line for line in out.splitlines() if line.startswith(tag + " ")), None)
    if line is None:
        raise RuntimeError(f"no {tag} line in the output")
    return json.loads(line.split(" ", 1)[1])


def _sum_refusals(flat: dict[str, int], prefixes: tuple[str, ...]) -> int:
    return sum(v for k, v in flat.items() if any(k.startswith(prefix) for prefix in prefixes))


def _run_toml(fleet: LocalFleet, cfg: AttackConfig, ckpt: Path) -> str:
    broker = {"url": fleet.url, "run_id": cfg.run_id, **fleet.server_config()}
    security = fleet.security_config() if cfg.signed else {"signing": "off"}
    sections = {
        "model": {"preset": "vit_quick_patch4_16"},
        "data": {"eval": "digits", "eval_batch_size": 512},
        "training": {"rounds": 100_000, "devices_per_round": cfg.devices, "local_epochs": 1, "batch_size": 16,
                     "mode": "v1", "lr": 0.05, "momentum": 0.9},
        "quant": {"bits": 8, "gradient_bits": 32},
        "round": {"deadline_s": 60.0, "min_completed": 0.5, "wait_for_devices_s": 120.0},
        "broker": broker,
        "security": security,
        "checkpoint": {"dir": str(ckpt)},
        "metrics": {"progress": False},
        "compute": {"device": "cpu", "amp": "off", "workers": 1},
    }
    return config_toml(sections, cfg.seed)


def run_attack(cfg: AttackConfig) -> AttackReport:
    """Train on a provisioned TLS broker while an attacker publishes ``cfg.shots`` hostile messages.

    The attacker logs in as :data:`ATTACKER`, whom the ACL lets read and write every topic of the
    run (the strongest position short of the server's key), captures real traffic (its own shots,
    echoed back, are not learnt from), and fires shots alternately at the server's topics and the
    devices' (each publish PUBACKed before the next: QoS 1, as a real client would). Once all are
    sent it waits for one more round, stops the processes (each prints its counters), and returns
    sent and refused figures, resident memory before, at peak and after, and the rounds trained.
    """
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    shards = write_digits_shards(cfg.workdir, cfg.devices, cfg.samples, cfg.seed)
    ckpt = cfg.workdir / "ckpt"
    report = AttackReport()
    acl = [f"topic readwrite {p.Topics(cfg.run_id).prefix}/#"]
    with local_fleet(cfg.workdir, cfg.devices, cfg.run_id, extra_users={ATTACKER: acl}) as fleet:
        (cfg.workdir / "run.toml").write_text(_run_toml(fleet, cfg, ckpt))
        group = ProcessGroup(cfg.workdir / "logs", stop_timeout_s=60.0)
        group.start("server", sflam_command("server", "--config", str(cfg.workdir / "run.toml")))
        for i, shard in enumerate(shards):
            name = f"dev-{i}"
            group.start(name, sflam_command(
                "device", "--bundle", str(cfg.bundle), "--broker", fleet.url, "--device-id", name,
                "--data", f"npz:{shard}", "--backend", "numpy", "--run-id", cfg.run_id, "--seed", str(i),
                "--meter", "estimate", *(fleet.device_args(name) if cfg.signed else (*fleet.login_args(name), "--unsigned"))))
        failure: Exception | None = None
        try:
            _attack(cfg, fleet, group, report, ckpt)
        except RuntimeError as exc:
            failure = exc
        finally:
            report.exit_codes = group.stop()
        texts = {name: group.output(name) for name in group.procs}
    if failure is None and not all(code in (0, 130) for code in report.exit_codes.values()):
        failure = RuntimeError(f"a process did not end cleanly: exit codes {report.exit_codes}")
    if failure is not None:
        tails = "".join(f"\n--- {name} (exit {report.exit_codes[name]}) output ends:\n{text[-2000:]}"
                        for name, text in texts.items())
        raise RuntimeError(f"{failure}{tails}")
    _read_summaries(report, texts)
    report.rounds_total = _counted(ckpt)
    return report


def _read_summaries(report: AttackReport, texts: dict[str, str]) -> None:
    """Each process's refusal counters, from the summary line it printed on its way out."""
    for name, text in texts.items():
        try:
            summary = _summary(text, "sflam-server-summary" if name == "server" else "sflam-device-summary")
        except (RuntimeError, ValueError) as exc:
            raise RuntimeError(f"{name} printed no summary ({exc}); its output ends:\n{text[-3000:]}") from None
        if name == "server":
            flat = summary["counters"]
            report.refused[name] = _sum_refusals(flat, SERVER_REFUSALS)
        else:
            flat = {f"{group}.{k}": v for group in ("counters", "receiver", "inbox", "reassembler")
                    for k, v in summary.get(group, {}).items()}
            report.refused[name] = _sum_refusals(flat, DEVICE_REFUSALS)
        report.counters[name] = flat
    devices = [n for n in texts if n != "server"]
    server = report.counters["server"]
    report.slack["server"] = sum(report.counters[d].get("counters.resent_activations", 0)
                                 + report.counters[d].get("counters.send_retries", 0) for d in devices)
    for d in devices:
        report.slack[d] = server.get("reanswered_steps", 0)


def _attack(cfg: AttackConfig, fleet: LocalFleet, group: ProcessGroup, report: AttackReport, ckpt: Path) -> None:
    topics = p.Topics(cfg.run_id)
    devices = [f"dev-{i}" for i in range(cfg.devices)]
    corpus = Corpus(cfg.run_id, cfg.seed, signed=cfg.signed)
    sent_hashes: set[bytes] = set()
    # one connection both listens and fires: the provisioned broker takes the user name as the
    # client id, so a second connection of the same user would take the first one's place
    link = fleet.link(ATTACKER)
    stop_spying = threading.Event()

    def spying() -> None:
        while not stop_spying.is_set():
            incoming = link.get(0.2)
            if incoming is not None and hashlib.blake2b(incoming.payload, digest_size=16).digest() not in sent_hashes:
                corpus.capture(incoming.topic, incoming.payload)

    link.subscribe([f"{topics.prefix}/#"])
    spy_thread = threading.Thread(target=spying, name="hostile-spy", daemon=True)
    spy_thread.start()
    try:
        server_topics = [t for d in devices for t in (topics.up(d), topics.status(d))]
        device_topics = {d: [topics.down(d)] for d in devices[:1]}  # gradients for dev-0; plan/model for all
        shared = [topics.plan(), topics.model()]
        needed = server_topics + device_topics[devices[0]] + shared
        _wait(lambda: corpus.ready(needed) and _counted(ckpt) >= BASELINE_ROUNDS, cfg.timeout_s,
              "legitimate traffic to learn from", group)
        first = _counted(ckpt)
        cfg.progress(f"hostile: traffic captured ({first} rounds in); firing {cfg.shots} shots")
        wall0 = time.time()
        pids = {name: proc.pid for name, proc in group.procs.items()}
        report.rss_mib = {name: {"before": _rss_mib(pid), "peak": 0.0} for name, pid in pids.items()}
        t0 = time.monotonic()
        _fire(cfg, corpus, link, group, report, sent_hashes, server_topics,
              [(t, d) for d, ts in device_topics.items() for t in ts] + [(t, "all devices") for t in shared])
        report.attack_s, wall1 = time.monotonic() - t0, time.time()
        # every shot is PUBACKed by the broker; let the receivers drain their inboxes, and let
        # one more round finish so that "training proceeds" is seen after the last shot
        last = _counted(ckpt)
        _wait(lambda: _counted(ckpt) >= last + 1, cfg.timeout_s, "a round after the attack", group)
        time.sleep(2.0)
        for name, pid in pids.items():
            rss = _rss_mib(pid)
            report.rss_mib[name]["peak"] = max(report.rss_mib[name]["peak"], rss)
            report.rss_mib[name]["after"] = rss
        report.alive_after = {name: proc.poll() is None for name, proc in group.procs.items()}
        _round_figures(report, _round_records(ckpt), wall0, wall1)
    finally:
        stop_spying.set()
        spy_thread.join(5)
        link.close()


def _fire(cfg: AttackConfig, corpus: Corpus, link, group: ProcessGroup, report: AttackReport,
          sent_hashes: set[bytes], server_topics: list[str], device_targets: list[tuple[str, str]]) -> None:
    """``cfg.shots`` shots, every other one at a server topic; memory sampled as they go."""
    devices = [f"dev-{i}" for i in range(cfg.devices)]
    pids = {name: proc.pid for name, proc in group.procs.items()}
    for i in range(cfg.shots):
        if i % 2 == 0:
            topic, target = corpus.rng.choice(server_topics), "server"
        else:
            topic, target = corpus.rng.choice(device_targets)
        shot = corpus.shot(topic)
        sent_hashes.add(hashlib.blake2b(shot.payload, digest_size=16).digest())
        link.publish(shot.topic, shot.payload, timeout_s=30.0)
        report.sent[f"{target}/{shot.category}"] += 1
        report.kinds[f"{shot.category}/{shot.what}"] += 1
        for name in ([target] if target != "all devices" else devices):
            report.sent_by_target[name] += 1
        if i % 200 == 0:
            for name, pid in pids.items():
                report.rss_mib[name]["peak"] = max(report.rss_mib[name]["peak"], _rss_mib(pid))
            if group.exited():
                raise RuntimeError(f"a process died under attack: {group.exited()}")
        if i % 2000 == 1999:
            cfg.progress(f"hostile: {i + 1}/{cfg.shots} shots sent")


def _round_figures(report: AttackReport, records: list[RoundRecord], wall0: float, wall1: float) -> None:
    """Rounds trained under fire and round durations before and during the attack."""
    during = [r for r in records if wall0 <= r.time <= wall1]  # rounds that ended under fire
    report.rounds_during_attack = sum(1 for r in during if r.counted)
    report.completed_during_attack = [list(r.completed) for r in records if r.time >= wall0]
    # round 1 also waited for the devices to come online: the baseline starts at round 2
    report.round_s_before = _median([r.duration_s for r in records[1:] if r.time < wall0])
    report.round_s_during = _median([r.duration_s for r in during])


def _round_records(ckpt: Path) -> list[RoundRecord]:
    """The round records the server has written so far (a torn last line is left for later)."""
    from server_runtime.metrics import read_round_records

    path = ckpt / "metrics.jsonl"
    return read_round_records(path, strict=False) if path.exists() else []


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _counted(ckpt: Path) -> int:
    return sum(1 for r in _round_records(ckpt) if r.counted)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, group: ProcessGroup) -> None:
    try:
        group.wait_until(predicate, timeout_s, what)
    except ProcessError as exc:
        raise RuntimeError(str(exc)) from None
