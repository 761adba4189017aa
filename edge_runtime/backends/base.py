"""The one interface every device backend implements (numpy arrays in and out, float32)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

Array = np.ndarray


class BackendError(RuntimeError):
    """A backend that cannot load or run a bundle's artifact."""


class Backend(Protocol):
    """The three device graphs of DESIGN.md section 6 (see ``export.graphs`` for the math)."""

    name: str

    def embed(self, images: Array, weight: Array, bias: Array) -> Array:
        """images (B, C, H, W) -> tokens (B, N, D)."""
        ...

    def forward(
        self, images: Array, weight: Array, bias: Array, noise: Array, levels: float, per_token: bool
    ) -> tuple[Array, Array, Array]:
        """-> codes (B, N, D) as float values 0..levels, lo and hi (B, N, 1)."""
        ...

    def train_step(
        self,
        weight: Array,
        bias: Array,
        momentum_weight: Array,
        momentum_bias: Array,
        images: Array,
        grad_tokens: Array,
        lr: float,
        momentum: float,
    ) -> tuple[Array, Array, Array, Array]:
        """-> updated weight, bias, momentum_weight, momentum_bias."""
        ...
