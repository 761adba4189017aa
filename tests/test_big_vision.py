"""big_vision/augreg .npz checkpoints, checked against an independent numpy forward pass.

The oracle below computes a ViT the way Flax does (NHWC images, (in, out) kernels, per-head
einsums) straight from the big_vision arrays; our converted torch model must agree with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf

from server_runtime.big_vision import BigVisionError, from_big_vision
from server_runtime.checkpoint import create_model
from server_runtime.presets import get_preset
from server_runtime.vit import VisionTransformer

PRESET = "vit_quick_patch4_16"


def _to_big_vision(model: VisionTransformer, prefix: str = "") -> dict[str, np.ndarray]:
    """Write a model's weights the way an augreg .npz stores them."""
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    dim, heads = cfg.embed_dim, cfg.num_heads
    out = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        **({"cls": s["cls_token"]} if "cls_token" in s else {}),  # none: big_vision's pool_type "gap"
        "Transformer/posembed_input/pos_embedding": s["pos_embed"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
        "head/kernel": s["head.weight"].T,
        "head/bias": s["head.bias"],
    }
    for i in range(cfg.depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            w = s[b + "attn.qkv.weight"][j * dim : (j + 1) * dim]
            out[mha + f"{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
            out[mha + f"{name}/bias"] = s[b + "attn.qkv.bias"][j * dim : (j + 1) * dim].reshape(heads, -1)
        out[mha + "out/kernel"] = s[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        out[mha + "out/bias"] = s[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[p + f"{ln}/scale"], out[p + f"{ln}/bias"] = s[b + f"{norm}.weight"], s[b + f"{norm}.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = s[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = s[b + f"mlp.fc{r + 1}.bias"]
    return {prefix + k: v for k, v in out.items()}


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _flax_vit(a: dict[str, np.ndarray], images_nhwc: np.ndarray, depth: int) -> np.ndarray:
    kernel = a["embedding/kernel"]
    patch, _, chans, dim = kernel.shape
    batch, height, width, _ = images_nhwc.shape
    patches = images_nhwc.reshape(batch, height // patch, patch, width // patch, patch, chans)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch * patch * chans)
    x = patches @ kernel.reshape(-1, dim) + a["embedding/bias"]
    if "cls" in a:
        x = np.concatenate([np.broadcast_to(a["cls"], (batch, 1, dim)), x], axis=1)
    x = x + a["Transformer/posembed_input/pos_embedding"]
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        y = _layer_norm(x, a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"])
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, a[mha + f"{n}/kernel"]) + a[mha + f"{n}/bias"] for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(q.shape[-1])
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqn,bnhk->bqhk", att, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a[mha + "out/kernel"]) + a[mha + "out/bias"]
        y = _layer_norm(x, a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"])
        h = y @ a[p + "MlpBlock_3/Dense_0/kernel"] + a[p + "MlpBlock_3/Dense_0/bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # timm's exact GELU
        x = x + h @ a[p + "MlpBlock_3/Dense_1/kernel"] + a[p + "MlpBlock_3/Dense_1/bias"]
    x = _layer_norm(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    pooled = x[:, 0] if "cls" in a else x.mean(axis=1)  # pool_type "tok" or "gap"
    return pooled @ a["head/kernel"] + a["head/bias"]


@pytest.mark.parametrize("prefix,pool", [("", "tok"), ("opt/target/", "tok"), ("", "gap")])
def test_big_vision_npz_loads_and_matches_a_flax_style_numpy_forward(tmp_path: Path, prefix: str, pool: str) -> None:
    # Prepare: a "gap" model is timm's class_token=False, average pooling after norm
    torch.manual_seed(3)
    config = get_preset(PRESET) if pool == "tok" else get_preset(PRESET).with_layout(class_token=False, fc_norm=False)
    source = VisionTransformer(config)
    arrays = {k: v.astype(np.float64) for k, v in _to_big_vision(source).items()}
    np.savez(tmp_path / "augreg.npz", **{prefix + k: v.astype(np.float32) for k, v in arrays.items()})
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3))
    # Execute
    model = create_model(PRESET, checkpoint=tmp_path / "augreg.npz").eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(images.transpose(0, 3, 1, 2)).float()).numpy()
    # Assert
    expected = _flax_vit(arrays, images, depth=3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)
    assert model.config.layout == source.config.layout  # read from the archive's keys


def test_big_vision_archive_missing_a_tensor_names_it() -> None:
    torch.manual_seed(0)
    arrays = _to_big_vision(VisionTransformer(get_preset(PRESET)))
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    with pytest.raises(BigVisionError, match="encoderblock_1/MlpBlock_3/Dense_0/kernel"):
        from_big_vision(arrays)


def test_an_attention_pooled_archive_is_refused_by_name() -> None:
    torch.manual_seed(0)
    arrays = _to_big_vision(VisionTransformer(get_preset(PRESET)))
    arrays["MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    with pytest.raises(BigVisionError, match="MAPHead"):
        from_big_vision(arrays)
