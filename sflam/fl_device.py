"""``sflam fl-device``: the federated-learning baseline's device, for ``sflam simulate --scheme fl``.

It is the split device loop of :mod:`edge_runtime.device` (Hello and heartbeats, retained status
and last will, plans, model versions, the emulated uplink, telemetry and energy accounting) with
one round replaced: the device downloads the **whole** global model, trains it locally for the
plan's epochs with SGD and momentum on its own batches (the same shuffling and preprocessing as a
split device), and uploads the whole model for the server to average (``training.mode = "fl"``).
There are no activations and no gradients on the wire.

It runs the model with torch, so it is a simulation baseline, not an edge runtime: the point of
SFLAM is that a real device does not have to do this.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime import protocol as p
from edge_runtime.augment import Augment
from edge_runtime.commands import cmd_device
from edge_runtime.data import check_against_plan
from edge_runtime.device import DeviceClient, RoundStats
from server_runtime.checkpoint import create_model
from server_runtime.presets import LAYOUT_FIELDS
from server_runtime.trainer import OptimizerSpec


@dataclass
class FLDeviceClient(DeviceClient):
    """A device that trains and uploads the whole model each round."""

    def __post_init__(self) -> None:
        super().__post_init__()
        torch.set_num_threads(self.threads or 1)
        self.preset = str(self.manifest["preset"])
        self.model: torch.nn.Module | None = None

    def _model_for(self, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        """The local model (built once, from the head's class count) holding ``weights``."""
        if self.model is None:
            head = weights.get("head.weight")
            if head is None:
                raise p.ProtocolError("FL model weights carry no head.weight: is the server in training.mode = 'fl'?")
            layout = {k: self.manifest.get("config", {}).get(k) for k in LAYOUT_FIELDS}  # a bundle's: its server's
            self.model = create_model(self.preset, num_classes=int(np.shape(head)[0]), layout=layout)
        state = {name: torch.from_numpy(np.array(value, np.float32)) for name, value in weights.items()}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:  # missing/unexpected names or shapes: another preset on the server
            raise p.ProtocolError(f"the global model does not fit this bundle's preset {self.preset!r}: {exc}") from None
        return self.model.train()

    def train_round(self, plan: p.RoundPlan) -> p.RoundUpdate:
        """Train the whole model locally, then publish it in a RoundUpdate."""
        round_, alloc = plan.envelope.round, self._allocation(plan)
        check_against_plan(self.data, plan.num_classes, plan.classes_digest)
        self.receiver.min_round = max(self.receiver.min_round, round_)
        model = self._model_for(self._wait_model(plan))
        optimizer = OptimizerSpec(plan.optimizer, plan.lr, plan.momentum, plan.weight_decay).build(model.parameters())
        self.uplink = self._uplink_for(alloc)
        stats, cpu0 = RoundStats(), time.process_time()
        sent0, recv0 = self.link.bytes_sent, self.link.bytes_received
        metering = self._start_meter()
        step = 0
        t0 = time.perf_counter()
        for epoch in range(plan.local_epochs):
            shuffle_rng, augment_rng = (np.random.default_rng((self.seed, round_, k, epoch)) for k in (0, 2))
            for images, labels in self.data.batches(plan.batch_size, shuffle_rng, augment=Augment.from_plan(plan),
                                                    augment_rng=augment_rng):
                loss = F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            self._check_superseded(round_)
        stats.compute_time_s = time.perf_counter() - t0
        stats.steps, stats.cpu_time_s = step, time.process_time() - cpu0
        compute_j, source = self._compute_energy(metering, stats)
        stats.bytes_sent, stats.bytes_received = self.link.bytes_sent - sent0, self.link.bytes_received - recv0
        weights = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}

        def make_update(telemetry: p.Telemetry) -> p.RoundUpdate:
            return p.RoundUpdate(self._env(round_, step), plan.model_version,
                                 self.data.samples_per_epoch(plan.batch_size), p.weights_from_numpy(weights), telemetry)

        return self._publish_update(plan, make_update, stats, alloc, compute_j, source)


def cmd_fl_device(args: argparse.Namespace) -> int:
    """Handler of ``sflam fl-device``: the device loop with whole-model rounds (numpy backend unused)."""
    args.backend = "numpy"  # the bundle's graphs are not used; no runtime session to open
    return cmd_device(args, client_class=FLDeviceClient)
