"""The device follows the plan's optimizer: its numpy update equals torch's, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime import protocol as p
from edge_runtime.backends.numpy_backend import NumpyBackend
from edge_runtime.optimizer import DeviceOptimizer
from server_runtime.trainer import OptimizerSpec

STEPS = 5


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """A patch embedding (16 dims, 4x4 patches of 3 channels) and batches of (images, d loss / d tokens)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.1, (16, 3, 4, 4)).astype(np.float32)
    bias = rng.normal(0, 0.1, 16).astype(np.float32)
    batches = [(rng.normal(size=(2, 3, 8, 8)).astype(np.float32), rng.normal(size=(2, 4, 16)).astype(np.float32))
               for _ in range(STEPS)]
    return weight, bias, batches


@pytest.mark.parametrize(
    ("name", "lr", "momentum", "weight_decay"),
    [("sgd", 0.05, 0.9, 0.0), ("sgd", 0.05, 0.5, 1e-4), ("sgd", 0.1, 0.0, 0.01),
     ("adam", 0.01, 0.0, 0.0), ("adam", 0.01, 0.0, 1e-2), ("adamw", 0.01, 0.0, 0.05)],
)
def test_the_device_update_is_torchs(name: str, lr: float, momentum: float, weight_decay: float) -> None:
    # Prepare: the same parameters on both sides; torch gets the gradient the device graph computes
    engine = NumpyBackend()
    weight, bias, batches = _problem()
    device = DeviceOptimizer(name, lr, momentum, weight_decay)
    params = [torch.nn.Parameter(torch.from_numpy(weight.copy())), torch.nn.Parameter(torch.from_numpy(bias.copy()))]
    reference = OptimizerSpec(name, lr, momentum, weight_decay).build(params)
    # Execute: STEPS steps on each side
    for images, grad_tokens in batches:
        _, _, grad_w, grad_b = engine.train_step(params[0].detach().numpy(), params[1].detach().numpy(),
                                                 np.zeros_like(weight), np.zeros_like(bias), images, grad_tokens, 0.0, 0.0)
        params[0].grad, params[1].grad = torch.from_numpy(grad_w.copy()), torch.from_numpy(grad_b.copy())
        reference.step()
        weight, bias = device.step(engine, weight, bias, images, grad_tokens)
    # Assert: the same weights, and training moved them
    np.testing.assert_allclose(weight, params[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias, params[1].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert weight.dtype == bias.dtype == np.float32
    assert np.abs(weight - _problem()[0]).max() > 1e-3


def test_the_plan_names_the_optimizer_and_a_fresh_state() -> None:
    plan = p.RoundPlan(p.Envelope("r", 1, p.SERVER_ID), 1, 10.0, 1, 8, 0.02, (), "adamw", 0.0, 0.05)
    optimizer = DeviceOptimizer.for_plan(plan)
    assert (optimizer.name, optimizer.lr, optimizer.momentum, optimizer.weight_decay, optimizer.steps) == (
        "adamw", 0.02, 0.0, 0.05, 0)


def test_an_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adam', 'adamw'\), got 'lion'"):
        DeviceOptimizer("lion", 0.1)
