"""FedAvg over model copies: pure functions, weights by sample count.

Every copy contributes its own tensors (no aliasing: the SFLAM paper code's copies share one
state dict, which makes its "average" the last device's model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


class AggregationError(ValueError):
    """Copies that cannot be averaged (no copies, mismatched keys or shapes, bad weights)."""


def fedavg(states: Sequence[StateDict], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of ``states``; integer tensors are taken from the first copy."""
    if not states:
        raise AggregationError("nothing to aggregate: no model copies were given")
    if len(states) != len(num_samples):
        raise AggregationError(f"{len(states)} copies but {len(num_samples)} sample counts")
    if any(n < 0 for n in num_samples) or sum(num_samples) <= 0:
        raise AggregationError(f"sample counts must be >= 0 with a positive total, got {list(num_samples)}")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise AggregationError(f"copy {index} has other keys than copy 0")
    total = float(sum(num_samples))
    weights = [n / total for n in num_samples]
    return {key: _weighted_mean([s[key] for s in states], weights, key) for key in keys}


def _weighted_mean(tensors: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise AggregationError(f"{key}: copies have different shapes")
    if not first.is_floating_point():
        return first.clone()
    acc = torch.zeros_like(first, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        acc.add_(tensor.detach().to(torch.float64), alpha=weight)
    return acc.to(first.dtype)
