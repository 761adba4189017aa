"""FedAvg: the sample-weighted mean of copies that really differ (not the last copy's model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from server_runtime.aggregate import AggregationError, fedavg
from server_runtime.presets import get_preset
from server_runtime.split import split
from server_runtime.vit import VisionTransformer


def _copies(count: int) -> list[VisionTransformer]:
    torch.manual_seed(0)
    base = VisionTransformer(get_preset("vit_quick_patch4_16"))
    copies = []
    for index in range(count):
        local = copy.deepcopy(base)
        with torch.no_grad():
            for param in local.parameters():
                param.add_(torch.randn_like(param) * (index + 1))
        copies.append(local)
    return copies


def test_fedavg_is_the_sample_weighted_mean_of_differing_copies() -> None:
    # Prepare: three server copies that differ everywhere (the paper code's copies alias one
    # state dict, so its "average" equals the last copy).
    copies = [split(m).server for m in _copies(3)]
    states = [c.state_dict() for c in copies]
    samples = [100, 300, 600]
    # Execute
    averaged = fedavg(states, samples)
    # Assert
    for key in states[0]:
        expected = (100 * states[0][key] + 300 * states[1][key] + 600 * states[2][key]) / 1000
        torch.testing.assert_close(averaged[key], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(averaged[key], states[-1][key])


def test_fedavg_of_device_parts_keeps_timm_names() -> None:
    states = [split(m).device.state_dict() for m in _copies(2)]
    averaged = fedavg(states, [1, 1])
    assert set(averaged) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    torch.testing.assert_close(averaged["patch_embed.proj.bias"], (states[0]["patch_embed.proj.bias"] + states[1]["patch_embed.proj.bias"]) / 2)


def test_a_copy_with_zero_samples_does_not_move_the_average() -> None:
    states = [m.state_dict() for m in _copies(2)]
    averaged = fedavg(states, [5, 0])
    for key, value in states[0].items():
        torch.testing.assert_close(averaged[key], value)


def test_fedavg_rejects_what_cannot_be_averaged() -> None:
    states = [m.state_dict() for m in _copies(2)]
    with pytest.raises(AggregationError, match="no model copies"):
        fedavg([], [])
    with pytest.raises(AggregationError, match="2 copies but 1 sample counts"):
        fedavg(states, [1])
    with pytest.raises(AggregationError, match="positive total"):
        fedavg(states, [0, 0])
    truncated = dict(states[1])
    truncated.pop("head.bias")
    with pytest.raises(AggregationError, match="other keys"):
        fedavg([states[0], truncated], [1, 1])


def test_a_float16_broadcast_is_what_the_server_holds_within_float16_rounding() -> None:
    # Prepare: weights of several scales, one tensor float16 cannot hold
    from edge_runtime import protocol as p
    from server_runtime.aggregate import broadcast_weights

    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.05, (64, 3, 4, 4)).astype(np.float32), "b": rng.normal(0, 1e-6, 64).astype(np.float32),
               "big": np.array([1e5, -3.0], np.float32)}
    # Execute: encode as the daemon does, decode as the device does (np.array(..., float32))
    message = p.ModelWeights(p.Envelope("r", 1, p.SERVER_ID), 1, p.weights_from_numpy(broadcast_weights(weights, 16)))
    decoded = {k: np.array(v, np.float32) for k, v in p.weights_to_numpy(p.decode(p.encode(message)).weights).items()}
    # Assert: the stated tolerance; float32 where float16 would overflow; float32 broadcasts are exact
    for name in ("w", "b"):
        np.testing.assert_allclose(decoded[name], weights[name], rtol=2.0**-11, atol=2.0**-24)
        assert not np.array_equal(decoded[name], weights[name])  # it was rounded
    assert np.array_equal(decoded["big"], weights["big"])
    assert dict(message.weights)["w"].dtype == "float16" and dict(message.weights)["big"].dtype == "float32"
    exact = broadcast_weights(weights, 32)
    assert all(np.array_equal(exact[k], weights[k]) for k in weights)


def test_fedavg_averages_exactly_the_uploads_trained_from_a_float16_broadcast() -> None:
    # The rounding of a broadcast is part of what devices upload; FedAvg averages those uploads as sent
    from server_runtime.aggregate import broadcast_weights

    rng = np.random.default_rng(1)
    global_w = rng.normal(0, 0.05, (8, 4)).astype(np.float32)
    start = broadcast_weights({"w": global_w}, 16)["w"].astype(np.float32)
    uploads = [start + rng.normal(0, 1e-3, start.shape).astype(np.float32) for _ in range(3)]
    averaged = fedavg([{"w": torch.from_numpy(u)} for u in uploads], [10, 20, 30])["w"].numpy()
    expected = (10 * uploads[0].astype(np.float64) + 20 * uploads[1] + 30 * uploads[2]) / 60
    np.testing.assert_allclose(averaged, expected, rtol=0, atol=1e-7)
