"""The server half of split training: one server copy per device (SFL-V1) or one shared (SFL-V2).

Per activation batch: dequantize -> forward the server part -> cross-entropy -> backward ->
optimizer step -> d loss / d activation back (optionally quantized). Optimizers live as long as
their copy: a V1 copy's for the round (a copy starts from the global model every round), the
V2 shared optimizer for the whole run (checkpointed). That differs from the SFLAM paper code,
which rebuilds the optimizer every batch and so never lets momentum act.

Round end: :meth:`SplitTrainer.finish_round` averages the device parts the devices uploaded
and, in V1, the server copies of the devices that completed (FedAvg by sample count); devices
that failed contribute nothing. A round that does not count restores the round-start state.

Mode ``fl`` is the federated-learning baseline through the same daemon: the "device part" is the
whole model, devices (``sflam fl-device``) train it locally and upload it, the server only
averages; it trains nothing and refuses activations.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.quantize import QuantizedTensor
from server_runtime.aggregate import fedavg
from server_runtime.config import MODES, OPTIMIZERS
from server_runtime.quantize_torch import dequantize_torch, quantize_torch
from server_runtime.split import ServerPart, split
from server_runtime.vit import VisionTransformer

log = logging.getLogger(__name__)


class StepError(ValueError):
    """An activation batch the server cannot train on (wrong shape, labels out of range)."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer the server copies use, with its hyperparameters."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    def build(self, params) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params``."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")


@dataclass(frozen=True)
class StepResult:
    """What one server step returns to the device, and what it cost."""

    gradient: QuantizedTensor
    loss: float
    server_time_s: float


class ServerCopy:
    """One trainable server part with its optimizer; a lock serializes steps on it."""

    def __init__(self, part: ServerPart, optimizer: torch.optim.Optimizer) -> None:
        self.part, self.optimizer = part, optimizer
        self.lock = threading.Lock()
        self.losses: list[float] = []


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"compute device {name!r} requested but CUDA is not available")
    return device


def use_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast: ``bf16`` always, ``auto`` on CUDA only, ``off`` never."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


