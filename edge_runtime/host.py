"""A device host: many devices in one process, each still a real MQTT client.

Every hosted device is a :class:`edge_runtime.device.DeviceClient`, the same device logic as
``sflam device``: its own session (client id, will, persistent session, inbox), shard, rng,
weights and momentum, link emulation and telemetry. What the host shares is what never changes:
the bundle and its runtime session (:class:`edge_runtime.bundle.SharedBundle`), the code, and one
network thread (:class:`edge_runtime.mqtt_loop.LinkLoop`). An idle device holds no thread and no
images (its shard is a :class:`edge_runtime.data.LazyDeviceData`); the host's main thread handles
its messages and heartbeats. A device a plan selects trains on a worker thread, at most
``concurrency`` at a time, and lets its images go when the round ends.

A host file (``sflam device-host --devices FILE``) is JSON: ``{"devices": [{"device_id": ...,
"data": "npz:PATH" (or folder:DIR, manifest:FILE.csv), "seed": 0, "profile": null, "channel_gain": null}, ...]}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import protocol as p
from edge_runtime.bundle import SharedBundle
from edge_runtime.data import DEFAULT_CACHE_BYTES, DataMismatchError, LazyDeviceData, Preprocess
from edge_runtime.device import DeviceClient
from edge_runtime.mqtt_loop import LinkLoop
from edge_runtime.memory import peak_rss_mib

log = logging.getLogger(__name__)
HOST_BACKENDS = ("onnx", "numpy", "auto")  # runtime sessions that several threads may call at once
TICK_S = 1.0  # heartbeat sweep of the idle devices


class SharedDecoder:
    """Decodes each distinct broadcast frame (plan, model) once for every device of a host: they all
    receive the same bytes, and decoded messages are frozen. Keeps the last ``size`` frames."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._frames: OrderedDict[tuple, p.Message] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.selected: frozenset[str] = frozenset()  # the devices of the newest plan decoded

    def __call__(self, data: bytes, limits: p.Limits, *, keys: object = None, signer: str | None = None) -> p.Message:
        key = (bytes(data), id(keys), signer)  # verified against these keys: the devices of a host share them
        with self._lock:
            message = self._frames.get(key)
            if message is not None:
                self._frames.move_to_end(key)
                self.hits += 1
                return message
        # a ProtocolError (a bad signature too) is raised to each device, as without sharing
        message = p.decode(data, limits, keys=keys, signer=signer)
        if isinstance(message, p.RoundPlan):
            self.selected = frozenset(a.device_id for a in message.allocations)
        with self._lock:
            self._frames[key] = message
            while len(self._frames) > self.size:
                self._frames.popitem(last=False)
        return message


class HostError(ValueError):
    """A host file or host setting that cannot be used."""


@dataclass(frozen=True)
class HostedDevice:
    """One device of a host file."""

    device_id: str
    data: str  # npz:PATH, folder:DIR or manifest:FILE.csv (edge_runtime.data)
    seed: int = 0
    profile: str | None = None
    channel_gain: float | None = None


