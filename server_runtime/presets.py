"""ViT presets: timm's standard shapes plus small ones for tests and the quickstart."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)  # what timm's augreg ViT checkpoints expect
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
GLOBAL_POOLS = ("token", "avg")  # timm's ViT poolings: the class token's features, or the patch tokens' mean
LAYOUT_FIELDS = ("global_pool", "class_token", "fc_norm")  # what a checkpoint's layout fixes beyond shapes


class PresetError(ValueError):
    """An unknown preset name or an impossible configuration."""


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a Vision Transformer; field names follow timm's constructor arguments."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = True
    mean: tuple[float, float, float] = IMAGENET_INCEPTION_MEAN
    std: tuple[float, float, float] = IMAGENET_INCEPTION_STD
    # The server side's pooling layout (timm's arguments of the same names; docs/checkpoints.md).
    # The device part is the patch embedding whatever they are.
    global_pool: str = "token"
    class_token: bool = True  # a learned token before the patch tokens (and a position for it)
    fc_norm: bool = False  # LayerNorm after pooling instead of on every token (timm's "avg" variants)

    def __post_init__(self) -> None:
        problems = []
        if self.global_pool not in GLOBAL_POOLS:
            problems.append(f"global_pool {self.global_pool!r} is not one of {', '.join(GLOBAL_POOLS)}")
        elif self.global_pool == "token" and not self.class_token:
            problems.append('global_pool "token" needs class_token (pool "avg" works without one)')
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch {self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads")
        for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be >= 1")
        if self.num_classes < 1:
            problems.append("num_classes must be >= 1")
        if problems:
            raise PresetError(f"invalid ViT config {self.name!r}: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens the device part emits per image (the activation length s / embed_dim)."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens the server puts before the patch tokens (the class token, if any)."""
        return int(self.class_token)

    @property
    def layout(self) -> dict[str, object]:
        """The pooling layout, as recorded in bundles and run checkpoints."""
        return {name: getattr(self, name) for name in LAYOUT_FIELDS}

    def with_layout(self, global_pool: str | None = None, class_token: bool | None = None,
                    fc_norm: bool | None = None) -> "ViTConfig":
        """A copy with a pooling layout; what is not given follows timm's defaults: a class
        token, ``fc_norm`` exactly when pooling is "avg", and "avg" without a class token."""
        pool = global_pool or ("avg" if class_token is False else self.global_pool)
        return self.replace(global_pool=pool, class_token=True if class_token is None else class_token,
                            fc_norm=pool == "avg" if fc_norm is None else fc_norm)

    @property
    def activation_elements(self) -> int:
        """Elements of one sample's device output: the s of the system model."""
        return self.num_patches * self.embed_dim

    def replace(self, **changes: object) -> "ViTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# timm's default ViT layout (class token, norm), which every run checkpoint before layouts had
TOKEN_LAYOUT = {f.name: f.default for f in dataclasses.fields(ViTConfig) if f.name in LAYOUT_FIELDS}

_PRESETS = {
    # timm standard shapes (parameter names and shapes match timm's checkpoints).
    "vit_base_patch32_224": ViTConfig("vit_base_patch32_224", 224, 32, 768, 12, 12),
    "vit_base_patch16_224": ViTConfig("vit_base_patch16_224", 224, 16, 768, 12, 12),
    "vit_small_patch32_224": ViTConfig("vit_small_patch32_224", 224, 32, 384, 12, 6),
    "vit_small_patch16_224": ViTConfig("vit_small_patch16_224", 224, 16, 384, 12, 6),
    "vit_tiny_patch16_224": ViTConfig("vit_tiny_patch16_224", 224, 16, 192, 12, 3),
    # Small models for the quickstart, tests and CPU-only experiments.
    "vit_mini_patch4_32": ViTConfig(
        "vit_mini_patch4_32", 32, 4, 128, 6, 4, mlp_ratio=2.0, num_classes=10
    ),
    "vit_quick_patch4_16": ViTConfig(
        "vit_quick_patch4_16", 16, 4, 64, 3, 4, mlp_ratio=2.0, num_classes=10
    ),
}


def preset_names() -> list[str]:
    """All preset names, largest first as declared."""
    return list(_PRESETS)


def get_preset(name: str) -> ViTConfig:
    """The config of a preset, or a PresetError listing the known names."""
    try:
        return _PRESETS[name]
    except KeyError:
        known = ", ".join(_PRESETS)
        raise PresetError(f"unknown model preset {name!r}; known presets: {known}") from None
