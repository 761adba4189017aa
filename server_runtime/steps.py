"""Serving activation steps: the server's compute per batch, the gradient back, re-answers.

Every trainer rank serves the steps of the devices it trains through one :class:`StepServer`
(rank 0 inside the daemon, the others in ``server_runtime.rank_worker``). Steps run on a pool of
worker threads, so the MQTT network loop and the caller are never blocked by training. With
``compute.batch_steps`` on, the steps pending at the same moment are taken together and run as
one batched computation (:meth:`SplitTrainer.step_many`); otherwise each runs alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from edge_runtime import protocol as p
from edge_runtime.mqtt import MqttLink, TransportError
from server_runtime.coordinator import DeviceRound, RoundState
from server_runtime.trainer import SplitTrainer, StepError, StepRequest, StepResult, step_generator

log = logging.getLogger(__name__)
Refused = Callable[[RoundState, str, str], None]  # (round, device, reason): the owner fails the device
Item = tuple[RoundState, p.Activations, DeviceRound]


class StepServer:
    """The steps of this rank's devices: compute on worker threads, reply on the device's ``down``."""

    def __init__(self, trainer: SplitTrainer, link: MqttLink, topics: p.Topics, *, seed: int, workers: int,
                 batch: bool, lock: threading.Lock, counters: Counter[str], on_refused: Refused,
                 signer: p.SigningKey | None = None) -> None:
        self.trainer, self.link, self.topics, self.seed, self.batch = trainer, link, topics, seed, batch
        self.signer = signer  # signs every gradient and error report (None: unsigned mode)
        self.lock, self.counters, self.on_refused = lock, counters, on_refused
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sflam-step")
        self._futures: list[Future] = []
        self._pending: list[Item] = []
        self.replies: dict[str, p.Gradient] = {}

    def submit(self, state: RoundState, message: p.Activations, member: DeviceRound) -> None:
        """Queue one step (the caller holds ``lock``)."""
        if self.batch:
            self._pending.append((state, message, member))
            self._futures.append(self.pool.submit(self._drain))
        else:
            self._futures.append(self.pool.submit(self._serve, [(state, message, member)]))

    def _drain(self) -> None:
        with self.lock:
            items, self._pending = self._pending, []
        if items:
            self._serve(items)

    def _serve(self, items: list[Item]) -> None:
        """Worker thread: the steps of ``items`` (one, or several batched) and their gradients back."""
        requests = [StepRequest(m.envelope.device_id, m.tensor, m.labels.to_numpy(), member.allocation.bits_down,
                                "token" if member.allocation.per_token else "tensor",
                                step_generator(self.seed, m.envelope.round, m.envelope.device_id, m.envelope.step))
                    for _, m, member in items]
        for (state, message, member), result in zip(items, self._compute(requests)):
            env = message.envelope
            if not isinstance(result, StepResult):
                with self.lock:
                    self.counters["rejected.activations"] += 1
                    self.on_refused(state, env.device_id, f"bad activations: {result}")
                self.report(env.device_id, env.round, "bad_activations", str(result))
                continue
            self._reply(message, member, result)

    def _compute(self, requests: list[StepRequest]) -> list[StepResult | Exception]:
        if len(requests) > 1:
            try:
                return self.trainer.step_many(requests)
            except (StepError, ValueError) as exc:  # one malformed tensor: serve them one by one
                log.info("batched step refused (%s): serving its steps one by one", exc)
        results: list[StepResult | Exception] = []
        for r in requests:
            try:
                results.append(self.trainer.step(r.device_id, r.activations, r.labels, r.gradient_bits, r.per,
                                                 r.generator))
            except (StepError, ValueError) as exc:
                results.append(exc)
        return results

    def _reply(self, message: p.Activations, member: DeviceRound, result: StepResult) -> None:
        env = message.envelope
        reply = p.Gradient(p.Envelope(env.run_id, env.round, env.device_id, env.step), result.gradient, result.loss)
        with self.lock:
            member.server_time_s += result.server_time_s
            member.steps += 1
            self.replies[env.device_id] = reply
        t0 = time.perf_counter()
        try:
            sent = self.link.send(self.topics.down(env.device_id), reply, signer=self.signer)
        except TransportError as exc:  # the device re-sends the step; we answer from replies
            log.info("gradient for %s step %d not delivered: %s", env.device_id, env.step, exc)
            return
        with self.lock:
            member.downlink_time_s += time.perf_counter() - t0
            member.bytes_down += sent

    def reanswer(self, duplicate: p.Envelope) -> None:
        """A device re-sent a step we answered: send the same gradient again (the reply was lost)."""
        with self.lock:
            reply = self.replies.get(duplicate.device_id)
            if reply is None or (reply.envelope.round, reply.envelope.step) != (duplicate.round, duplicate.step):
                return
            self.counters["reanswered_steps"] += 1
            self._futures.append(self.pool.submit(self._resend, reply))

    def _resend(self, reply: p.Gradient) -> None:
        try:
            self.link.send(self.topics.down(reply.envelope.device_id), reply, signer=self.signer)
        except TransportError as exc:
            log.info("re-answer to %s not delivered: %s", reply.envelope.device_id, exc)

    def report(self, device_id: str, round_: int, code: str, detail: str) -> None:
        """Tell a device why its message was refused (best effort, never blocks the caller long)."""
        try:
            report = p.ErrorReport(p.Envelope(self.topics.run_id, round_, device_id), code, detail[:500])
            self.link.publish_nowait(self.topics.down(device_id), p.encode(report, self.signer))
        except (p.ProtocolError, ValueError) as exc:
            log.info("could not report %s to %r: %s", code, device_id, exc)

    def wait(self) -> None:
        """Until every queued step has been served."""
        while True:
            with self.lock:
                futures, self._futures = self._futures, []
            if not futures:
                return
            for future in futures:
                future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def receive(link: MqttLink, receiver: p.Receiver, steps: StepServer, timeout_s: float,
            seen: Callable[[object], None] | None = None) -> p.Message | None:
    """The next publish decoded: the message, or None when nothing came, it was refused (logged and
    counted by ``receiver``) or it repeated a step (answered again from ``steps``). ``seen`` gets
    every raw publish first (the daemon counts bytes there)."""
    incoming = link.get(timeout_s)
    if incoming is None:
        return None
    if seen is not None:
        seen(incoming)
    try:
        message = receiver.accept(incoming.payload, incoming.topic)
    except p.ProtocolError as exc:
        receiver.log_refusal(incoming.topic, exc)
        return None
    if message is None and receiver.last_duplicate is not None:
        steps.reanswer(receiver.last_duplicate)
    return message
