"""The augmentation a run announces in its plan, applied on the device (numpy only).

``RoundPlan.crop_padding`` P > 0: pad each image with P black pixels on every side, then cut a
window of the image's own size at a uniformly drawn offset (0..2P in each direction), torchvision's
``RandomCrop(size, padding=P)``. ``RoundPlan.hflip``: mirror left-right with probability 0.5,
``RandomHorizontalFlip()``. Both act on the stored uint8 image, before it is resized to the model's
input, as the common CIFAR-10 recipe (and the SFLAM code) does. The draws come from the device's
seeded rng, so one seed gives the same batches; nothing the server evaluates is ever augmented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.protocol import MAX_CROP_PADDING


@dataclass(frozen=True)
class Augment:
    """Random crop with ``crop_padding`` pixels of zero padding (0: none), and a random horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, (int, np.integer)) \
                or not 0 <= self.crop_padding <= MAX_CROP_PADDING:
            raise ValueError(f"crop_padding must be a whole number in 0..{MAX_CROP_PADDING}, got {self.crop_padding!r}")

    @classmethod
    def from_plan(cls, plan: object) -> "Augment":
        """What a RoundPlan asks for (plans without the fields: nothing)."""
        return cls(int(getattr(plan, "crop_padding", 0)), bool(getattr(plan, "hflip", False)))

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def describe(self) -> str:
        parts = ([f"random crop (padding {self.crop_padding})"] if self.crop_padding else []) + \
                (["horizontal flip"] if self.hflip else [])
        return ", ".join(parts) or "none"

    def apply(self, images: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Each (H, W, C) uint8 image cropped and/or flipped; per image, the crop offsets are drawn
        first (top, then left), then the flip."""
        return [self._one(image, rng) for image in images]

    def _one(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.crop_padding:
            top, left = (int(v) for v in rng.integers(0, 2 * self.crop_padding + 1, size=2))
            image = padded_crop(image, self.crop_padding, top, left)
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        return image


def padded_crop(image: np.ndarray, padding: int, top: int, left: int) -> np.ndarray:
    """The (H, W) window at (top, left) of ``image`` zero-padded by ``padding`` on every side."""
    height, width = image.shape[:2]
    padded = np.zeros((height + 2 * padding, width + 2 * padding, *image.shape[2:]), dtype=image.dtype)
    padded[padding:padding + height, padding:padding + width] = image
    return padded[top:top + height, left:left + width]
