"""The ViT, its presets and the SFLAM split."""

from __future__ import annotations

import pytest
import torch

from server_runtime.presets import PresetError, ViTConfig, get_preset, preset_names
from server_runtime.split import join, split
from server_runtime.vit import VisionTransformer

SPLIT_PRESETS = ["vit_quick_patch4_16", "vit_mini_patch4_32", "vit_tiny_patch16_224", "vit_base_patch32_224"]

# Parameter counts of timm's models (timm.create_model(name).num_parameters()), the check that
# our module tree has timm's shapes.
TIMM_PARAM_COUNTS = {
    "vit_base_patch32_224": 88_224_232,
    "vit_base_patch16_224": 86_567_656,
    "vit_small_patch32_224": 22_878_952,
    "vit_small_patch16_224": 22_050_664,
    "vit_tiny_patch16_224": 5_717_416,
}


def _images(config: ViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_chans, config.img_size, config.img_size, generator=gen)


@pytest.mark.parametrize("name", SPLIT_PRESETS)
def test_split_halves_compose_to_the_unsplit_model(name: str) -> None:
    # Prepare
    torch.manual_seed(0)
    model = VisionTransformer(get_preset(name)).eval()
    x = _images(model.config)
    # Execute
    halves = split(model)
    with torch.no_grad():
        whole = model(x)
        tokens = halves.device(x)
        composed = halves.server(tokens)
    # Assert
    assert tokens.shape == (2, model.config.num_patches, model.config.embed_dim)
    assert composed.shape == (2, model.config.num_classes)
    torch.testing.assert_close(composed, whole, rtol=0, atol=1e-6)


def test_split_cuts_after_the_patch_embedding_and_keeps_timm_names() -> None:
    model = VisionTransformer(get_preset("vit_quick_patch4_16"))
    halves = split(model)
    device_keys = set(halves.device.state_dict())
    server_keys = set(halves.server.state_dict())
    assert device_keys == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {"cls_token", "pos_embed", "norm.weight", "head.weight", "blocks.2.mlp.fc2.bias"} <= server_keys
    assert device_keys.isdisjoint(server_keys)
    assert device_keys | server_keys == set(model.state_dict())


def test_split_shares_parameters_and_join_copies_them() -> None:
    model = VisionTransformer(get_preset("vit_quick_patch4_16")).eval()
    halves = split(model)
    x = _images(model.config)
    with torch.no_grad():
        halves.device.patch_embed.proj.bias.add_(1.0)  # an update through the half...
        assert torch.equal(model.patch_embed.proj.bias, halves.device.patch_embed.proj.bias)  # ...is the model's
        rejoined = join(halves.device, halves.server, model.config).eval()
        torch.testing.assert_close(rejoined(x), model(x), rtol=0, atol=0)
        rejoined.head.bias.add_(1.0)
        assert not torch.equal(rejoined.head.bias, model.head.bias)


@pytest.mark.parametrize("name", list(TIMM_PARAM_COUNTS))
def test_standard_presets_have_timms_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = VisionTransformer(get_preset(name))
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAM_COUNTS[name]


def test_gradients_flow_through_the_cut() -> None:
    # What split training relies on: d loss / d tokens on the server drives the device update.
    torch.manual_seed(0)
    model = VisionTransformer(get_preset("vit_quick_patch4_16"))
    halves = split(model)
    x, y = _images(model.config, batch=4), torch.tensor([0, 1, 2, 3])
    tokens = halves.device(x)
    sent = tokens.detach().requires_grad_(True)  # what crosses the network
    torch.nn.functional.cross_entropy(halves.server(sent), y).backward()
    tokens.backward(sent.grad)
    split_grad = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(split_grad, model.patch_embed.proj.weight.grad)


def test_bad_inputs_get_clear_errors() -> None:
    model = VisionTransformer(get_preset("vit_quick_patch4_16"))
    halves = split(model)
    with pytest.raises(ValueError, match="expects"):
        halves.device(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="server part expects"):
        halves.server(torch.zeros(1, 15, 64))
    with pytest.raises(PresetError, match="known presets: vit_base_patch32_224"):
        get_preset("vit_huge")
    with pytest.raises(PresetError, match="not a multiple of patch"):
        get_preset("vit_quick_patch4_16").replace(img_size=18)


def test_preset_names_include_the_required_ones() -> None:
    names = set(preset_names())
    assert {"vit_base_patch32_224", "vit_small_patch32_224", "vit_tiny_patch16_224"} <= names
