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
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.quantize import QuantizedTensor
from server_runtime.aggregate import fedavg
from server_runtime.batched import batched_step
from server_runtime.config import MODES, OPTIMIZERS
from server_runtime.quantize_torch import dequantize_torch, quantize_torch
from server_runtime.split import ServerPart, split
from server_runtime.vit import VisionTransformer

log = logging.getLogger(__name__)


Reduce = Callable[[torch.Tensor], torch.Tensor]  # a float64 vector -> its sum over the trainer ranks


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
class StepRequest:
    """One pending activation batch of one device (what :meth:`SplitTrainer.step_many` takes)."""

    device_id: str
    activations: QuantizedTensor
    labels: np.ndarray
    gradient_bits: int
    per: str = "tensor"
    generator: torch.Generator | None = None


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


def step_generator(seed: int, plan_round: int, device_id: str, step: int) -> torch.Generator:
    """The CPU generator of one step's gradient quantization noise, seeded by (seed, plan round,
    device, step): a gradient's codes do not depend on which rank or thread served the step, nor
    in which order steps of several devices ran."""
    generator = torch.Generator()
    generator.manual_seed(hash((seed, plan_round, zlib.crc32(device_id.encode()), step)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


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
        server = self._copy_for(device_id, activations, labels)
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

    def step_many(self, requests: Sequence[StepRequest]) -> list[StepResult | StepError]:
        """Steps of several devices at once, results in request order (a refused batch's entry is
        its StepError). In V1, requests with equal batch shapes run as one batched computation
        (:func:`server_runtime.batched.batched_step`); the rest, and every V2 step (one shared
        copy is sequential by definition), run one by one. Each result's ``server_time_s`` is
        its share of the batched computation's wall time."""
        results: list[StepResult | StepError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            try:
                self._copy_for(request.device_id, request.activations, request.labels)
            except StepError as exc:
                results[index] = exc
                continue
            groups.setdefault(tuple(request.activations.shape), []).append(index)
        for indices in groups.values():
            ids = [requests[i].device_id for i in indices]
            if self.mode != "v1" or len(indices) < 2 or len(set(ids)) < len(ids):
                for i in indices:
                    r = requests[i]
                    results[i] = self.step(r.device_id, r.activations, r.labels, r.gradient_bits, r.per, r.generator)
                continue
            for i, result in zip(indices, self._step_batched([requests[i] for i in indices])):
                results[i] = result
        return results  # type: ignore[return-value]

    def _step_batched(self, requests: list[StepRequest]) -> list[StepResult]:
        copies = [self.copies[r.device_id] for r in requests]
        start = time.perf_counter()
        locked = [self.copies[d] for d in sorted({r.device_id for r in requests})]  # one order: no deadlock
        for server in locked:
            server.lock.acquire()
        try:
            xs = torch.stack([dequantize_torch(r.activations, self.device) for r in requests])
            ys = torch.stack([torch.as_tensor(np.array(r.labels, dtype=np.int64), device=self.device) for r in requests])
            grads, losses = batched_step(copies, xs, ys, self.bf16)
            for server, loss in zip(copies, losses.tolist()):
                server.losses.append(loss)
        finally:
            for server in locked:
                server.lock.release()
        packed = [quantize_torch(g, r.gradient_bits, per=r.per, generator=r.generator) for g, r in zip(grads, requests)]
        share = (time.perf_counter() - start) / len(requests)
        return [StepResult(q, server.losses[-1], share) for q, server in zip(packed, copies)]

    def _copy_for(self, device_id: str, activations: QuantizedTensor, labels: np.ndarray) -> ServerCopy:
        """The device's server copy, once its batch is checked; StepError otherwise."""
        if self.mode == "fl":
            raise StepError("federated learning (mode fl): devices train the whole model; no activations")
        server = self.copies.get(device_id)
        if server is None:
            raise StepError(f"device {device_id!r} is not training in this round")
        self._check_batch(activations, labels)
        return server

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

    def finish_round(self, updates: Mapping[str, tuple[Mapping[str, np.ndarray], int]], *,
                     counts: Mapping[str, int] | None = None, reduce: Reduce | None = None,
                     coordinator: bool = True) -> None:
        """Aggregate the completed devices' uploads ({id: (device weights, samples)}) into the global model.

        Several trainer ranks (``reduce`` sums a float64 vector over them): ``counts`` names every
        completed device with its samples; each rank adds (n / total) x its own V1 copies, the
        ``coordinator`` (rank 0) also the uploaded device parts and the V2 shared copy, and the
        reduce turns those partial sums into the FedAvg every rank loads."""
        counts = dict(counts) if counts is not None else {d: int(n) for d, (_, n) in updates.items()}
        if not counts:
            raise ValueError("finish_round needs at least one completed device; use abort_round")
        if reduce is not None:
            self._load_vector(reduce(self._partial_sums(updates, counts, coordinator)))
        else:
            ids = sorted(updates)
            samples = [int(updates[d][1]) for d in ids]
            device_states = [self._device_state(updates[d][0]) for d in ids]
            self.device_module.load_state_dict(fedavg(device_states, samples))
            if self.mode == "v1":
                states = [self.copies[d].part.state_dict() for d in ids]
                self.halves.server.load_state_dict(fedavg(states, samples))
        self.copies, self._snapshot = {}, None

    def _partial_sums(self, updates: Mapping[str, tuple[Mapping[str, np.ndarray], int]], counts: Mapping[str, int],
                      coordinator: bool) -> torch.Tensor:
        """This rank's share of the round's FedAvg, as one float64 vector in the model's key order."""
        total = float(sum(counts.values()))
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self._float_state().items()}

        def add(state: Mapping[str, torch.Tensor], weight: float) -> None:
            for key, value in state.items():
                if key in sums:
                    sums[key].add_(value.detach().to(torch.float64), alpha=weight)

        if coordinator:
            for d in sorted(updates):
                add(self._device_state(updates[d][0]), counts[d] / total)
            if self.mode == "v2":
                add(self.halves.server.state_dict(), 1.0)
        if self.mode == "v1":
            for d in sorted(set(self.copies) & set(counts)):
                add(self.copies[d].part.state_dict(), counts[d] / total)
        return torch.cat([t.reshape(-1) for t in sums.values()])

    def _float_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def _load_vector(self, vector: torch.Tensor) -> None:
        state, offset = self._float_state(), 0
        with torch.no_grad():
            for value in state.values():
                value.copy_(vector[offset:offset + value.numel()].reshape(value.shape).to(value.dtype))
                offset += value.numel()

    def sync(self, reduce: Reduce, coordinator: bool) -> None:
        """Every rank takes the coordinator's global model (start of a run, or after a resume)."""
        state = self._float_state()
        vector = torch.cat([v.detach().to(torch.float64).reshape(-1) for v in state.values()])
        self._load_vector(reduce(vector if coordinator else torch.zeros_like(vector)))

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
