"""Atomic run checkpoints for the server daemon (``--resume``).

A checkpoint directory holds ``round-{round:06d}-{plan_round:06d}.safetensors`` files (model,
optimizer and RNG tensors) and one ``state.json`` that names the current one with its sha256.
Every file is written to a temp file, fsynced and renamed into place, then the directory is
fsynced; ``state.json`` is written last and is the commit point. A crash at any moment leaves
either the previous committed round or the new one, never a mix.

Tensor names in the safetensors file: ``model.<timm name>``, ``optim.<param index>.<key>``,
``optim.group.<group index>.<key>`` (tensor-valued hyper-parameters) and ``rng.<name>``
(``rng.torch``, ``rng.cuda.<device>``). Everything else goes to ``state.json``, where a tensor
is written as ``{"__tensor__": name}``, a tuple as ``{"__tuple__": [...]}`` and an int-keyed
dict (the optimizer's per-parameter state) as ``{"__intdict__": {"0": ...}}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server_runtime.round_record import RoundRecord, RoundRecordError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_ROUND_FILE = re.compile(r"^round-(\d+)-(\d+)\.safetensors$")
_TMP_SUFFIX = ".tmp"
_HASH_CHUNK_BYTES = 1 << 20
_RNG_KEYS = ("torch", "cuda", "numpy_legacy", "python")


class RunStateError(ValueError):
    """A run checkpoint that is unreadable or inconsistent; the message names the file."""


@dataclass
class RunState:
    """Everything the daemon needs to continue a run after a restart."""

    round: int  # training rounds completed and counted (0 = none yet)
    plan_round: int  # last wire round number the server issued (monotonic, never reused)
    model: dict[str, torch.Tensor]  # global full-model state dict (timm names), CPU tensors
    optimizer: dict | None = None  # torch optimizer.state_dict() or None
    rng: dict = field(default_factory=dict)  # as returned by capture_rng()
    record: RoundRecord | None = None  # metrics record of the last round attempt, without its checkpoint time
    config: dict = field(default_factory=dict)  # JSON-able run config
    extra: dict = field(default_factory=dict)  # JSON-able anything else (e.g. device registry)


# ---------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict:
    """The state of torch (CPU and CUDA), numpy's legacy global and Python's ``random``."""
    np_state = np.random.get_state(legacy=True)
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_legacy": {
            "algorithm": str(np_state[0]),
            "keys": [int(k) for k in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Put back the generator states of ``capture_rng``; parts missing from ``rng`` are left alone."""
    unknown = set(rng) - set(_RNG_KEYS)
    if unknown:
        raise ValueError(f"unknown RNG state parts {sorted(unknown)} (known: {list(_RNG_KEYS)})")
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        _restore_cuda_rng(list(rng["cuda"]))
    if "numpy_legacy" in rng:
        state = rng["numpy_legacy"]
        keys = np.asarray(state["keys"], dtype=np.uint32)
        np.random.set_state(
            (state["algorithm"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
        )
    if "python" in rng:
        version, internal, gauss_next = rng["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states) != available:
        log.warning("RNG state has %d CUDA generators, this machine has %d; restoring %d",
                    len(states), available, min(len(states), available))
    for device, state in enumerate(states[:available]):
        torch.cuda.set_rng_state(state, device)


# ---------------------------------------------------------------------------------------------
# JSON trees with tensors split out


def _encode_tree(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data; its tensors move to ``tensors`` under dotted names."""
    if isinstance(obj, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors map to the same name {name!r}")
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_tree(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode_tree(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return _encode_mapping(obj, name, tensors)
    raise ValueError(f"{name}: cannot store a {type(obj).__name__} in a run checkpoint")


def _encode_mapping(obj: Mapping, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    items = {k: _encode_tree(v, f"{name}.{k}", tensors) for k, v in obj.items()}
    if all(isinstance(k, str) for k in obj):
        return items
    if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
        return {"__intdict__": {str(k): v for k, v in items.items()}}
    raise ValueError(f"{name}: dict keys must be all str or all int, got {list(obj)[:5]}")


def _decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """Inverse of ``_encode_tree``; ``where`` names the file for errors."""
    if isinstance(obj, list):
        return [_decode_tree(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        if obj["__tensor__"] not in tensors:
            raise RunStateError(f"{where}: tensor {obj['__tensor__']!r} is missing")
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode_tree(v, tensors, where) for v in obj["__tuple__"])
    if set(obj) == {"__intdict__"}:
        return {int(k): _decode_tree(v, tensors, where) for k, v in obj["__intdict__"].items()}
    return {k: _decode_tree(v, tensors, where) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Durable files


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temp file next to ``path``, fsync it and rename it to ``path``."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_temp_files(directory: Path) -> None:
    for tmp in directory.glob(f"*{_TMP_SUFFIX}"):
        log.warning("removing %s left over from an interrupted save", tmp)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Save


def save_run_state(directory: str | Path, state: RunState, keep: int = 2) -> Path:
    """Commit ``state`` to ``directory`` and prune old tensor files; returns the state.json path."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if state.round < 0 or state.plan_round < 0:
        raise ValueError(f"round and plan_round must be >= 0, got {state.round}, {state.plan_round}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = _split_state(state)
    tensor_path = directory / f"round-{state.round:06d}-{state.plan_round:06d}.safetensors"
    _write_durably(tensor_path, lambda tmp: _save_tensors(tmp, tensors))
    meta["file"] = tensor_path.name
    meta["sha256"] = _sha256(tensor_path)
    text = json.dumps(meta, indent=1)
    state_path = directory / STATE_FILE
    _write_durably(state_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _prune(directory, tensor_path.name, keep)
    log.info("run state for round %d (plan round %d) saved to %s", state.round, state.plan_round, directory)
    return state_path


def _split_state(state: RunState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors for the safetensors file and the JSON-able rest for state.json."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.model.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[f"model.{key}"] = value
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "round": state.round,
        "plan_round": state.plan_round,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model_keys": list(state.model),
        "optimizer": _encode_optimizer(state.optimizer, tensors),
        "rng": _encode_tree(state.rng, "rng", tensors),
    }
    meta["record"] = state.record.to_dict() if state.record is not None else None
    for name in ("config", "extra"):
        meta[name] = _check_json(getattr(state, name), name)
    return tensors, meta


def _encode_optimizer(optimizer: Mapping | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    if optimizer is None:
        return None
    if set(optimizer) != {"state", "param_groups"}:
        raise ValueError(f"optimizer must be a torch state_dict with state and param_groups, got {list(optimizer)}")
    return {
        "state": _encode_tree(optimizer["state"], "optim", tensors),
        "param_groups": _encode_tree(optimizer["param_groups"], "optim.group", tensors),
    }


def _check_json(value: Any, name: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RunState.{name} is not JSON-able: {exc}") from exc
    return value


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    ready = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel() > 0:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen.add(storage)
        ready[name] = tensor
    save_file(ready, str(path), metadata={"format_version": str(FORMAT_VERSION)})


def _prune(directory: Path, current: str, keep: int) -> None:
    """Keep ``current`` and the ``keep - 1`` newest older files; drop older and abandoned newer ones."""
    _remove_abandoned(directory, current)
    older = sorted(
        (p for p in directory.glob("round-*.safetensors") if p.name != current and _round_key(p.name) is not None),
        key=lambda p: _round_key(p.name),
    )
    for path in older[: max(0, len(older) - (keep - 1))]:
        path.unlink(missing_ok=True)


def _remove_abandoned(directory: Path, committed: str) -> None:
    """Delete tensor files newer than the committed one: written by a save that never committed."""
    committed_key = _round_key(committed)
    for path in directory.glob("round-*.safetensors"):
        key = _round_key(path.name)
        if key is not None and key > committed_key:
            log.warning("removing %s: newer than the committed %s (a save that never committed)", path, committed)
            path.unlink(missing_ok=True)


def _round_key(name: str) -> tuple[int, int] | None:
    match = _ROUND_FILE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------------------------------------
# Load


def load_run_state(directory: str | Path) -> RunState | None:
    """The last committed run state in ``directory``, or None when there is none.

    Temp files and tensor files newer than the committed one (a save that crashed before its
    commit) are deleted.
    """
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not directory.is_dir():
        return None
    _remove_temp_files(directory)
    if not state_path.is_file():
        return None
    meta = _read_meta(state_path)
    tensor_path = directory / meta["file"]
    tensors = _read_tensors(tensor_path, meta["sha256"])
    _remove_abandoned(directory, meta["file"])
    return _build_state(meta, tensors, str(tensor_path))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunStateError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise RunStateError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunStateError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key, kind in (("round", int), ("plan_round", int), ("file", str), ("sha256", str), ("model_keys", list)):
        if not isinstance(meta.get(key), kind):
            raise RunStateError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if Path(meta["file"]).name != meta["file"] or _round_key(meta["file"]) is None:
        raise RunStateError(f"{path}: file {meta['file']!r} is not a round-*.safetensors name")
    return meta


def _read_tensors(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunStateError(f"{path}: named by {STATE_FILE} but missing")
    actual = _sha256(path)
    if actual != expected_sha256:
        raise RunStateError(f"{path}: sha256 mismatch ({STATE_FILE} says {expected_sha256}, file has {actual})")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise RunStateError(f"{path}: not a readable safetensors file ({exc})") from exc


def _build_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> RunState:
    try:
        return _rebuild(meta, tensors, where)
    except RunStateError:
        raise
    except RoundRecordError as exc:
        raise RunStateError(f"{where}: the record in {STATE_FILE} is {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise RunStateError(f"{where}: {STATE_FILE} does not describe a run state ({exc!r})") from exc


def _rebuild(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> RunState:
    missing = [key for key in meta["model_keys"] if f"model.{key}" not in tensors]
    if missing:
        raise RunStateError(f"{where}: model tensors missing: {missing[:10]}")
    model = {key: tensors[f"model.{key}"] for key in meta["model_keys"]}
    optimizer = meta.get("optimizer")
    if optimizer is not None:
        optimizer = {
            "state": _decode_tree(optimizer["state"], tensors, where),
            "param_groups": _decode_tree(optimizer["param_groups"], tensors, where),
        }
    return RunState(
        round=meta["round"],
        plan_round=meta["plan_round"],
        model=model,
        optimizer=optimizer,
        rng=_decode_tree(meta.get("rng", {}), tensors, where),
        record=RoundRecord.from_dict(meta["record"]) if meta.get("record") is not None else None,
        config=meta.get("config") or {},
        extra=meta.get("extra") or {},
    )
