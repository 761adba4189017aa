"""``sflam quickstart``: split federated training (SFL-V1) of a small ViT in one process.

The most end-to-end thing the foundation offers: real data, a Dirichlet split over devices, the
SFLAM cut, per-device server copies, persistent optimizers and sample-weighted FedAvg. What
crosses the cut here is an in-memory fp32 tensor; the quantizer, MQTT and the allocator replace
that hop in later stages (``sflam simulate``).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from server_runtime.aggregate import fedavg
from server_runtime.checkpoint import create_model
from server_runtime.data import BatchLoader, ImageSet, load_dataset, partition
from server_runtime.split import split
from server_runtime.vit import VisionTransformer


@dataclass(frozen=True)
class RoundResult:
    """What one round did and measured."""

    round: int
    devices: tuple[int, ...]
    samples: int
    train_loss: float
    test_accuracy: float
    test_loss: float
    seconds: float


def _loader(model: VisionTransformer, data: ImageSet, batch_size: int, shuffle: bool, seed: int) -> BatchLoader:
    cfg = model.config
    return BatchLoader(data, batch_size=batch_size, image_size=cfg.img_size, mean=cfg.mean, std=cfg.std, shuffle=shuffle, seed=seed)


def train_device(model: VisionTransformer, data: ImageSet, args: argparse.Namespace, seed: int) -> float:
    """One device's local epochs, split at the cut; returns the mean training loss."""
    halves = split(model)
    device_opt = torch.optim.SGD(halves.device.parameters(), lr=args.lr, momentum=0.9)
    server_opt = torch.optim.SGD(halves.server.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for epoch in range(args.local_epochs):
        for x, y in _loader(model, data, args.batch_size, True, seed + epoch):
            tokens = halves.device(x)
            sent = tokens.detach().requires_grad_(True)  # the activation that crosses the network
            loss = F.cross_entropy(halves.server(sent), y)
            server_opt.zero_grad()
            loss.backward()
            server_opt.step()
            device_opt.zero_grad()
            tokens.backward(sent.grad)  # the activation gradient sent back to the device
            device_opt.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(model: VisionTransformer, data: ImageSet, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of the aggregated model on ``data``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for x, y in _loader(model, data, batch_size, False, 0):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    return correct / len(data), loss_sum / len(data)


def run_round(model: VisionTransformer, shards: list[ImageSet], chosen: np.ndarray, args: argparse.Namespace, rnd: int) -> tuple[dict, float, int]:
    """Train a copy per chosen device (SFL-V1), then FedAvg; returns (state, loss, samples)."""
    states, counts, losses = [], [], []
    for device in chosen:
        local = copy.deepcopy(model).train()
        losses.append(train_device(local, shards[device], args, seed=args.seed + 1000 * rnd + int(device)))
        states.append(local.state_dict())
        counts.append(len(shards[device]))
    return fedavg(states, counts), float(np.average(losses, weights=counts)), sum(counts)


def quickstart(args: argparse.Namespace) -> list[RoundResult]:
    """Run the preview and return one result per round (printing a progress line each)."""
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, seed=args.seed)
    model = create_model(args.model, num_classes=data.train.num_classes, seed=args.seed)
    parts = partition(data.train.labels, args.devices, "dirichlet", alpha=args.alpha, seed=args.seed)
    shards = [data.train.subset(p) for p in parts]
    rng = np.random.default_rng(args.seed)
    per_round = min(args.per_round, args.devices)
    print(f"{data.name}: {len(data.train)} train / {len(data.test)} test images, {args.devices} devices "
          f"(Dirichlet alpha={args.alpha}, sizes {min(map(len, shards))}-{max(map(len, shards))}), "
          f"{per_round} per round, model {model.config.name}")
    results = []
    for rnd in range(1, args.rounds + 1):
        start = time.perf_counter()
        chosen = np.sort(rng.choice(args.devices, size=per_round, replace=False))
        state, loss, samples = run_round(model, shards, chosen, args, rnd)
        model.load_state_dict(state)
        accuracy, test_loss = evaluate(model, data.test)
        results.append(RoundResult(rnd, tuple(int(c) for c in chosen), samples, loss, accuracy, test_loss, time.perf_counter() - start))
        print(f"round {rnd:>3}/{args.rounds}  devices {list(results[-1].devices)}  train loss {loss:.3f}  "
              f"test acc {accuracy:6.2%}  ({results[-1].seconds:.1f} s)", flush=True)
    return results


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Handler of ``sflam quickstart``."""
    if args.per_round > args.devices:
        raise ValueError(f"--per-round {args.per_round} exceeds --devices {args.devices}")
    print("sflam quickstart: in-process split federated preview (SFL-V1, fp32 activations).")
    print("The quantizer, MQTT transport and allocator are not wired in yet; see README.\n")
    results = quickstart(args)
    total = sum(r.seconds for r in results)
    best = max(r.test_accuracy for r in results)
    print(f"\nfinal test accuracy {results[-1].test_accuracy:.2%} (best {best:.2%}) after {len(results)} rounds, "
          f"{total:.1f} s in all")
    return 0
