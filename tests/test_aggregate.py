"""FedAvg: the sample-weighted mean of copies that really differ (not the last copy's model)."""

from __future__ import annotations

import copy

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
