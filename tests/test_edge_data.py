"""The device's preprocessing (numpy only) equals the server's (torch) on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.data import Preprocess, preprocess, resize_bilinear
from server_runtime.data.transforms import to_model_input


@pytest.mark.parametrize(("height", "width", "size"), [
    (8, 8, 16),     # digits for the quick presets: upsampling
    (8, 8, 24),     # a non-integer scale
    (32, 32, 224),  # CIFAR-10 for ViT-B/32
    (224, 224, 32),  # shrinking: antialiased
    (28, 30, 16),   # non-square
    (5, 7, 3),
    (16, 16, 16),   # no resize
])
def test_resize_matches_torch_bilinear(height: int, width: int, size: int) -> None:
    # Prepare
    images = np.random.default_rng(height * width + size).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    shrinking = size < height or size < width
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    expected = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    # Execute
    got = resize_bilinear(images, size)
    # Assert: on the 0..255 scale, float32 rounding only
    assert got.shape == (3, size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-3)


def test_preprocess_equals_the_server_loaders_input() -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    spec = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = preprocess(images, spec)
    server = to_model_input(images, 16, spec.mean, spec.std).numpy()
    np.testing.assert_allclose(device, server, rtol=0, atol=1e-5)
