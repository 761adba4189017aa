"""A Vision Transformer with timm's module and parameter names, so timm checkpoints load as-is.

Only what SFLAM needs: a ViT with absolute position embeddings and a linear head, in timm's
pooling layouts (``ViTConfig.global_pool``, ``class_token``, ``fc_norm``): the class token's
features after ``norm`` (``global_pool="token"``, timm's default), or the mean of the patch
tokens after ``fc_norm`` (``"avg"``, with or without a class token). The server-side
computation lives in :class:`ServerPath`, shared by the whole model and by the server half of
the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server_runtime.presets import ViTConfig


class PatchEmbed(nn.Module):
    """Image -> patch tokens: Conv2d with kernel = stride = patch size, flattened to (B, N, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.proj.in_channels, *self.img_size):
            expected = (self.proj.in_channels, *self.img_size)
            raise ValueError(f"patch embedding expects (B, {expected}) images, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ServerPath:
    """What the server computes from patch tokens: [cls +] pos embed -> blocks -> norm -> pool
    -> fc_norm -> head.

    Mixed into both the full model and the server half, so the two cannot drift apart.
    Expects attributes ``config``, ``cls_token`` (None without a class token), ``pos_embed``,
    ``blocks``, ``norm``, ``fc_norm`` (either may be an Identity) and ``head``.
    """

    config: ViTConfig
    cls_token: nn.Parameter | None
    pos_embed: nn.Parameter
    blocks: nn.Sequential
    norm: nn.Module
    fc_norm: nn.Module
    head: nn.Module

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> token features (B, prefix + N, D), ``norm`` applied."""
        prefix = self.config.num_prefix_tokens
        expected = (self.pos_embed.shape[1] - prefix, self.pos_embed.shape[2])
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"server part expects (B, {expected}) tokens, got {tuple(tokens.shape)}")
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm(self.blocks(tokens + self.pos_embed))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (the class token, or the mean of the patch tokens), ``fc_norm``, then the head."""
        if self.config.global_pool == "avg":
            pooled = features[:, self.config.num_prefix_tokens :].mean(dim=1)
        else:
            pooled = features[:, 0]
        pooled = self.fc_norm(pooled)
        return pooled if pre_logits else self.head(pooled)


class VisionTransformer(ServerPath, nn.Module):
    """The unsplit model; ``state_dict()`` keys are timm's (``patch_embed.proj.weight``, ...)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_classes = config.num_classes
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_prefix_tokens + self.patch_embed.num_patches, dim))
        self.blocks = nn.Sequential(
            *(Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias) for _ in range(config.depth))
        )
        # timm: one final LayerNorm, on every token (norm) or on the pooled features (fc_norm)
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if config.fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default init: truncated normal 0.02 for linears and pos embed, tiny cls token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def reset_head(self, num_classes: int) -> None:
        """A fresh zero-initialised head for another class count (what fine-tuning needs)."""
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalized token features."""
        return self.forward_tokens(self.patch_embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