class SplitTrainer:
    """Holds the global model and trains the server side of every selected device."""

    def __init__(self, model: VisionTransformer, mode: str = "v1", optimizer: OptimizerSpec = OptimizerSpec(),
                 device: torch.device | str = "cpu", bf16: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"SFL mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.mode, self.spec, self.bf16 = mode, optimizer, bf16
        self.halves = split(self.model)
        self.tokens_shape = self.halves.device.output_shape
        # what devices download, train and upload: the patch embedding, or (FL) the whole model
        self.device_module: torch.nn.Module = self.model if mode == "fl" else self.halves.device
        self.num_classes = int(self.model.config.num_classes)
        self.copies: dict[str, ServerCopy] = {}
        self.shared: ServerCopy | None = None
        self._snapshot: tuple[dict, dict] | None = None
        if mode == "v2":
            self.shared = ServerCopy(self.halves.server, optimizer.build(self.halves.server.parameters()))

    # -- round lifecycle -----------------------------------------------------------------------

    def device_weights(self) -> dict[str, np.ndarray]:
        """The global device part as float32 numpy arrays (what ``ModelWeights`` carries)."""
        return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in self.device_module.state_dict().items()}

    def begin_round(self, device_ids: Sequence[str], lr: float | None = None) -> None:
        """Prepare the server copies of the selected devices (V1) or snapshot the shared one (V2);
        ``lr``: this round's learning rate (a schedule's), for the copies' optimizers from now on."""
        self.copies = {}
        if lr is not None:
            self.spec = replace(self.spec, lr=lr)
            if self.shared is not None:
                for group in self.shared.optimizer.param_groups:
                    group["lr"] = lr
        if self.mode == "fl":
            return
        if self.mode == "v1":
            for device_id in device_ids:
                part = copy.deepcopy(self.halves.server).train()
                self.copies[device_id] = ServerCopy(part, self.spec.build(part.parameters()))
        elif self.shared is not None:
            self.shared.part.train()
            self.shared.losses = []
            self._snapshot = (copy.deepcopy(self.halves.server.state_dict()),
                              copy.deepcopy(self.shared.optimizer.state_dict()))
            self.copies = {device_id: self.shared for device_id in device_ids}

    def step(self, device_id: str, activations: QuantizedTensor, labels: np.ndarray, gradient_bits: int,
             per: str = "tensor", generator: torch.Generator | None = None) -> StepResult:
        """Train the device's server copy on one batch; return the (quantized) activation gradient."""
        if self.mode == "fl":
            raise StepError("federated learning (mode fl): devices train the whole model; no activations")
        server = self.copies.get(device_id)
        if server is None:
            raise StepError(f"device {device_id!r} is not training in this round")
        self._check_batch(activations, labels)
        start = time.perf_counter()
        with server.lock:
            x = dequantize_torch(activations, self.device).requires_grad_(True)
            y = torch.as_tensor(np.array(labels, dtype=np.int64), device=self.device)
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
            with autocast:
                logits = server.part(x)
            loss = F.cross_entropy(logits.float(), y)
            server.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            server.optimizer.step()
            server.losses.append(float(loss.detach()))
            grad = x.grad.detach().float()
        packed = quantize_torch(grad, gradient_bits, per=per, generator=generator)
        return StepResult(packed, server.losses[-1], time.perf_counter() - start)

    def _check_batch(self, activations: QuantizedTensor, labels: np.ndarray) -> None:
        shape, labels = tuple(activations.shape), np.asarray(labels)
        problems = []
        if len(shape) != 3 or shape[1:] != self.tokens_shape or shape[0] < 1:
            problems.append(f"activations must be (batch, {self.tokens_shape[0]}, {self.tokens_shape[1]}), got {shape}")
        if labels.ndim != 1 or (len(shape) >= 1 and labels.shape[0] != shape[0]):
            problems.append(f"labels must be ({shape[0] if shape else '?'},), got {labels.shape}")
        elif not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < 0 or labels.max() >= self.num_classes)):
            problems.append(f"labels must be integers in [0, {self.num_classes})")
        if problems:
            raise StepError("; ".join(problems))

    def train_loss(self, device_ids: Sequence[str]) -> float | None:
        """Mean server loss over the steps of ``device_ids`` this round (None without steps)."""
        seen: set[int] = set()
        losses: list[float] = []
        for device_id in device_ids:
            server = self.copies.get(device_id)
            if server is not None and id(server) not in seen:
                seen.add(id(server))
                losses += server.losses
        return float(np.mean(losses)) if losses else None

    def finish_round(self, updates: Mapping[str, tuple[Mapping[str, np.ndarray], int]]) -> None:
        """Aggregate the completed devices' uploads ({id: (device weights, samples)}) into the global model."""
        if not updates:
            raise ValueError("finish_round needs at least one completed device; use abort_round")
        ids = sorted(updates)
        counts = [int(updates[d][1]) for d in ids]
        device_states = [self._device_state(updates[d][0]) for d in ids]
        self.device_module.load_state_dict(fedavg(device_states, counts))
        if self.mode == "v1":
            states = [self.copies[d].part.state_dict() for d in ids]
            self.halves.server.load_state_dict(fedavg(states, counts))
        self.copies, self._snapshot = {}, None

    def abort_round(self) -> None:
        """Leave the global model as it was at round start (V2: restore the shared copy)."""
        if self.shared is not None and self._snapshot is not None:
            self.halves.server.load_state_dict(self._snapshot[0])
            self.shared.optimizer.load_state_dict(self._snapshot[1])
        self.copies, self._snapshot = {}, None

    def _device_state(self, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Uploaded device weights as tensors, checked against the device part's names and shapes."""
        expected = self.device_module.state_dict()
        if set(weights) != set(expected):
            raise StepError(f"device weights must be {sorted(expected)}, got {sorted(weights)}")
        out = {}
        for name, ref in expected.items():
            value = torch.as_tensor(np.array(weights[name], dtype=np.float32), device=self.device)
            if tuple(value.shape) != tuple(ref.shape):
                raise StepError(f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
            if not torch.isfinite(value).all():
                raise StepError(f"{name}: non-finite values")
            out[name] = value.to(ref.dtype)
        return out

    def check_device_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """StepError unless ``weights`` fit the device part (names, shapes, finite values)."""
        self._device_state(weights)

    # -- evaluation and state ------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
        """(accuracy, mean loss) of the global model (aggregated device part + server part)."""
        self.model.eval()
        correct, loss_sum, count = 0, 0.0, 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        for images, labels in batches:
            x = torch.as_tensor(images, device=self.device)
            y = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
            with autocast:
                logits = self.model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += len(labels)
        self.model.train()
        if count == 0:
            raise ValueError("evaluation set is empty")
        return correct / count, loss_sum / count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global model's state (CPU tensors)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict | None:
        """The shared V2 optimizer's state (None in V1, whose optimizers live one round)."""
        return None if self.shared is None else self.shared.optimizer.state_dict()

    def load(self, model_state: Mapping[str, torch.Tensor], optimizer_state: dict | None) -> None:
        """Restore a checkpointed global model (and the V2 optimizer)."""
        self.model.load_state_dict(dict(model_state))
        if self.shared is not None and optimizer_state is not None:
            self.shared.optimizer.load_state_dict(optimizer_state)
