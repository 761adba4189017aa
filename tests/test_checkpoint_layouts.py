"""timm's ViT layouts beyond the default: headless checkpoints, average pooling, fc_norm, no class
token, and pickled models refused in one line.

Every checkpoint here is a timm-layout state dict the test writes key by key (the names and shapes
timm's ``VisionTransformer`` saves for that layout; no timm needed), and every forward is checked
against :func:`reference_forward`, written here with torch's functional ops rather than sflam's
modules.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from server_runtime.checkpoint import (
    CONVERT_ONE_LINER,
    CheckpointError,
    checkpoint_layout,
    create_model,
    read_state_dict,
    resample_pos_embed,
    save_checkpoint,
)
from server_runtime.config import ConfigError, parse_config
from server_runtime.presets import TOKEN_LAYOUT, get_preset
from server_runtime.split import split

ROOT = Path(__file__).resolve().parents[1]
PRESET = "vit_quick_patch4_16"  # 16x16 images, patch 4 (a 4x4 grid), dim 64, 3 blocks, 4 heads, mlp 128
# (global_pool, class_token, fc_norm): timm's default, its "avg" variants, and avg pooling over a
# token checkpoint (the same keys as the default: only the config can say it)
LAYOUTS = [("token", True, False), ("avg", True, True), ("avg", False, True), ("avg", True, False)]


def timm_state(*, classes: int, class_token: bool, fc_norm: bool, grid: int = 4, seed: int = 0) -> dict:
    """The state dict timm writes for ``PRESET``'s shape in a layout (``classes=0``: headless)."""
    config = get_preset(PRESET)
    dim, hidden, patch = config.embed_dim, int(config.embed_dim * config.mlp_ratio), config.patch_size
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1, offset: float = 0.0) -> torch.Tensor:
        return offset + scale * torch.randn(*shape, generator=gen)

    state = {"patch_embed.proj.weight": rand(dim, 3, patch, patch), "patch_embed.proj.bias": rand(dim)}
    if class_token:
        state["cls_token"] = rand(1, 1, dim)
    state["pos_embed"] = rand(1, grid * grid + int(class_token), dim)
    for i in range(config.depth):
        block = f"blocks.{i}."
        state |= {block + "norm1.weight": rand(dim, offset=1.0), block + "norm1.bias": rand(dim),
                  block + "attn.qkv.weight": rand(3 * dim, dim), block + "attn.qkv.bias": rand(3 * dim),
                  block + "attn.proj.weight": rand(dim, dim), block + "attn.proj.bias": rand(dim),
                  block + "norm2.weight": rand(dim, offset=1.0), block + "norm2.bias": rand(dim),
                  block + "mlp.fc1.weight": rand(hidden, dim), block + "mlp.fc1.bias": rand(hidden),
                  block + "mlp.fc2.weight": rand(dim, hidden), block + "mlp.fc2.bias": rand(dim)}
    final = "fc_norm" if fc_norm else "norm"
    state |= {f"{final}.weight": rand(dim, offset=1.0), f"{final}.bias": rand(dim)}
    if classes:
        state |= {"head.weight": rand(classes, dim), "head.bias": rand(classes)}
    return state


def reference_forward(state: dict, images: torch.Tensor, global_pool: str, pre_logits: bool = False) -> torch.Tensor:
    """timm's ViT forward from a state dict, op by op (exact softmax attention, exact GELU)."""
    heads, eps = get_preset(PRESET).num_heads, 1e-6
    weight = state["patch_embed.proj.weight"]
    x = F.conv2d(images, weight, state["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    prefix = 0
    if "cls_token" in state:
        x, prefix = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1), 1
    x = x + state["pos_embed"]
    batch, tokens, dim = x.shape
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for i in range(depth):
        w = {key.removeprefix(f"blocks.{i}."): value for key, value in state.items() if key.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (dim,), w["norm1.weight"], w["norm1.bias"], eps)
        q, k, v = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(
            batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attention @ v).transpose(1, 2).reshape(batch, tokens, dim),
                         w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (dim,), w["norm2.weight"], w["norm2.bias"], eps)
        x = x + F.linear(F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])),
                         w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    if "norm.weight" in state:
        x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps)
    pooled = x[:, prefix:].mean(dim=1) if global_pool == "avg" else x[:, 0]
    if "fc_norm.weight" in state:
        pooled = F.layer_norm(pooled, (dim,), state["fc_norm.weight"], state["fc_norm.bias"], eps)
    return pooled if pre_logits else F.linear(pooled, state["head.weight"], state["head.bias"])


