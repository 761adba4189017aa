"""Local timm-layout checkpoints: read, adapt (image size, class count), load, save.

Formats by suffix: ``.safetensors``; ``.pth``/``.pt``/``.bin``/``.tar`` (read with
``torch.load(weights_only=True)``, never a full unpickle; a pickled model is refused in one line
that says how to convert it); ``.npz`` holding either timm keys or Google's big_vision/augreg
layout (``Transformer/encoderblock_0/...``), converted on load.

A checkpoint fixes the model's pooling layout (``ViTConfig.global_pool``, ``class_token``,
``fc_norm``) by its keys; :func:`checkpoint_layout` reads it and :func:`create_model` builds that
layout unless told otherwise. A checkpoint without a head (timm's ``num_classes=0``, what
self-supervised pre-training publishes) gets a fresh zero-initialized head (docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import logging
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from server_runtime.big_vision import from_big_vision, is_big_vision
from server_runtime.presets import LAYOUT_FIELDS, PresetError, ViTConfig, get_preset
from server_runtime.vit import VisionTransformer

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")  # .tar: timm's train.py writes model_best.pth.tar
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_MAX_NAMED = 12
# how a user turns a pickled model they trust into a state dict (docs/checkpoints.md)
CONVERT_ONE_LINER = ("python -c \"import sys, torch; torch.save(torch.load(sys.argv[1], weights_only=False)"
                     ".state_dict(), sys.argv[2])\" MODEL.pth STATE.pth")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
        # timm's training checkpoints keep their argparse.Namespace next to the weights: a plain
        # container of values, safe to allow; anything else that is not tensors stays refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        classes = pickled_classes(path)
        if classes:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({', '.join(classes[:3])}), not a state dict of tensors, "
                f"and sflam never unpickles code: save model.state_dict() instead, or convert a file you trust "
                f"with: {CONVERT_ONE_LINER}") from None
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    return _ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def pickled_classes(path: str | Path) -> list[str]:
    """The classes a torch zip checkpoint's pickle would import, beyond torch's own and builtins,
    in the order it names them (the outermost object first), read from its opcodes without
    unpickling anything; [] if there are none or the file is not a torch zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = archive.read(name) if name is not None else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except (ValueError, EOFError):  # a damaged pickle: report what was read up to there
        pass
    plain = ("torch.", "collections.", "builtins.", "__builtin__.", "_codecs.", "copyreg.", "argparse.")
    return list(dict.fromkeys(c for c in found if c.startswith("torch.nn.") or not c.startswith(plain)))


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
    """The class count of a checkpoint's head, or None for a headless one (timm's ``num_classes=0``)."""
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def checkpoint_layout(state: StateDict) -> dict[str, object]:
    """The pooling layout a checkpoint's keys fix, as ``ViTConfig`` fields (those it fixes only).

    No ``cls_token``: no class token, so average pooling. ``fc_norm``: timm's "avg" variant (its
    default pairing; a token-pooled model with ``fc_norm`` must say ``global_pool="token"``).
    """
    layout: dict[str, object] = {}
    if "pos_embed" in state:
        layout["class_token"] = "cls_token" in state
        if not layout["class_token"]:
            layout["global_pool"] = "avg"
    if "fc_norm.weight" in state:
        layout["fc_norm"] = True
        layout.setdefault("global_pool", "avg")
    elif "norm.weight" in state:
        layout["fc_norm"] = False
    return layout


def adapt_state_dict(state: StateDict, model: VisionTransformer) -> tuple[StateDict, LoadReport]:
    """Resize the position embedding and drop a head of another class count to fit ``model``.

    A headless checkpoint reports ``head_replaced == (0, classes)``: the head will be fresh.
    """
    state = dict(state)
    target = model.state_dict()
    resized = replaced = None
    pos = state.get("pos_embed")
    prefix = model.config.num_prefix_tokens
    if pos is not None and pos.ndim == 3 and pos.shape != target["pos_embed"].shape:
        if pos.shape[2] == target["pos_embed"].shape[2]:
            old = int(round((pos.shape[1] - prefix) ** 0.5))
            new = model.patch_embed.grid_size[0]
            state["pos_embed"] = resample_pos_embed(pos, new, prefix)
            resized = (old, new)
    ckpt_classes = checkpoint_num_classes(state)
    if ckpt_classes is None:
        state.pop("head.bias", None)
        replaced = (0, model.num_classes)
    elif ckpt_classes != model.num_classes:
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
    swapped = {"norm.weight", "fc_norm.weight"} & set(missing) and {"norm.weight", "fc_norm.weight"} & set(unexpected)
    if swapped:
        problems.append(f"the checkpoint has {'fc_norm' if 'fc_norm.weight' in state else 'norm'}: "
                        f"set model.fc_norm = {str('fc_norm.weight' in state).lower()} or leave it to the checkpoint")
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
    if report.head_replaced and report.head_replaced[0] == 0:
        log.info("headless checkpoint: a fresh zero-initialized %d-class head", report.head_replaced[1])
    elif report.head_replaced:
        log.info("replaced the %d-class head with a fresh %d-class head", *report.head_replaced)
    return LoadReport(path, report.pos_embed_resized, report.head_replaced)


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, headless: bool = False) -> Path:
    """Write ``model.state_dict()`` in timm layout; the format follows the suffix.

    ``headless`` leaves the head out, as timm writes a ``num_classes=0`` model: a backbone to
    fine-tune on other classes.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (headless and k.startswith("head."))}
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
    layout: Mapping[str, object] | None = None,
    seed: int | None = None,
) -> VisionTransformer:
    """Build a preset, optionally at another image size / class count, and load a checkpoint.

    Without ``num_classes``, a checkpoint's head decides the class count (a headless one: the
    preset's). ``layout`` sets pooling fields (``global_pool``, ``class_token``, ``fc_norm``; None
    values are not set); the others follow the checkpoint's keys, then timm's defaults.
    """
    config = get_preset(preset) if isinstance(preset, str) else preset
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if num_classes is None and state is not None:
        num_classes = checkpoint_num_classes(state)
    changes = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    config = config.replace(**changes) if changes else config
    config = _layout_config(config, layout, state, checkpoint)
    if seed is not None:
        torch.manual_seed(seed)
    model = VisionTransformer(config)
    if state is not None:
        load_state(model, state, str(checkpoint))
    return model


def _layout_config(config: ViTConfig, layout: Mapping[str, object] | None, state: StateDict | None = None,
                   source: str | Path | None = None) -> ViTConfig:
    """``config`` in the layout asked for, completed by the checkpoint's keys, then timm's defaults."""
    asked = {k: v for k, v in (layout or {}).items() if v is not None}
    unknown = sorted(set(asked) - set(LAYOUT_FIELDS))
    if unknown:
        raise PresetError(f"unknown layout fields {', '.join(unknown)}; known: {', '.join(LAYOUT_FIELDS)}")
    found = checkpoint_layout(state) if state is not None else {}
    if not asked and not found:
        return config
    try:
        return config.with_layout(**{**found, **asked})
    except PresetError as exc:
        if source is None:
            raise
        raise CheckpointError(f"{source}: {exc} (the checkpoint's keys say {found})") from None
