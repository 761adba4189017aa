"""Parity of any runtime's device graphs against torch: the checks every exporter runs.

A runtime plugs in as a ``Run``: a callable taking the graph's named numpy inputs (float32;
scalars as 0-d arrays) and returning its outputs, in the order of :data:`SIGNATURES` or by name.
``embed`` and ``forward`` are compared with the torch graphs of :mod:`export.graphs`;
``train_step`` is chained over several steps (the runtime's own outputs fed back, as on a
device) and compared with an independent oracle: autograd through ``nn.Conv2d`` and
``torch.optim.SGD`` with momentum. A check that fails raises :class:`ParityError` naming the
metric, its value and the threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edge_runtime.backends.base import SIGNATURES, Backend
from export.artifact import ParityError
from export.graphs import EmbedGraph, ForwardGraph, TrainStepGraph
from server_runtime.presets import ViTConfig
from server_runtime.vit import VisionTransformer

Run = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray] | Mapping[str, np.ndarray]]

# SIGNATURES (from edge_runtime.backends.base): signature -> (input names, output names).
BATCH_INPUTS = frozenset({"images", "noise", "grad_tokens"})  # dimension 0 is the batch
BATCH_OUTPUTS = frozenset({"tokens", "codes", "lo", "hi"})

# Thresholds. Float errors are max |actual - expected| / max(1, max |expected|), except
# train_step, which is relative to each tensor's own scale: max |a - e| / max |e|.
EMBED_TOLERANCE = 1e-5
RANGE_TOLERANCE = 1e-5  # lo / hi of the quantizer
TRAIN_STEP_TOLERANCE = 1e-5
CODE_MAX_DIFF = 1  # runtimes may disagree by one code on boundary values (docs/export.md section 6)
CODE_MISMATCH_FRACTION = 1e-3  # ... and only on this fraction of the codes (at least one allowed)

LEVELS = (1.0, 15.0, 255.0)  # q = 1, 4, 8 bits
GRAD_SCALE = 1e-2  # d loss / d tokens, the order of a batch-mean cross-entropy gradient
LR, MOMENTUM = 0.01, 0.9  # the paper's SGD settings


@functools.lru_cache(maxsize=8)
def _device_weights(config: ViTConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch-embedding weight and bias as a fresh model initialises them (one block suffices)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = VisionTransformer(config.replace(depth=1)).patch_embed.proj
    return proj.weight.detach().numpy().copy(), proj.bias.detach().numpy().copy()


def batch_data(config: ViTConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The per-batch inputs: normalised images, U[0,1) noise and d loss / d tokens."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    size, chans = config.img_size, config.in_chans
    pixels = rng.random((batch, chans, size, size), dtype=np.float32)
    mean = np.asarray(config.mean[:chans], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.std[:chans], np.float32).reshape(1, -1, 1, 1)
    tokens_shape = (batch, config.num_patches, config.embed_dim)
    return {
        "images": (pixels - mean) / std,
        "noise": rng.random(tokens_shape, dtype=np.float32),
        "grad_tokens": (rng.standard_normal(tokens_shape) * GRAD_SCALE).astype(np.float32),
    }


def reference_inputs(
    config: ViTConfig, batch: int, seed: int = 0, *, levels: float = 255.0, per_token: bool = True
) -> dict[str, np.ndarray]:
    """Every graph input at a realistic scale: :func:`batch_data`, initialised weights, zero buffers."""
    weight, bias = _device_weights(config, seed)
    return {
        **batch_data(config, batch, seed),
        "weight": weight.copy(),
        "bias": bias.copy(),
        "levels": np.float32(levels).reshape(()),
        "per_token": np.float32(1.0 if per_token else 0.0).reshape(()),
        "momentum_weight": np.zeros_like(weight),
        "momentum_bias": np.zeros_like(bias),
        "lr": np.float32(LR).reshape(()),
        "momentum": np.float32(MOMENTUM).reshape(()),
    }


def select(signature: str, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of ``signature`` picked out of ``values``."""
    return {name: values[name] for name in SIGNATURES[signature][0]}


