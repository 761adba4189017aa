"""FedAvg over model copies: pure functions, weights by sample count; and the broadcast's precision.

Every copy contributes its own tensors (no aliasing: the SFLAM paper code's copies share one
state dict, which makes its "average" the last device's model).

**The exactness rule of a reduced-precision broadcast** (``quant.model_bits = 16``): a device
trains from the float16 weights it decoded, within float16's rounding (relative 2^-11, or 2^-24
absolute below float16's normal range) of the server's float32 ones, and uploads what it trained
in float32; FedAvg averages exactly those uploads, so the rounding of one broadcast becomes part of
the next global model and never accumulates on the server's side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

FLOAT16_MAX = float(np.finfo(np.float16).max)

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


def broadcast_weights(weights: Mapping[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """The global device weights as a round broadcasts them: float32, or float16 with ``bits`` 16 (a
    tensor float16 cannot hold, with a value beyond +-65504, stays float32)."""
    if bits == 32:
        return {name: np.asarray(value, np.float32) for name, value in weights.items()}
    if bits != 16:
        raise ValueError(f"model bits must be 16 or 32, got {bits!r}")
    return {name: np.asarray(value, np.float16 if np.all(np.abs(value) <= FLOAT16_MAX) else np.float32)
            for name, value in weights.items()}
