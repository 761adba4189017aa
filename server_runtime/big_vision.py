"""Google's big_vision / augreg ``.npz`` ViT checkpoints <-> timm parameter names (numpy only).

The mapping timm applies when it loads these files (``_load_weights`` in its ViT module):
Flax kernels are (in, out) and the attention projections are split per head. A model with
``pool_type="gap"`` has no ``cls``: it converts to timm's ``class_token=False`` with average
pooling after ``norm`` (docs/checkpoints.md); attention pooling (``MAPHead``) is refused.
"""

from __future__ import annotations

import re

import numpy as np

Arrays = dict[str, np.ndarray]
_PREFIXES = ("opt/target/", "params/")
_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")


class BigVisionError(ValueError):
    """An .npz that looks like big_vision layout but lacks a tensor the mapping needs."""


def is_big_vision(arrays: Arrays) -> bool:
    """Whether the archive uses big_vision names rather than timm's."""
    return any("Transformer/" in key or key.endswith("embedding/kernel") for key in arrays)


def _strip(arrays: Arrays) -> Arrays:
    for prefix in _PREFIXES:
        if any(key.startswith(prefix) for key in arrays):
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def _get(arrays: Arrays, key: str) -> np.ndarray:
    try:
        return arrays[key]
    except KeyError:
        raise BigVisionError(f"big_vision checkpoint lacks {key!r}") from None


def _block_names(arrays: Arrays, prefix: str) -> tuple[str, str, str, str]:
    """(attention, norm1, norm2, mlp) sub-names: augreg and big_vision number them differently."""
    if f"{prefix}MultiHeadDotProductAttention_1/query/kernel" in arrays:
        return "MultiHeadDotProductAttention_1", "LayerNorm_0", "LayerNorm_2", "MlpBlock_3"
    return "MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1", "MlpBlock_0"


def _convert_block(arrays: Arrays, index: int) -> Arrays:
    prefix = f"Transformer/encoderblock_{index}/"
    attn, ln1, ln2, mlp = _block_names(arrays, prefix)
    dim = _get(arrays, f"{prefix}{attn}/query/kernel").shape[0]
    qkv_w = [_get(arrays, f"{prefix}{attn}/{n}/kernel").reshape(dim, -1).T for n in ("query", "key", "value")]
    qkv_b = [_get(arrays, f"{prefix}{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    out = f"blocks.{index}."
    return {
        out + "norm1.weight": _get(arrays, f"{prefix}{ln1}/scale"),
        out + "norm1.bias": _get(arrays, f"{prefix}{ln1}/bias"),
        out + "attn.qkv.weight": np.concatenate(qkv_w, axis=0),
        out + "attn.qkv.bias": np.concatenate(qkv_b, axis=0),
        out + "attn.proj.weight": _get(arrays, f"{prefix}{attn}/out/kernel").reshape(-1, dim).T,
        out + "attn.proj.bias": _get(arrays, f"{prefix}{attn}/out/bias"),
        out + "norm2.weight": _get(arrays, f"{prefix}{ln2}/scale"),
        out + "norm2.bias": _get(arrays, f"{prefix}{ln2}/bias"),
        out + "mlp.fc1.weight": _get(arrays, f"{prefix}{mlp}/Dense_0/kernel").T,
        out + "mlp.fc1.bias": _get(arrays, f"{prefix}{mlp}/Dense_0/bias"),
        out + "mlp.fc2.weight": _get(arrays, f"{prefix}{mlp}/Dense_1/kernel").T,
        out + "mlp.fc2.bias": _get(arrays, f"{prefix}{mlp}/Dense_1/bias"),
    }


def from_big_vision(arrays: Arrays) -> Arrays:
    """Convert a big_vision/augreg ViT archive to a timm state dict (numpy arrays)."""
    arrays = _strip(arrays)
    if any(key.startswith("MAPHead") for key in arrays):
        raise BigVisionError("attention pooling (big_vision's MAPHead, pool_type 'map') is not supported; "
                             "the token ('tok') and average ('gap') poolings are")
    depth = 1 + max((int(m.group(1)) for k in arrays if (m := _BLOCK.match(k))), default=-1)
    state = {
        "patch_embed.proj.weight": _get(arrays, "embedding/kernel").transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": _get(arrays, "embedding/bias"),
        **({"cls_token": arrays["cls"]} if "cls" in arrays else {}),  # none: pool_type "gap"
        "pos_embed": _get(arrays, "Transformer/posembed_input/pos_embedding"),
        "norm.weight": _get(arrays, "Transformer/encoder_norm/scale"),
        "norm.bias": _get(arrays, "Transformer/encoder_norm/bias"),
    }
    if "head/kernel" in arrays:
        state["head.weight"] = arrays["head/kernel"].T
        state["head.bias"] = _get(arrays, "head/bias")
    for index in range(depth):
        state.update(_convert_block(arrays, index))
    return {k: np.ascontiguousarray(v) for k, v in state.items()}