def outputs_of(
    signature: str, result: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray
) -> tuple[np.ndarray, ...]:
    """A run's result as float32 arrays in the signature's output order."""
    names = SIGNATURES[signature][1]
    if isinstance(result, Mapping):
        missing = [n for n in names if n not in result]
        if missing:
            raise ParityError(f"{signature} returned no {', '.join(missing)} (got {sorted(result)})")
        result = [result[n] for n in names]
    elif isinstance(result, np.ndarray):
        result = [result]
    if len(result) != len(names):
        raise ParityError(f"{signature} returned {len(result)} outputs, expected {len(names)} ({', '.join(names)})")
    return tuple(np.asarray(r, np.float32) for r in result)


GRAPHS = {"embed": EmbedGraph, "forward": ForwardGraph, "train_step": TrainStepGraph}  # signature -> torch module


def torch_run(signature: str) -> Run:
    """The torch graph of ``signature`` as a Run (the reference every runtime is held to)."""
    graph = GRAPHS[signature]().eval()

    def run(inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        args = [torch.from_numpy(np.array(inputs[n], np.float32)) for n in SIGNATURES[signature][0]]
        with torch.no_grad():
            out = graph(*args)
        return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))

    return run


def backend_runs(backend: Backend) -> dict[str, Run]:
    """An edge backend's three methods as Runs."""
    return {
        "embed": lambda x: (backend.embed(x["images"], x["weight"], x["bias"]),),
        "forward": lambda x: backend.forward(
            x["images"], x["weight"], x["bias"], x["noise"], float(x["levels"]), bool(x["per_token"] > 0.5)
        ),
        "train_step": lambda x: backend.train_step(
            *(x[n] for n in SIGNATURES["train_step"][0][:6]), float(x["lr"]), float(x["momentum"])
        ),
    }


def scaled_error(actual: np.ndarray, expected: np.ndarray, floor: float = 1.0) -> float:
    """max |actual - expected| / max(floor, max |expected|); inf when the shapes differ."""
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()
    return float(diff / max(floor, float(np.abs(expected).max())))


def _require(metric: str, value: float, threshold: float, context: str) -> None:
    """ParityError unless value <= threshold (NaN fails)."""
    if not value <= threshold:
        raise ParityError(f"{metric} = {value:.3g} exceeds the threshold {threshold:.3g} ({context})")


def _context(config: ViTConfig, batch: int, **more: object) -> str:
    return ", ".join([f"preset {config.name}", f"batch {batch}", *(f"{k} {v}" for k, v in more.items())])


def check_embed(run: Run, config: ViTConfig, batch: int, *, seed: int = 0) -> dict[str, float]:
    """Tokens of ``run`` against EmbedGraph: {"embed_max_abs_err"} (scaled by max(1, max|ref|))."""
    inputs = select("embed", reference_inputs(config, batch, seed))
    (expected,) = torch_run("embed")(inputs)
    (actual,) = outputs_of("embed", run(inputs))
    error = scaled_error(actual, expected)
    _require("embed_max_abs_err", error, EMBED_TOLERANCE, _context(config, batch, shape=actual.shape))
    return {"embed_max_abs_err": error}


def check_forward(
    run: Run, config: ViTConfig, batch: int, *, seed: int = 0, levels: Iterable[float] = LEVELS,
    per_token: Iterable[bool] = (False, True),
) -> dict[str, float]:
    """Codes and ranges of ``run`` against ForwardGraph for every (levels, per_token) pair."""
    metrics = {"forward_max_abs_err": 0.0, "forward_code_max_diff": 0.0, "forward_code_mismatches": 0.0,
               "forward_codes_compared": 0.0}
    for level in levels:
        for token_wise in per_token:
            inputs = select("forward", reference_inputs(config, batch, seed, levels=level, per_token=token_wise))
            context = _context(config, batch, levels=level, per_token=int(token_wise))
            _merge(metrics, _compare_forward(run, inputs, context))
    return metrics


