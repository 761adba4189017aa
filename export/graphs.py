"""The device graphs every export format is made from, as plain torch modules.

Weights are graph *inputs*, so a device that trains never needs a re-export:

- ``EmbedGraph``: images, weight, bias -> patch tokens (B, N, D)  (the forward alone)
- ``ForwardGraph``: images, weight, bias, noise, levels, per_token -> codes, lo, hi
  (embedding + the stochastic quantizer of ``edge_runtime.quantize``; ``levels`` = 2^q - 1 and
  ``per_token`` (0/1) come from the round plan, so one graph serves every allocation)
- ``TrainStepGraph``: weight, bias, momentum buffers, images, d loss / d tokens, lr, momentum
  -> updated weight, bias and buffers: SGD with momentum written from the patch-embedding
  algebra (tokens = patches @ W^T + b), stateless, no training framework on the device.

The noise U[0,1) is an input in every format: runtimes then agree code for code (the device
draws it with numpy), and microcontroller runtimes have no RANDOM_UNIFORM anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_tokens(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The patch embedding: Conv2d with kernel = stride = patch, flattened to (B, N, D)."""
    patch = weight.shape[-1]
    return F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)


def quantize_codes(
    tokens: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, per_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """floor((x - lo) / delta + u) clipped to [0, levels]; lo/hi broadcast to (B, N, 1).

    The operations and their order are those of ``edge_runtime.quantize.encode_codes`` so the
    exported graphs decode to the reference's values (codes may differ by one on boundaries).
    """
    lo_token, hi_token = tokens.amin(dim=2, keepdim=True), tokens.amax(dim=2, keepdim=True)
    lo_tensor = tokens.amin().reshape(1, 1, 1).expand_as(lo_token)
    hi_tensor = tokens.amax().reshape(1, 1, 1).expand_as(hi_token)
    token_wise = per_token.reshape(1, 1, 1) > 0.5
    lo = torch.where(token_wise, lo_token, lo_tensor)
    hi = torch.where(token_wise, hi_token, hi_tensor)
    delta = (hi - lo) / levels.reshape(1, 1, 1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    codes = torch.floor((tokens - lo) / safe + noise)
    codes = torch.minimum(torch.maximum(codes, torch.zeros_like(codes)), levels.reshape(1, 1, 1).expand_as(codes))
    return codes, lo, hi


class EmbedGraph(nn.Module):
    """images, weight, bias -> tokens (B, N, D)."""

    def forward(self, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return patch_tokens(images, weight, bias)


class ForwardGraph(nn.Module):
    """images, weight, bias, noise, levels, per_token -> codes (float), lo, hi (each (B, N, 1))."""

    def forward(
        self,
        images: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        noise: torch.Tensor,
        levels: torch.Tensor,
        per_token: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_codes(patch_tokens(images, weight, bias), noise, levels, per_token)


def patch_matrix(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B * N, C * p * p) in the conv weight's (c, i, j) order."""
    batch, chans, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch * chans * grid_h, patch, grid_w, patch)
    x = x.permute(0, 2, 1, 3)  # (B*C*Gh, Gw, p, p)
    x = x.reshape(batch, chans, grid_h * grid_w, patch * patch)
    x = x.permute(0, 2, 1, 3)  # (B, N, C, p*p)
    return x.reshape(batch * grid_h * grid_w, chans * patch * patch)


class TrainStepGraph(nn.Module):
    """One SGD-with-momentum step of the patch embedding from the returned activation gradient.

    grad_W = sum over tokens of g^T patch, grad_b = sum of g; then (torch.optim.SGD, no
    dampening, no Nesterov) buf = momentum * buf + grad; param = param - lr * buf.
    """

    def forward(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        momentum_weight: torch.Tensor,
        momentum_bias: torch.Tensor,
        images: torch.Tensor,
        grad_tokens: torch.Tensor,
        lr: torch.Tensor,
        momentum: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dim, patch = weight.shape[0], weight.shape[-1]
        grads = grad_tokens.reshape(-1, dim)  # (B*N, D)
        grad_weight = torch.matmul(grads.transpose(0, 1), patch_matrix(images, patch)).reshape(weight.shape)
        grad_bias = grads.sum(dim=0)
        new_mw = momentum * momentum_weight + grad_weight
        new_mb = momentum * momentum_bias + grad_bias
        return weight - lr * new_mw, bias - lr * new_mb, new_mw, new_mb
