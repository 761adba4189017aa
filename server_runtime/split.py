"""SFLAM's cut of a ViT: the device keeps the patch embedding, the server keeps the rest.

Both halves keep timm's parameter names, so ``device.state_dict() | server.state_dict()`` is a
timm state dict and :func:`join` puts a model back together. :func:`split` shares parameters
with the model it cuts (no copy); copy the halves when each device or server copy needs its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from server_runtime.presets import ViTConfig
from server_runtime.vit import PatchEmbed, ServerPath, VisionTransformer


class DevicePart(nn.Module):
    """Images (B, C, H, W) -> patch tokens (B, N, D): all a device computes."""

    def __init__(self, patch_embed: PatchEmbed) -> None:
        super().__init__()
        self.patch_embed = patch_embed

    @property
    def output_shape(self) -> tuple[int, int]:
        """(tokens, embed dim) of one sample's activation."""
        return self.patch_embed.num_patches, self.patch_embed.proj.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


class ServerPart(ServerPath, nn.Module):
    """Patch tokens (B, N, D) -> logits: [cls token,] position embedding, blocks, norm, pooling,
    fc_norm, head (the model's layout, ``config.global_pool`` and friends)."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.config = model.config
        self.cls_token = model.cls_token
        self.pos_embed = model.pos_embed
        self.blocks = model.blocks
        self.norm = model.norm
        self.fc_norm = model.fc_norm
        self.head = model.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_tokens(tokens))


@dataclass(frozen=True)
class SplitViT:
    """The two halves of one model, and the config they were cut from."""

    config: ViTConfig
    device: DevicePart
    server: ServerPart

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.device(x))


def split(model: VisionTransformer) -> SplitViT:
    """Cut ``model`` after the patch embedding; the halves share the model's parameters."""
    return SplitViT(model.config, DevicePart(model.patch_embed), ServerPart(model))


def join(device: DevicePart, server: ServerPart, config: ViTConfig) -> VisionTransformer:
    """A new unsplit model holding copies of the two halves' current weights."""
    head = server.head
    config = config.replace(num_classes=head.out_features) if isinstance(head, nn.Linear) else config
    model = VisionTransformer(config)
    state = {**device.state_dict(), **server.state_dict()}
    model.load_state_dict(copy.deepcopy(state), strict=True)
    return model