def read_host_file(path: Path) -> list[HostedDevice]:
    """The devices of a host file; HostError naming the file and what is wrong."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["devices"]
        devices = [HostedDevice(**entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HostError(f"{path}: not a host file ({exc}); expected {{\"devices\": [{{\"device_id\": ..., "
                        "\"data\": \"npz:PATH\"}, ...]}") from None
    ids = [d.device_id for d in devices]
    if not ids or len(set(ids)) != len(ids):
        raise HostError(f"{path}: needs at least one device and unique device ids")
    return devices


def host_keys(keys: Path | None, device_ids: list[str]) -> tuple[p.Keyring | None, dict[str, p.SigningKey]]:
    """A host's keys from a fleet's ``keys/`` folder (``server.pub``, ``devices/<id>.key``): the
    server's public key and every device's signing key; (None, {}) without a folder (unsigned)."""
    if keys is None:
        return None, {}
    try:
        server = p.Keyring.server_only(Path(keys) / "server.pub")
        return server, {d: p.SigningKey.from_file(d, Path(keys) / "devices" / f"{d}.key") for d in device_ids}
    except p.KeyFileError as exc:
        raise HostError(f"--keys {keys}: {exc}") from None


class DeviceHost:
    """Many devices on one network thread and a few training threads (module docstring)."""

    def __init__(self, bundle: Path, broker_url: str, devices: list[HostedDevice], *, run_id: str,
                 backend: str = "auto", concurrency: int = 8, stagger_s: float = 1.0, threads: int | None = None,
                 keys: Path | None = None, data_cache_bytes: int = DEFAULT_CACHE_BYTES, **device_options: object) -> None:
        if backend not in HOST_BACKENDS:
            raise HostError(f"a device host runs the {', '.join(HOST_BACKENDS)} backends, not {backend!r} "
                            "(a LiteRT interpreter cannot be shared between threads)")
        self.shared = SharedBundle.open(Path(bundle), backend, threads)
        self.loop = LinkLoop(stagger_s=stagger_s, name="device-host-mqtt")
        preprocess = Preprocess.from_device_json(self.shared.device_json)
        self.decoder = SharedDecoder()
        # signed: one ring with the server's key for all, and each device's own key (host_keys)
        server_keys, signing = host_keys(keys, [d.device_id for d in devices])
        self.signed = server_keys is not None
        self.devices = {
            d.device_id: DeviceClient(Path(bundle), broker_url, d.device_id,
                                      LazyDeviceData(d.data, preprocess, num_classes=self.shared.device_json.get("num_classes"),
                                                     cache_bytes=data_cache_bytes),
                                      backend=backend, run_id=run_id, seed=d.seed, profile=d.profile,
                                      channel_gain=d.channel_gain, shared=self.shared, link_loop=self.loop,
                                      broadcast_decode=self.decoder, signing_key=signing.get(d.device_id),
                                      server_keys=server_keys, **device_options)
            for d in devices
        }
        self.concurrency = concurrency
        self._ready: set[str] = set()
        self._wake = threading.Condition()
        self._busy: dict[str, Future] = {}
        for device_id, device in self.devices.items():
            device.link.on_message(lambda d=device_id: self._mark(d))

    def _mark(self, device_id: str) -> None:
        with self._wake:
            self._ready.add(device_id)
            self._wake.notify()

    def start(self) -> None:
        """Start every device's session (connects are spread over the loop's stagger)."""
        for device in self.devices.values():
            device.start(wait=False)

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve plans until ``stop`` is set (or KeyboardInterrupt)."""
        stop = stop or threading.Event()
        last_tick = time.monotonic()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="device") as workers:
            while not stop.is_set():
                with self._wake:
                    self._wake.wait_for(lambda: bool(self._ready) or stop.is_set(), timeout=TICK_S)
                    ready, self._ready = self._ready, set()
                ready |= self._finished()
                # the devices a new plan selects first: their rounds start before the idle ones read it
                selected = self.decoder.selected
                for device_id in sorted((ready & self.devices.keys()) - set(self._busy), key=lambda d: d not in selected):
                    self._serve_idle(self.devices[device_id], workers)
                if time.monotonic() - last_tick >= TICK_S:
                    last_tick = time.monotonic()
                    self._heartbeats()
            for future in self._busy.values():
                future.cancel()

    def _serve_idle(self, device: DeviceClient, workers: ThreadPoolExecutor) -> None:
        """Handle what an idle device received; start its round if a plan selects it."""
        while device.pump(0.0):
            pass
        plan = device.selected_plan()
        if plan is not None:
            self._busy[device.device_id] = workers.submit(self._train, device, plan)

    def _train(self, device: DeviceClient, plan: p.RoundPlan) -> None:
        try:
            device.serve_plan(plan)
        finally:
            device.data.release()
            self._mark(device.device_id)  # back to the main thread: anything that came meanwhile

    def _finished(self) -> set[str]:
        done = {d for d, future in self._busy.items() if future.done()}
        for device_id in sorted(done):
            error = self._busy.pop(device_id).exception()
            if isinstance(error, DataMismatchError):  # it must not train: offline for the rest of the run
                log.error("device %s stops: %s", device_id, error)
                self.devices.pop(device_id).close(wait=False)
                done.discard(device_id)
            elif error is not None:
                log.error("device %s failed its round: %r", device_id, error)
                self.devices[device_id].counters["host_errors"] += 1
        return done

    def _heartbeats(self) -> None:
        for device_id, device in self.devices.items():
            if device_id not in self._busy and device.link.connected:
                device.heartbeat()

    def close(self, timeout_s: float = 30.0) -> None:
        """Every device announces itself offline and disconnects (all queued at once, written by
        the loop in one pass); then the network thread stops."""
        for device in self.devices.values():
            device.close(wait=False)
        deadline = time.monotonic() + timeout_s
        for device in self.devices.values():
            device.link.closed.wait(max(0.0, deadline - time.monotonic()))
        self.loop.close()

    def summary(self) -> dict[str, object]:
        """What the host did: devices, how many connected, rounds trained, summed counters."""
        counters: Counter = Counter()
        for device in self.devices.values():
            counters.update(device.counters)
            counters.update({f"receiver.{k}": v for k, v in device.receiver.counters.items()})
            counters.update({f"inbox.{k}": v for k, v in device.link.inbox.counters.items()})
        return {
            "devices": len(self.devices),
            "connected": sum(1 for d in self.devices.values() if d.link.connections > 0),
            "rounds": counters["rounds"], "counters": dict(counters), "backend": self.shared.engine.name,
            "peak_rss_mib": peak_rss_mib(), "shared_decodes": self.decoder.hits,
        }

