"""From stored uint8 images to normalized model input, one batch at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from server_runtime.data.datasets import DatasetError, ImageSet


def _channel_tensor(values: Sequence[float], what: str) -> torch.Tensor:
    """Three per-channel values as a (1, 3, 1, 1) float32 tensor."""
    tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if tensor.shape != (3,) or not torch.isfinite(tensor).all():
        raise DatasetError(f"{what} needs 3 finite per-channel values, got {list(values)}")
    return tensor.view(1, 3, 1, 1)


def to_model_input(
    images: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S): scaled to [0, 1], resized, normalized.

    Resizing is bilinear (``align_corners=False``), antialiased when shrinking, and skipped
    when the images already are S x S.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}")
    if image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    mean_t = _channel_tensor(mean, "mean")
    std_t = _channel_tensor(std, "std")
    if (std_t <= 0).any():
        raise DatasetError(f"std must be > 0 per channel, got {list(std)}")
    array = images if images.flags.writeable else images.copy()
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)
    height, width = images.shape[1:3]
    if (height, width) != (image_size, image_size) and len(images):
        shrinking = image_size < height or image_size < width
        x = F.interpolate(
            x,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=shrinking,
        )
    return ((x - mean_t) / std_t).contiguous()


class BatchLoader:
    """Batches (x float32 (B, 3, S, S), y int64 (B,)) over an ImageSet, resized per batch.

    Each pass (``iter``) is one epoch; with ``shuffle`` the order is a fresh permutation
    determined by (seed, epoch), so a run is reproducible and can resume with ``set_epoch``.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        indices: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise DatasetError(f"seed must be >= 0, got {seed}")
        self.data = data
        self.batch_size = batch_size
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.indices = self._checked_indices(indices)
        self.epoch = 0

    def _checked_indices(self, indices: np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(len(self.data), dtype=np.int64)
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise DatasetError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.data)):
            raise DatasetError(f"indices must lie in [0, {len(self.data)}), the data set size")
        return idx.astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch`` (e.g. when resuming)."""
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, self.epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        self.epoch += 1  # now, not at the first next(): every iter() is its own epoch
        return self._batches(order)

    def _batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = to_model_input(self.data.images[batch], self.image_size, self.mean, self.std)
            y = torch.from_numpy(self.data.labels[batch])
            yield x, y