def _compare_forward(run: Run, inputs: dict[str, np.ndarray], context: str) -> dict[str, float]:
    expected = torch_run("forward")(inputs)
    codes, lo, hi = outputs_of("forward", run(inputs))
    range_error = max(scaled_error(lo, expected[1]), scaled_error(hi, expected[2]))
    _require("forward_max_abs_err", range_error, RANGE_TOLERANCE, context)
    if codes.shape != expected[0].shape:
        raise ParityError(f"forward codes have shape {codes.shape}, expected {expected[0].shape} ({context})")
    levels = float(inputs["levels"])
    if not (np.array_equal(codes, np.floor(codes)) and codes.min() >= 0 and codes.max() <= levels):
        raise ParityError(f"forward codes are not integers in [0, {levels:g}] ({context})")
    diff = np.abs(codes - expected[0])
    mismatches, compared = int(np.count_nonzero(diff)), int(diff.size)
    _require("forward_code_max_diff", float(diff.max()), CODE_MAX_DIFF, context)
    allowed = max(1, int(CODE_MISMATCH_FRACTION * compared))
    _require("forward_code_mismatches", mismatches, allowed, f"{context}, of {compared} codes")
    return {"forward_max_abs_err": range_error, "forward_code_max_diff": float(diff.max()),
            "forward_code_mismatches": float(mismatches), "forward_codes_compared": float(compared)}


class SgdOracle:
    """The device weights as torch trains them: nn.Conv2d, autograd, torch.optim.SGD with momentum."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, lr: float = LR, momentum: float = MOMENTUM) -> None:
        dim, chans, patch, _ = weight.shape
        self.conv = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(weight))
            self.conv.bias.copy_(torch.from_numpy(bias))
        self.optimizer = torch.optim.SGD(self.conv.parameters(), lr=lr, momentum=momentum)

    def step(self, images: np.ndarray, grad_tokens: np.ndarray) -> tuple[np.ndarray, ...]:
        """One step from d loss / d tokens -> weight, bias and their momentum buffers after it."""
        self.optimizer.zero_grad()
        tokens = self.conv(torch.from_numpy(images)).flatten(2).transpose(1, 2)
        tokens.backward(torch.from_numpy(grad_tokens))
        self.optimizer.step()
        params = (self.conv.weight, self.conv.bias)
        buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
        return tuple(t.detach().numpy().copy() for t in (*params, *buffers))


def check_train_step(
    run: Run, config: ViTConfig, batch: int, *, steps: int = 3, seed: int = 0, lr: float = LR,
    momentum: float = MOMENTUM,
) -> dict[str, float]:
    """``steps`` chained train steps of ``run`` against :class:`SgdOracle`: {"train_step_max_rel_err"}."""
    start = reference_inputs(config, batch, seed)
    oracle = SgdOracle(start["weight"], start["bias"], lr, momentum)
    state_names, output_names = SIGNATURES["train_step"][0][:4], SIGNATURES["train_step"][1]
    state = {n: start[n] for n in state_names}
    scalars = {"lr": np.float32(lr).reshape(()), "momentum": np.float32(momentum).reshape(())}
    worst = 0.0
    for step in range(steps):
        data = batch_data(config, batch, seed + 1000 + step)  # fresh images and gradients
        inputs = {**state, "images": data["images"], "grad_tokens": data["grad_tokens"], **scalars}
        actual = outputs_of("train_step", run(inputs))
        expected = oracle.step(data["images"], data["grad_tokens"])
        for name, a, e in zip(output_names, actual, expected):
            error = scaled_error(a, e, floor=float(np.finfo(np.float32).tiny))
            _require("train_step_max_rel_err", error, TRAIN_STEP_TOLERANCE,
                     _context(config, batch, step=step + 1, output=name))
            worst = max(worst, error)
        state = dict(zip(state_names, actual))
    return {"train_step_max_rel_err": worst}


_CHECKS = {"embed": check_embed, "forward": check_forward, "train_step": check_train_step}


def check_signatures(
    runs: Mapping[str, Run], config: ViTConfig, batches: Iterable[int], *, seed: int = 0
) -> dict[str, float]:
    """Every given signature at every batch size; worst errors (max) and summed code counts."""
    metrics: dict[str, float] = {}
    for batch in batches:
        for signature, run in runs.items():
            _merge(metrics, _CHECKS[signature](run, config, batch, seed=seed))
    return metrics


def _merge(into: dict[str, float], new: Mapping[str, float]) -> None:
    """Counts add up; errors keep their maximum."""
    for key, value in new.items():
        counted = key.endswith(("_mismatches", "_compared"))
        into[key] = into.get(key, 0.0) + value if counted else max(into.get(key, 0.0), value)
