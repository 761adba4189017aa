"""torch -> ONNX: the three device graphs as single-file opset-18 models with a dynamic batch.

Each file is checked with ``onnx.checker`` and its names, opset, batch axes and storage are
verified; then all three run in onnxruntime (through ``edge_runtime``'s OnnxBackend, as a
device would run them) against torch at several batch sizes before the artifacts are returned.
A failed check raises; the files stay in ``out_dir`` for inspection.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data
from onnxscript import opset18 as op

from edge_runtime.backends.onnx_backend import FILES, OnnxBackend
from export import verify
from export.artifact import Artifact, ExportError
from server_runtime.presets import ViTConfig

log = logging.getLogger(__name__)

OPSET = 18


def _reduce_all_or_some(reduce: Callable[..., object], self: object, dim: Sequence[int], keepdim: bool) -> object:
    if not dim:  # reduce every axis: the opset-18 reductions do that when no axes are given
        return reduce(self, keepdims=int(keepdim))
    return reduce(self, op.Constant(value_ints=list(dim)), keepdims=int(keepdim))


def _amin(self: object, dim: Sequence[int] = (), keepdim: bool = False) -> object:
    return _reduce_all_or_some(op.ReduceMin, self, dim, keepdim)


def _amax(self: object, dim: Sequence[int] = (), keepdim: bool = False) -> object:
    return _reduce_all_or_some(op.ReduceMax, self, dim, keepdim)


# onnxscript's aten::amin / aten::amax require ``dim``; the per-tensor range (``x.amin()``) has none.
_TRANSLATIONS = {torch.ops.aten.amin.default: _amin, torch.ops.aten.amax.default: _amax}


def export_onnx(
    out_dir: Path, config: ViTConfig, *, sample_batch: int = 2, check_batches: tuple[int, ...] = (1, 3)
) -> list[Artifact]:
    """Write embed.onnx, forward.onnx and train_step.onnx to ``out_dir``, verified against torch."""
    if sample_batch < 2:
        raise ValueError(f"sample_batch must be >= 2 (torch.export specialises a batch of 1), got {sample_batch}")
    if not check_batches or min(check_batches) < 1:
        raise ValueError(f"check_batches must be batch sizes >= 1, got {check_batches}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for signature in verify.GRAPHS:
        start = time.perf_counter()
        _export_graph(signature, out_dir / FILES[signature], config, sample_batch)
        check_file(out_dir / FILES[signature], signature)
        seconds[signature] = time.perf_counter() - start
        log.info("exported %s for %s in %.1f s", FILES[signature], config.name, seconds[signature])
    runs = verify.backend_runs(OnnxBackend(out_dir))
    artifacts = []
    for signature in verify.GRAPHS:
        parity = verify.check_signatures({signature: runs[signature]}, config, check_batches)
        log.info("%s parity: %s", FILES[signature], parity)
        inputs, outputs = verify.SIGNATURES[signature]
        extra = {"opset": OPSET, "inputs": list(inputs), "outputs": list(outputs),
                 "check_batches": list(check_batches), "export_s": round(seconds[signature], 3)}
        artifacts.append(Artifact(out_dir / FILES[signature], "onnx", (signature,), None, parity, True, extra))
    return artifacts


def _export_graph(signature: str, path: Path, config: ViTConfig, sample_batch: int) -> None:
    """torch.onnx.export (dynamo) of one graph with a dynamic batch, as a single file."""
    inputs, outputs = verify.SIGNATURES[signature]
    sample = verify.select(signature, verify.reference_inputs(config, sample_batch))
    args = tuple(torch.from_numpy(np.array(sample[name], np.float32)) for name in inputs)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: ({0: batch} if name in verify.BATCH_INPUTS else None) for name in inputs}
    with warnings.catch_warnings():
        # Inputs sharing the one batch Dim make the exporter say it keeps a single axis name.
        warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used.*")
        # torch's own pytree deprecation, raised inside torch.export; nothing for a caller to do.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        torch.onnx.export(
            verify.GRAPHS[signature]().eval(), args, str(path), dynamo=True, external_data=False,
            opset_version=OPSET, dynamic_shapes=dynamic, input_names=list(inputs),
            output_names=list(outputs), custom_translation_table=_TRANSLATIONS, verbose=False,
        )


def check_file(path: Path, signature: str) -> None:
    """ExportError unless ``path`` passes onnx.checker, is one self-contained file of opset 18 and
    carries the signature's input/output names with a symbolic batch axis where batches vary."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    opset = {o.domain: o.version for o in model.opset_import}.get("", None)
    if opset != OPSET:
        problems.append(f"opset {opset}, expected {OPSET}")
    if any(uses_external_data(t) for t in model.graph.initializer):
        problems.append("initializers stored as external data")
    inputs, outputs = verify.SIGNATURES[signature]
    for kind, found, expected in (("inputs", model.graph.input, inputs), ("outputs", model.graph.output, outputs)):
        names = tuple(v.name for v in found)
        if names != expected:
            problems.append(f"{kind} {names}, expected {expected}")
    for value in (*model.graph.input, *model.graph.output):
        if value.name in verify.BATCH_INPUTS | verify.BATCH_OUTPUTS:
            first = value.type.tensor_type.shape.dim[0]
            if not first.dim_param:
                problems.append(f"{value.name} has a fixed batch of {first.dim_value}")
    if problems:
        raise ExportError(f"{path}: " + "; ".join(problems))
