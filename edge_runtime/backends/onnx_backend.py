"""The ONNX Runtime backend: a bundle's embed / forward / train_step .onnx files on the CPU.

onnxruntime is imported when a backend is made, so the rest of ``edge_runtime`` works without
it. One InferenceSession per file, created once; inputs and outputs are passed by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.base import SIGNATURES, Array, BackendError

log = logging.getLogger(__name__)

FILES = {"embed": "embed.onnx", "forward": "forward.onnx", "train_step": "train_step.onnx"}
NAMES = SIGNATURES  # as ``export.onnx_export`` writes them


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            "the onnx backend needs onnxruntime (pip install 'sflam[edge]' or onnxruntime)"
        ) from exc
    return onnxruntime


class OnnxBackend:
    """The device graphs of a bundle run by onnxruntime's CPU execution provider."""

    name = "onnx"

    def __init__(self, bundle_dir: Path, files: dict[str, str] | None = None, *, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        self.bundle_dir = Path(bundle_dir)
        files = dict(FILES if files is None else files)
        unknown = sorted(set(files) - set(NAMES))
        if unknown:
            raise BackendError(f"unknown graph(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # A device process is memory-bound, not allocation-bound: an arena keeps the peak of every
        # graph's buffers for the life of the session, and memory patterns pre-plan one more block
        # per graph. Without them ViT-B/32 batch 8 peaks ~45 MB lower (benchmarks/bench_edge_footprint.py).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        if threads is not None:
            options.intra_op_num_threads = threads
        self._sessions = {sig: self._open(ort, options, sig, name) for sig, name in files.items()}

    def _open(self, ort: Any, options: Any, signature: str, file_name: str) -> Any:
        path = self.bundle_dir / file_name
        if not path.is_file():
            raise BackendError(f"the {signature} graph {file_name} is missing from {self.bundle_dir}")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception
            raise BackendError(f"onnxruntime cannot load {path} ({signature}): {exc}") from exc
        inputs, outputs = NAMES[signature]
        found = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
        if (set(found[0]), set(found[1])) != (set(inputs), set(outputs)):
            raise BackendError(
                f"{path} is not a {signature} graph: it takes {found[0]} -> {found[1]}, "
                f"expected {inputs} -> {outputs}"
            )
        log.debug("loaded %s graph %s", signature, path)
        return session

    def _run(self, signature: str, **inputs: Array | float) -> list[np.ndarray]:
        session = self._sessions.get(signature)
        if session is None:
            raise BackendError(f"no {signature} graph was loaded from {self.bundle_dir}")
        feed = {name: np.asarray(value, dtype=np.float32) for name, value in inputs.items()}
        try:
            return session.run(list(NAMES[signature][1]), feed)
        except Exception as exc:  # onnxruntime's errors (InvalidArgument, ...) derive from Exception
            raise BackendError(f"onnxruntime failed to run {signature}: {exc}") from exc

    def embed(self, images: Array, weight: Array, bias: Array) -> Array:
        """images (B, C, H, W) -> tokens (B, N, D)."""
        (tokens,) = self._run("embed", images=images, weight=weight, bias=bias)
        return tokens

    def forward(
        self, images: Array, weight: Array, bias: Array, noise: Array, levels: float, per_token: bool
    ) -> tuple[Array, Array, Array]:
        """-> codes (B, N, D) as float values 0..levels, lo and hi (B, N, 1)."""
        codes, lo, hi = self._run(
            "forward", images=images, weight=weight, bias=bias, noise=noise, levels=levels,
            per_token=1.0 if per_token else 0.0,
        )
        return codes, lo, hi

    def train_step(
        self,
        weight: Array,
        bias: Array,
        momentum_weight: Array,
        momentum_bias: Array,
        images: Array,
        grad_tokens: Array,
        lr: float,
        momentum: float,
    ) -> tuple[Array, Array, Array, Array]:
        """-> updated weight, bias, momentum_weight, momentum_bias."""
        new_w, new_b, new_mw, new_mb = self._run(
            "train_step", weight=weight, bias=bias, momentum_weight=momentum_weight, momentum_bias=momentum_bias,
            images=images, grad_tokens=grad_tokens, lr=lr, momentum=momentum,
        )
        return new_w, new_b, new_mw, new_mb
