"""The one interface every device backend implements (numpy arrays in and out, float32)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

Array = np.ndarray

# signature -> (input names, output names) of the device graphs (``export.graphs``): the names
# every exported file and every backend uses. Defined once here, on the device side.
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "embed": (("images", "weight", "bias"), ("tokens",)),
    "forward": (("images", "weight", "bias", "noise", "levels", "per_token"), ("codes", "lo", "hi")),
    "train_step": (
        ("weight", "bias", "momentum_weight", "momentum_bias", "images", "grad_tokens", "lr", "momentum"),
        ("new_weight", "new_bias", "new_momentum_weight", "new_momentum_bias"),
    ),
}


class BackendError(RuntimeError):
    """A backend that cannot load or run a bundle's artifact."""


class Backend(Protocol):
    """The three device graphs of docs/export.md section 3 (see ``export.graphs`` for the math)."""

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
