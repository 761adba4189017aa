"""Local timm-layout checkpoints: read, adapt (image size, class count), load, save.

Formats by suffix: ``.safetensors``; ``.pth``/``.pt``/``.bin`` (read with
``torch.load(weights_only=True)``, never a full unpickle); ``.npz`` holding either timm keys or
Google's big_vision/augreg layout (``Transformer/encoderblock_0/...``), converted on load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from server_runtime.big_vision import from_big_vision, is_big_vision
from server_runtime.presets import ViTConfig, get_preset
from server_runtime.vit import VisionTransformer

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_MAX_NAMED = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the keys."""


@dataclass(frozen=True)
class LoadReport:
    """What loading changed to make a checkpoint fit."""

    path: str
    pos_embed_resized: tuple[int, int] | None = None  # (old grid, new grid)
    head_replaced: tuple[int, int] | None = None  # (checkpoint classes, model classes)
    ignored_keys: tuple[str, ...] = field(default_factory=tuple)


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a local checkpoint file, keyed by timm names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in _TORCH_SUFFIXES:
        state = _read_torch(path)
    elif suffix == ".npz":
        state = _read_npz(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (.safetensors, .pth, .pt, .bin, .npz)")
    return {_strip_prefix(key): value for key, value in state.items()}


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_torch(path: Path) -> StateDict:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({exc})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


def _read_npz(path: Path) -> StateDict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz archive ({exc})") from exc
    if is_big_vision(arrays):
        arrays = from_big_vision(arrays)
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of the patch part of an absolute position embedding (timm's method)."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(round(patches.shape[1] ** 0.5))
    if old_grid * old_grid != patches.shape[1]:
        raise CheckpointError(f"pos_embed has {patches.shape[1]} patch positions: not a square grid")
    dim = patches.shape[2]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def checkpoint_num_classes(state: StateDict) -> int | None:
    """The class count of a checkpoint's head, if it has one."""
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def adapt_state_dict(state: StateDict, model: VisionTransformer) -> tuple[StateDict, LoadReport]:
    """Resize the position embedding and drop a head of another class count to fit ``model``."""
    state = dict(state)
    target = model.state_dict()
    resized = replaced = None
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != target["pos_embed"].shape:
        if pos.shape[2] == target["pos_embed"].shape[2]:
            old = int(round((pos.shape[1] - 1) ** 0.5))
            new = model.patch_embed.grid_size[0]
            state["pos_embed"] = resample_pos_embed(pos, new)
            resized = (old, new)
    ckpt_classes = checkpoint_num_classes(state)
    if ckpt_classes is not None and ckpt_classes != model.num_classes:
        state.pop("head.weight")
        state.pop("head.bias", None)
        replaced = (ckpt_classes, model.num_classes)
    return state, LoadReport("", resized, replaced)


def _check_fit(state: StateDict, model: VisionTransformer, path: str, head_replaced: bool) -> None:
    target = model.state_dict()
    expected = set(target) - ({"head.weight", "head.bias"} if head_replaced else set())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    )
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:_MAX_NAMED]) + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_NAMED else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"{path} does not fit {model.config.name}:\n  " + "\n  ".join(problems))


def load_checkpoint(model: VisionTransformer, path: str | Path) -> LoadReport:
    """Load a local checkpoint into ``model`` (adapting pos embed and head); strict otherwise."""
    return load_state(model, read_state_dict(path), str(path))


def load_state(model: VisionTransformer, state: StateDict, path: str = "<state dict>") -> LoadReport:
    """Load timm-layout tensors into ``model``; ``path`` only names the source in errors."""
    state, report = adapt_state_dict(state, model)
    _check_fit(state, model, path, report.head_replaced is not None)
    if report.head_replaced is not None:
        model.reset_head(model.num_classes)
    model.load_state_dict(state, strict=report.head_replaced is None)
    if report.pos_embed_resized:
        log.info("resized pos_embed grid %d -> %d", *report.pos_embed_resized)
    if report.head_replaced:
        log.info("replaced the %d-class head with a fresh %d-class head", *report.head_replaced)
    return LoadReport(path, report.pos_embed_resized, report.head_replaced)


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` in timm layout; the format follows the suffix."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif suffix in _TORCH_SUFFIXES:
        torch.save(state, path)
    elif suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (.safetensors, .pth, .npz)")
    return path


def create_model(
    preset: str | ViTConfig,
    *,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    seed: int | None = None,
) -> VisionTransformer:
    """Build a preset, optionally at another image size / class count, and load a checkpoint.

    Without ``num_classes``, a checkpoint's head decides the class count.
    """
    config = get_preset(preset) if isinstance(preset, str) else preset
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if num_classes is None and state is not None:
        num_classes = checkpoint_num_classes(state)
    changes = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    config = config.replace(**changes) if changes else config
    if seed is not None:
        torch.manual_seed(seed)
    model = VisionTransformer(config)
    if state is not None:
        load_state(model, state, str(checkpoint))
    return model