def _images(size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pool,class_token,fc_norm", LAYOUTS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_each_layout_loads_exactly_and_computes_the_reference_forward(tmp_path: Path, suffix: str, pool: str,
                                                                     class_token: bool, fc_norm: bool) -> None:
    # Prepare: a 7-class timm checkpoint of the layout, written by hand
    state = timm_state(classes=7, class_token=class_token, fc_norm=fc_norm)
    path = tmp_path / f"ckpt{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    # Execute: only a layout the keys cannot tell (avg pooling over a normed token) is said
    said = {"global_pool": "avg"} if (pool, fc_norm) == ("avg", False) else None
    model = create_model(PRESET, checkpoint=path, layout=said).eval()
    # Assert: the layout the checkpoint has; every tensor as written; the reference's logits
    assert model.config.layout == {"global_pool": pool, "class_token": class_token, "fc_norm": fc_norm}
    assert model.num_classes == 7
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    x = _images()
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, reference_forward(state, x, pool), rtol=1e-5, atol=1e-5)
        # the split is still after the patch embedding, and the halves compute the whole model
        halves = split(model)
        assert set(halves.device.state_dict()) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
        assert torch.equal(halves(x), logits)


@pytest.mark.parametrize("pool,class_token,fc_norm", LAYOUTS[:3])
def test_a_headless_checkpoint_loads_for_a_class_count_with_a_zero_head(tmp_path: Path, pool: str,
                                                                      class_token: bool, fc_norm: bool) -> None:
    # Prepare: what timm saves for num_classes=0 (no head.weight, no head.bias)
    state = timm_state(classes=0, class_token=class_token, fc_norm=fc_norm)
    path = tmp_path / "headless.safetensors"
    save_file(state, str(path))
    # Execute
    model = create_model(PRESET, checkpoint=path, num_classes=10).eval()
    # Assert: every backbone tensor as written, a fresh zero 10-class head, the reference's features
    loaded = model.state_dict()
    assert set(loaded) == set(state) | {"head.weight", "head.bias"}
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["head.weight"].shape == (10, 64) and not loaded["head.weight"].any() and not loaded["head.bias"].any()
    x = _images()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, reference_forward(state, x, pool, pre_logits=True), rtol=1e-5, atol=1e-5)
        assert not model(x).any()  # zero logits: uniform predictions until the head learns
    # ... and without a class count, the preset's
    assert create_model(PRESET, checkpoint=path).num_classes == get_preset(PRESET).num_classes


