"""Local timm-layout checkpoints: formats, adaptation (image size, head) and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server_runtime.checkpoint import (
    CheckpointError,
    create_model,
    load_checkpoint,
    read_state_dict,
    resample_pos_embed,
    save_checkpoint,
)
from server_runtime.presets import get_preset
from server_runtime.vit import VisionTransformer

PRESET = "vit_quick_patch4_16"


@pytest.fixture
def trained() -> VisionTransformer:
    """A model whose weights differ from any fresh init (non-zero head, random biases)."""
    torch.manual_seed(1)
    model = VisionTransformer(get_preset(PRESET))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_checkpoint_round_trip_gives_identical_outputs(trained, tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = save_checkpoint(trained, tmp_path / f"model{suffix}")
    # Execute
    loaded = create_model(PRESET, checkpoint=path).eval()
    # Assert
    x = _images(16)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_pth_wrapped_in_a_training_checkpoint_with_module_prefix_loads(trained, tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = create_model(PRESET, checkpoint=tmp_path / "wrapped.pth").eval()
    with torch.no_grad():
        assert torch.equal(loaded(_images(16)), trained(_images(16)))


def test_resized_position_embedding_matches_a_manual_resize(trained, tmp_path: Path) -> None:
    # Prepare: a 16x16 (4x4 grid) checkpoint loaded for 32x32 images (8x8 grid).
    path = save_checkpoint(trained, tmp_path / "model.safetensors")
    # Execute
    bigger = create_model(PRESET, checkpoint=path, img_size=32).eval()
    # Assert: only pos_embed changed, cls position untouched, and the model computes what the
    # original weights with a bicubically resized table compute.
    assert bigger.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(bigger.pos_embed[:, :1], trained.pos_embed[:, :1], rtol=0, atol=0)
    for key, value in trained.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(bigger.state_dict()[key], value), key
    oracle = VisionTransformer(get_preset(PRESET).replace(img_size=32)).eval()
    state = dict(trained.state_dict())
    state["pos_embed"] = resample_pos_embed(trained.pos_embed.detach(), 8)
    oracle.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(bigger(_images(32)), oracle(_images(32)))


def test_resampling_preserves_a_smooth_position_field() -> None:
    # A table linear in the patch coordinates stays (nearly) linear after upsampling.
    grid, dim = 4, 2
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    field = torch.stack([xs, ys], dim=-1).float().reshape(1, grid * grid, dim)
    pos = torch.cat([torch.full((1, 1, dim), 7.0), field], dim=1)
    same = resample_pos_embed(pos, grid)
    torch.testing.assert_close(same, pos)
    up = resample_pos_embed(pos, 8)[0, 1:].reshape(8, 8, dim)
    # column means of the x channel increase monotonically across the grid
    col_means = up[..., 0].mean(dim=0)
    assert torch.all(col_means[1:] > col_means[:-1])
    assert up[..., 0].min() >= -0.6 and up[..., 0].max() <= grid - 1 + 0.6


def test_replaced_head_keeps_the_features_and_starts_from_zero(trained, tmp_path: Path) -> None:
    path = save_checkpoint(trained, tmp_path / "model.safetensors")
    five = create_model(PRESET, checkpoint=path, num_classes=5).eval()
    x = _images(16)
    with torch.no_grad():
        assert five(x).shape == (3, 5)
        assert torch.equal(five.forward_features(x), trained.forward_features(x))
        assert torch.count_nonzero(five.head.weight) == 0
    assert five.config.num_classes == 5


def test_without_num_classes_the_checkpoint_head_decides(tmp_path: Path) -> None:
    model = VisionTransformer(get_preset(PRESET).replace(num_classes=7))
    path = save_checkpoint(model, tmp_path / "seven.safetensors")
    assert create_model(PRESET, checkpoint=path).num_classes == 7


def test_wrong_architecture_names_missing_unexpected_and_mismatched_keys(trained, tmp_path: Path) -> None:
    state = dict(trained.state_dict())
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.9.extra"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(32)
    path = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(VisionTransformer(get_preset(PRESET)), path)
    message = str(info.value)
    assert "missing keys: blocks.1.attn.qkv.weight" in message
    assert "unexpected keys: blocks.9.extra" in message
    assert "norm.weight: checkpoint (32,) vs model (64,)" in message


def test_other_preset_checkpoint_is_refused(tmp_path: Path) -> None:
    small = VisionTransformer(get_preset("vit_mini_patch4_32"))
    path = save_checkpoint(small, tmp_path / "mini.safetensors")
    with pytest.raises(CheckpointError, match="does not fit vit_quick_patch4_16"):
        create_model(PRESET, checkpoint=path)


def test_unreadable_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    # A pickle that would run code on load is refused by weights_only loading.
    torch.save({"weights": torch.zeros(1), "callback": print}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        (tmp_path / "model.ckpt").write_bytes(b"")
        read_state_dict(tmp_path / "model.ckpt")
