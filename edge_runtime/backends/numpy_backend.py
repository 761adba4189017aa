"""The reference backend: the three device graphs in plain numpy, runnable on any device.

Same math and float32 operation order as ``export.graphs`` (patch embedding as a matrix
product, the quantizer of ``edge_runtime.quantize.encode_codes``, SGD with momentum as
``torch.optim.SGD``), so its outputs match the exported artifacts to rounding.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.base import Array, BackendError

_F32 = np.float32


def _f32(name: str, value: Array, ndim: int) -> np.ndarray:
    """``value`` as a float32 array of ``ndim`` dimensions, else BackendError."""
    array = np.asarray(value, dtype=_F32)
    if array.ndim != ndim:
        raise BackendError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _checked(images: Array, weight: Array, bias: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (B, C, H, W), weight (D, C, p, p) and bias (D,) that fit together."""
    images, weight, bias = _f32("images", images, 4), _f32("weight", weight, 4), _f32("bias", bias, 1)
    dim, chans, patch, patch_w = weight.shape
    problems = []
    if patch != patch_w:
        problems.append(f"the kernel must be square, got {patch}x{patch_w}")
    if images.shape[1] != chans:
        problems.append(f"images have {images.shape[1]} channels, the weight expects {chans}")
    if images.shape[2] % patch or images.shape[3] % patch:
        problems.append(f"image size {images.shape[2:]} is not a multiple of the patch {patch}")
    if bias.shape != (dim,):
        problems.append(f"bias must have shape ({dim},), got {bias.shape}")
    if problems:
        raise BackendError("; ".join(problems))
    return images, weight, bias


def patch_matrix(images: np.ndarray, patch: int) -> np.ndarray:
    """Images (B, C, H, W) -> patches (B * N, C * p * p) in the conv weight's (c, i, j) order."""
    batch, chans, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch, chans, grid_h, patch, grid_w, patch)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, Gh, Gw, C, p, p)
    return x.reshape(batch * grid_h * grid_w, chans * patch * patch)


def quantize_codes(
    tokens: np.ndarray, noise: np.ndarray, levels: float, per_token: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """floor((x - lo) / delta + u) clipped to [0, levels]; lo and hi as (B, N, 1)."""
    if per_token:
        lo, hi = tokens.min(axis=2, keepdims=True), tokens.max(axis=2, keepdims=True)
    else:
        shape = (*tokens.shape[:2], 1)
        lo, hi = np.full(shape, tokens.min(), _F32), np.full(shape, tokens.max(), _F32)
    level = _F32(levels)
    delta = (hi - lo) / level
    codes = np.subtract(tokens, lo, dtype=_F32)
    codes /= np.where(delta > 0, delta, _F32(1))
    codes += noise
    np.floor(codes, out=codes)
    np.clip(codes, _F32(0), level, out=codes)
    return codes, lo, hi


class NumpyBackend:
    """The device graphs of docs/export.md section 3 in numpy (float32)."""

    name = "numpy"

    def embed(self, images: Array, weight: Array, bias: Array) -> Array:
        """images (B, C, H, W) -> tokens (B, N, D) = patches @ W.reshape(D, -1).T + b."""
        images, weight, bias = _checked(images, weight, bias)
        dim, patch = weight.shape[0], weight.shape[-1]
        tokens = patch_matrix(images, patch) @ weight.reshape(dim, -1).T + bias
        return tokens.reshape(images.shape[0], -1, dim)

    def forward(
        self, images: Array, weight: Array, bias: Array, noise: Array, levels: float, per_token: bool
    ) -> tuple[Array, Array, Array]:
        """-> codes (B, N, D) as float values 0..levels, lo and hi (B, N, 1)."""
        tokens = self.embed(images, weight, bias)
        noise = _f32("noise", noise, 3)
        if noise.shape != tokens.shape:
            raise BackendError(f"noise must have the tokens' shape {tokens.shape}, got {noise.shape}")
        if not levels >= 1:
            raise BackendError(f"levels (2^q - 1) must be >= 1, got {levels}")
        return quantize_codes(tokens, noise, levels, per_token)

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
        """One SGD-with-momentum step (no dampening, no Nesterov) from d loss / d tokens."""
        images, weight, bias = _checked(images, weight, bias)
        momentum_weight = _f32("momentum_weight", momentum_weight, 4)
        momentum_bias = _f32("momentum_bias", momentum_bias, 1)
        if momentum_weight.shape != weight.shape or momentum_bias.shape != bias.shape:
            raise BackendError("momentum buffers must have the shapes of weight and bias")
        dim, patch = weight.shape[0], weight.shape[-1]
        patches = patch_matrix(images, patch)
        grads = _f32("grad_tokens", grad_tokens, 3)
        if grads.shape != (images.shape[0], patches.shape[0] // images.shape[0], dim):
            raise BackendError(f"grad_tokens shape {grads.shape} does not match the tokens of these images")
        grads = grads.reshape(-1, dim)
        grad_weight = (grads.T @ patches).reshape(weight.shape)
        new_mw = _F32(momentum) * momentum_weight + grad_weight
        new_mb = _F32(momentum) * momentum_bias + grads.sum(axis=0)
        return weight - _F32(lr) * new_mw, bias - _F32(lr) * new_mb, new_mw, new_mb
