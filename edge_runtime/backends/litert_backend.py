"""The LiteRT backend: a fixed-batch .tflite with signatures embed / forward (/ train_step).

litert-torch names a signature's inputs ``args_0..args_N`` in graph-argument order and its
outputs ``output_0..``; the exporter records which name is which (``Artifact.extra["inputs"]``
and ``["outputs"]``), and without that record the backend assumes the graph order of
``export.graphs``, which is the order of the :class:`Backend` methods' arguments. A frozen
(inference-only, e.g. int8) artifact has its weights baked in: it takes no weight or bias
inputs, ignores the ones passed to it and has no ``train_step``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_runtime.backends.base import SIGNATURES, Array, BackendError

log = logging.getLogger(__name__)

# Argument and result names of each device graph, in graph order (see ``export.graphs``).
INPUTS = {sig: names[0] for sig, names in SIGNATURES.items()}
OUTPUTS = {sig: names[1] for sig, names in SIGNATURES.items()}
BAKED = ("weight", "bias")  # the inputs a frozen artifact holds as constants
BATCHED = ("images", "noise", "grad_tokens")  # inputs whose first axis is the batch
_POSITIONAL = re.compile(r"(args|output)_(\d+)$")


def default_io_names(signature: str, inputs: list[str], outputs: list[str]) -> dict[str, dict[str, str]]:
    """Graph names -> tensor names for a signature, assuming litert-torch's positional naming.

    A signature with two inputs fewer than its graph is a frozen one (weight and bias baked in).
    """
    names = INPUTS[signature]
    if len(inputs) == len(names) - len(BAKED):
        names = tuple(n for n in names if n not in BAKED)
    if len(inputs) != len(names) or len(outputs) != len(OUTPUTS[signature]):
        raise BackendError(
            f"signature {signature!r} has inputs {inputs} and outputs {outputs}; expected "
            f"{len(INPUTS[signature])} (or {len(names)} frozen) inputs and {len(OUTPUTS[signature])} outputs"
        )
    return {
        "inputs": dict(zip(names, _by_position(inputs))),
        "outputs": dict(zip(OUTPUTS[signature], _by_position(outputs))),
    }


def _by_position(tensor_names: list[str]) -> list[str]:
    """``args_i`` / ``output_i`` names sorted by i (``args_10`` after ``args_9``)."""
    matches = [_POSITIONAL.match(n) for n in tensor_names]
    if not all(matches):
        raise BackendError(f"tensor names {tensor_names} are not litert-torch's args_i / output_i; pass io_names")
    return [m.group(0) for m in sorted(matches, key=lambda m: int(m.group(2)))]


class LiteRTBackend:
    """Runs a .tflite device artifact through ``ai_edge_litert`` signature runners (made once)."""

    name = "litert"

    def __init__(self, model_path: Path, io_names: Mapping[str, Any] | None = None, num_threads: int | None = None):
        """``io_names``: ``{"inputs": {sig: {arg: tensor}}, "outputs": {sig: {result: tensor}}}``
        (an exporter's ``Artifact.extra`` will do); None assumes litert-torch's positional names."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise BackendError(f"the LiteRT backend needs ai-edge-litert (pip install 'sflam[edge]'): {exc}") from None

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise BackendError(f"{self.model_path}: no such model file")
        try:
            self._interpreter = Interpreter(model_path=str(self.model_path), num_threads=num_threads)
            listed = self._interpreter.get_signature_list()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"{self.model_path}: LiteRT cannot load it ({exc})") from None
        unknown = sorted(set(listed) - set(INPUTS))
        if unknown or "forward" not in listed:
            raise BackendError(
                f"{self.model_path}: signatures {sorted(listed)}; expected forward and any of {sorted(INPUTS)}"
            )
        self._runners = {sig: self._interpreter.get_signature_runner(sig) for sig in listed}
        self._io = {sig: self._names(sig, listed[sig], io_names) for sig in listed}
        self._shapes = {
            sig: {name: tuple(int(d) for d in detail["shape"]) for name, detail in runner.get_input_details().items()}
            for sig, runner in self._runners.items()
        }
        self.batch = self._shapes["forward"][self._io["forward"]["inputs"]["images"]][0]
        log.debug("loaded %s: signatures %s, batch %d", self.model_path, sorted(listed), self.batch)

    @property
    def signatures(self) -> tuple[str, ...]:
        """The signatures the model holds."""
        return tuple(sorted(self._runners))

    @property
    def trainable(self) -> bool:
        """Whether the artifact can train its weights (has a train_step)."""
        return "train_step" in self._runners

    def _names(
        self, sig: str, listed: dict[str, list[str]], io_names: Mapping[str, Any] | None
    ) -> dict[str, dict[str, str]]:
        """The argument -> tensor name maps of one signature, checked against the model."""
        given = io_names or {}
        if sig in given.get("inputs", {}) and sig in given.get("outputs", {}):
            names = {"inputs": dict(given["inputs"][sig]), "outputs": dict(given["outputs"][sig])}
        else:
            names = default_io_names(sig, list(listed["inputs"]), list(listed["outputs"]))
        args, results = set(names["inputs"]), set(names["outputs"])
        if args not in (set(INPUTS[sig]), set(INPUTS[sig]) - set(BAKED)) or results != set(OUTPUTS[sig]):
            raise BackendError(
                f"{self.model_path}: io names of {sig!r} map {sorted(args)} -> {sorted(results)}; "
                f"expected {INPUTS[sig]} (weight and bias may be baked in) -> {OUTPUTS[sig]}"
            )
        unmatched = sorted(set(names["inputs"].values()) ^ set(listed["inputs"]))
        unmatched += sorted(set(names["outputs"].values()) ^ set(listed["outputs"]))
        if unmatched:
            raise BackendError(f"{self.model_path}: io names of {sig!r} do not match the model's tensors {unmatched}")
        return names

    def _run(self, sig: str, values: dict[str, Any]) -> tuple[Array, ...]:
        """Run one signature on named arguments (baked ones dropped), results in graph order."""
        if sig not in self._runners:
            why = ": a frozen, inference-only artifact cannot train; use the fp32 tflite" if sig == "train_step" else ""
            have = ", ".join(self.signatures)
            raise BackendError(f"{self.model_path.name} has no {sig!r} signature (it has {have}){why}")
        names = self._io[sig]
        feed = {}
        for arg, tensor in names["inputs"].items():
            value = np.asarray(values[arg], dtype=np.float32)
            self._check_shape(sig, arg, value.shape, self._shapes[sig][tensor])
            feed[tensor] = value
        out = self._runners[sig](**feed)
        return tuple(np.array(out[names["outputs"][result]], dtype=np.float32) for result in OUTPUTS[sig])

    def _check_shape(self, sig: str, arg: str, given: tuple[int, ...], expected: tuple[int, ...]) -> None:
        """BackendError naming the fixed batch, or the expected shape, when an input does not fit."""
        if given == expected:
            return
        if arg in BATCHED and len(given) == len(expected) and given[1:] == expected[1:]:
            raise BackendError(
                f"{self.model_path.name} was exported for a fixed batch of {expected[0]}; {sig} got {arg} "
                f"with a batch of {given[0]} (re-export for batch {given[0]}, or pad the batch to {expected[0]})"
            )
        raise BackendError(f"{self.model_path.name}: {sig} expects {arg} of shape {expected}, got {given}")

    def embed(self, images: Array, weight: Array, bias: Array) -> Array:
        """images (B, C, H, W) -> tokens (B, N, D)."""
        return self._run("embed", {"images": images, "weight": weight, "bias": bias})[0]

    def forward(
        self, images: Array, weight: Array, bias: Array, noise: Array, levels: float, per_token: bool
    ) -> tuple[Array, Array, Array]:
        """-> codes (B, N, D) as float values 0..levels, lo and hi (B, N, 1)."""
        values = {"images": images, "weight": weight, "bias": bias, "noise": noise,
                  "levels": np.float32(levels), "per_token": np.float32(1.0 if per_token else 0.0)}
        codes, lo, hi = self._run("forward", values)
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
        """-> updated weight, bias, momentum_weight, momentum_bias (SGD with momentum)."""
        values = {"weight": weight, "bias": bias, "momentum_weight": momentum_weight, "momentum_bias": momentum_bias,
                  "images": images, "grad_tokens": grad_tokens, "lr": np.float32(lr), "momentum": np.float32(momentum)}
        new_w, new_b, new_mw, new_mb = self._run("train_step", values)
        return new_w, new_b, new_mw, new_mb
