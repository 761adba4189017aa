"""The device's optimizer: the one the round plan names, so both halves of the model train alike.

The server trains its part with ``training.optimizer`` (``sgd``, ``adam`` or ``adamw``, with
``training.momentum`` and ``training.weight_decay``), and every RoundPlan carries the optimizer,
this round's learning rate, momentum and weight decay (docs/protocol.md 4.3). The device's
``train_step`` graph is one SGD-with-momentum step (docs/export.md), so:

- SGD without weight decay is the graph's own step, as exported;
- anything else takes the plain gradient from the same graph (learning rate 0, momentum 0 and
  zero buffers: its new momentum *is* the gradient) and applies torch's update in float32 numpy:
  SGD with L2 weight decay (``g + wd * w`` into the momentum), Adam with L2 weight decay, AdamW
  with decoupled decay, Adam's betas and epsilon at torch's defaults.

State (momentum, Adam's moments and step count) lives for one round, as the server's SFL-V1
copies do: a device starts every round from the global weights with fresh state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime.backends.base import Array, Backend
from edge_runtime.protocol import OPTIMIZER_CODES, RoundPlan

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the server's optimizers use
ADAM_EPS = 1e-8
_F32 = np.float32


@dataclass
class DeviceOptimizer:
    """One round's optimizer over the device parameters (weight, bias)."""

    name: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    steps: int = 0
    _buffers: dict[str, list[Array]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_CODES:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_CODES)}, got {self.name!r}")

    @classmethod
    def for_plan(cls, plan: RoundPlan) -> "DeviceOptimizer":
        """The optimizer ``plan`` asks for, with fresh state."""
        return cls(plan.optimizer, plan.lr, plan.momentum, plan.weight_decay)

    def step(self, engine: Backend, weight: Array, bias: Array, images: Array, grad_tokens: Array) -> tuple[Array, Array]:
        """One step from d loss / d tokens of ``images``: the updated (weight, bias)."""
        self.steps += 1
        if self.name == "sgd" and self.weight_decay == 0.0:
            mw, mb = self._state("momentum", weight, bias)
            weight, bias, mw, mb = engine.train_step(weight, bias, mw, mb, images, grad_tokens, self.lr, self.momentum)
            self._buffers["momentum"] = [mw, mb]
            return weight, bias
        zeros = [np.zeros_like(weight), np.zeros_like(bias)]
        _, _, grad_w, grad_b = engine.train_step(weight, bias, *zeros, images, grad_tokens, 0.0, 0.0)
        params, grads = [weight, bias], [np.asarray(grad_w, _F32), np.asarray(grad_b, _F32)]
        if self.name == "sgd":
            return tuple(self._sgd(params, grads))
        return tuple(self._adam(params, grads))

    def _state(self, key: str, weight: Array, bias: Array) -> list[Array]:
        if key not in self._buffers:
            self._buffers[key] = [np.zeros_like(weight, _F32), np.zeros_like(bias, _F32)]
        return self._buffers[key]

    def _sgd(self, params: list[Array], grads: list[Array]) -> list[Array]:
        """torch.optim.SGD: d = g + wd w; buf = momentum buf + d; w -= lr buf."""
        lr, mu, wd = _F32(self.lr), _F32(self.momentum), _F32(self.weight_decay)
        buffers = self._state("momentum", *params)
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + wd * p
            buffers[i] = mu * buffers[i] + d
            out.append(p - lr * buffers[i])
        return out

    def _adam(self, params: list[Array], grads: list[Array]) -> list[Array]:
        """torch.optim.Adam (L2 decay in the gradient) or AdamW (decoupled decay), no amsgrad."""
        lr, wd = _F32(self.lr), _F32(self.weight_decay)
        beta1, beta2 = ADAM_BETAS
        m, v = self._state("exp_avg", *params), self._state("exp_avg_sq", *params)
        step_size = lr / _F32(1 - beta1**self.steps)
        correction2 = _F32(np.sqrt(1 - beta2**self.steps))
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if self.name == "adamw":
                p = p * (_F32(1) - lr * wd)
            elif wd:
                g = g + wd * p
            m[i] = _F32(beta1) * m[i] + _F32(1 - beta1) * g
            v[i] = _F32(beta2) * v[i] + _F32(1 - beta2) * g * g
            denom = np.sqrt(v[i]) / correction2 + _F32(ADAM_EPS)
            out.append((p - step_size * m[i] / denom).astype(_F32))
        return out
