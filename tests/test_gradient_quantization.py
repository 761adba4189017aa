"""The device's update is unbiased under downlink gradient quantization.

The server quantizes d loss / d tokens with the stochastic quantizer (``quant.gradient_bits``); the
device decodes it and runs its exported ``train_step`` graph. That graph is linear in the gradient,
so the expected weight gradient over quantization draws is the weight gradient of the exact
activation gradient: the Monte-Carlo mean must lie within a few standard errors of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.backends.onnx_backend import OnnxBackend
from edge_runtime.bundle import load_weights
from edge_runtime.quantize import dequantize
from server_runtime.presets import get_preset
from server_runtime.quantize_torch import quantize_torch

DRAWS = 2000
SIGMAS = 5.0  # per element (3,136 of them): a false alarm has probability ~2e-3


class DeviceGradient:
    """d loss / d (weight, bias) of the quick bundle's device graph for one batch of images."""

    def __init__(self, bundle: Path) -> None:
        self.engine, weights = OnnxBackend(bundle), load_weights(bundle)
        self.weight, self.bias = weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"]
        vit = get_preset("vit_quick_patch4_16")
        rng = np.random.default_rng(0)
        self.images = rng.normal(size=(4, vit.in_chans, vit.img_size, vit.img_size)).astype(np.float32)
        # an activation gradient of the server's scale
        self.exact = torch.from_numpy(rng.normal(0.0, 1e-3, (4, vit.num_patches, vit.embed_dim)).astype(np.float32))

    def of(self, grad_tokens: np.ndarray) -> np.ndarray:
        """The weight gradient (learning rate 0: the graph's new momentum is the gradient), flattened."""
        zeros = np.zeros_like(self.weight), np.zeros_like(self.bias)
        _, _, grad_w, grad_b = self.engine.train_step(self.weight, self.bias, *zeros, self.images,
                                                      np.asarray(grad_tokens, np.float32), 0.0, 0.0)
        return np.concatenate([np.ravel(grad_w), np.ravel(grad_b)]).astype(np.float64)

    def quantized(self, bits: int, *, stochastic: bool = True, draws: int = DRAWS) -> np.ndarray:
        """(draws, parameters): the weight gradient after each of ``draws`` quantizations of the gradient."""
        generator = torch.Generator().manual_seed(7)
        return np.stack([self.of(dequantize(quantize_torch(self.exact, bits, per="token", generator=generator,
                                                           stochastic=stochastic)))
                         for _ in range(draws)])


@pytest.mark.parametrize("bits", [2, 4])
def test_the_device_update_is_unbiased_under_gradient_quantization(quick_bundle: Path, bits: int) -> None:
    # Prepare
    device = DeviceGradient(quick_bundle)
    reference = device.of(device.exact.numpy())
    # Execute: the device's weight gradient after each of DRAWS quantizations of the same gradient
    draws = device.quantized(bits)
    # Assert: the quantization noise is real, and the mean is the exact-gradient update within the bound
    stderr = draws.std(axis=0, ddof=1) / np.sqrt(DRAWS)
    tolerance = 1e-6 * np.abs(reference).max()  # float32 arithmetic in the graph
    assert draws.std(axis=0).max() > 1e-2 * np.abs(reference).max()
    error = np.abs(draws.mean(axis=0) - reference)
    assert np.all(error <= SIGMAS * stderr + tolerance), f"worst {np.max(error / (stderr + 1e-30)):.2f} standard errors"


def test_round_to_nearest_fails_the_same_bound(quick_bundle: Path) -> None:
    # The bound can fail: round-to-nearest codes are biased, and at 2 bits the bias shows
    device = DeviceGradient(quick_bundle)
    reference = device.of(device.exact.numpy())
    nearest = device.quantized(2, stochastic=False, draws=1)[0]
    stderr = device.quantized(2).std(axis=0, ddof=1) / np.sqrt(DRAWS)
    assert np.any(np.abs(nearest - reference) > SIGMAS * stderr + 1e-6 * np.abs(reference).max())