def test_the_cli_loads_a_headless_checkpoint_with_num_classes(tmp_path: Path) -> None:
    save_file(timm_state(classes=0, class_token=False, fc_norm=True), str(tmp_path / "backbone.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sflam", "models", "check", PRESET, "--checkpoint",
                             str(tmp_path / "backbone.safetensors"), "--num-classes", "10"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "classes: 10" in result.stdout and "pooling: avg (no class token, fc_norm)" in result.stdout
    assert "headless checkpoint: a fresh zero-initialized 10-class head" in result.stderr


def test_saving_headless_leaves_the_head_out_and_loads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(PRESET, num_classes=5, layout={"global_pool": "avg"})
    path = save_checkpoint(model, tmp_path / "backbone.safetensors", headless=True)
    state = read_state_dict(path)
    assert not any(key.startswith("head.") for key in state) and "fc_norm.weight" in state
    assert checkpoint_layout(state) == {"class_token": True, "fc_norm": True, "global_pool": "avg"}
    again = create_model(PRESET, checkpoint=path, num_classes=3)
    assert again.config.layout == model.config.layout and again.num_classes == 3


def test_the_position_embedding_of_a_model_without_class_token_resizes_every_position(tmp_path: Path) -> None:
    state = timm_state(classes=7, class_token=False, fc_norm=True)
    save_file(state, str(tmp_path / "nocls.safetensors"))
    bigger = create_model(PRESET, checkpoint=tmp_path / "nocls.safetensors", img_size=32)
    assert bigger.pos_embed.shape == (1, 64, 64)  # 8x8 patches, no prefix position
    assert torch.equal(bigger.pos_embed.detach(), resample_pos_embed(state["pos_embed"], 8, num_prefix_tokens=0))


def test_a_layout_the_checkpoint_contradicts_is_refused_saying_what_to_set(tmp_path: Path) -> None:
    save_file(timm_state(classes=7, class_token=True, fc_norm=False), str(tmp_path / "token.safetensors"))
    save_file(timm_state(classes=7, class_token=False, fc_norm=True), str(tmp_path / "nocls.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: fc_norm\.bias, fc_norm\.weight") as info:
        create_model(PRESET, checkpoint=tmp_path / "token.safetensors", layout={"fc_norm": True})
    assert "set model.fc_norm = false or leave it to the checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match="needs class_token"):
        create_model(PRESET, checkpoint=tmp_path / "nocls.safetensors", layout={"global_pool": "token"})


def test_run_toml_layout_keys_are_checked_together() -> None:
    assert parse_config('[model]\nclass_token = false\n').model.layout == {
        "global_pool": None, "class_token": False, "fc_norm": None}
    assert create_model(PRESET, layout=parse_config('[model]\nclass_token = false\n').model.layout).config.layout == {
        "global_pool": "avg", "class_token": False, "fc_norm": True}  # timm's defaults for the rest
    with pytest.raises(ConfigError) as info:
        parse_config('[model]\nclass_token = false\nglobal_pool = "token"\nfc_norm = "yes"\n')
    problems = str(info.value)
    assert "model.class_token: false needs model.global_pool = 'avg'" in problems
    assert "model.fc_norm: must be true or false" in problems
    with pytest.raises(ConfigError, match="model.global_pool"):
        parse_config('[model]\nglobal_pool = "max"\n')


def test_a_pickled_model_is_refused_in_one_line_that_says_how_to_convert_it(tmp_path: Path) -> None:
    # Prepare: a whole model pickled, as torch.save(model) writes it
    model = create_model(PRESET)
    torch.save(model, tmp_path / "model.pth")
    # Execute
    with pytest.raises(CheckpointError) as info:
        create_model(PRESET, checkpoint=tmp_path / "model.pth")
    # Assert: one line, no terminal escapes, what the file is and what to do
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert "model.pth holds pickled Python objects (server_runtime.vit.VisionTransformer" in message
    assert "save model.state_dict() instead" in message and CONVERT_ONE_LINER in message
    # ... the CLI prints just that line
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sflam", "models", "check", PRESET, "--checkpoint",
                             str(tmp_path / "model.pth")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("sflam models: error: ") and "VisionTransformer" in result.stderr
    # ... and the documented one-liner converts it into a checkpoint that loads to the same model
    command = CONVERT_ONE_LINER.replace("python", f'"{sys.executable}"', 1).replace(
        "MODEL.pth", str(tmp_path / "model.pth")).replace("STATE.pth", str(tmp_path / "state.pth"))
    subprocess.run(command, shell=True, check=True, cwd=ROOT, env=env, timeout=120)
    converted = create_model(PRESET, checkpoint=tmp_path / "state.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_a_timm_training_checkpoint_with_its_args_loads(tmp_path: Path) -> None:
    # timm's train.py saves {"epoch", "arch", "state_dict", "optimizer", "args": Namespace, ...}
    state = timm_state(classes=7, class_token=True, fc_norm=False)
    torch.save({"epoch": 3, "arch": PRESET, "state_dict": state, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "model_best.pth.tar")
    model = create_model(PRESET, checkpoint=tmp_path / "model_best.pth.tar")
    assert model.config.layout == TOKEN_LAYOUT
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_resuming_after_the_checkpoint_file_changed_its_layout_is_refused(tmp_path: Path) -> None:
    from server_runtime.daemon import DaemonError, ServerDaemon
    from server_runtime.run_state import RunState, save_run_state

    # Prepare: a run checkpointed after round 1 of a model started from a no-class-token backbone
    backbone = tmp_path / "backbone.safetensors"
    save_file(timm_state(classes=0, class_token=False, fc_norm=True), str(backbone))
    config = parse_config(f'[model]\npreset = "{PRESET}"\ncheckpoint = "{backbone}"\n'
                          f'[checkpoint]\ndir = "{tmp_path / "run"}"\n')
    model = create_model(PRESET, checkpoint=backbone, num_classes=10)
    save_run_state(config.checkpoint_dir, RunState(1, 1, model.state_dict(), config=config.to_dict(),
                                                   extra={"layout": model.config.layout}))
    # Execute: the file at model.checkpoint replaced by a token-pooled backbone, then --resume
    save_file(timm_state(classes=0, class_token=True, fc_norm=False), str(backbone))
    with pytest.raises(DaemonError) as info:
        ServerDaemon(config, resume=True)
    # Assert: refused before anything connects, naming both layouts
    assert "cannot resume: the model's layout was {'global_pool': 'avg', 'class_token': False" in str(info.value)
    assert "'global_pool': 'token', 'class_token': True, 'fc_norm': False} now" in str(info.value)
