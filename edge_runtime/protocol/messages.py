"""What crosses the network: one frozen dataclass per message type, plus their parts.

Every message carries an :class:`Envelope` (run, round, device, step, created-at); the protocol
version, the type code and the integrity check are added by the codec. Tensors are
(dtype, shape, raw bytes) values, so messages compare by content and hold no mutable arrays.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.protocol.errors import MalformedError
from edge_runtime.quantize import QuantizedTensor

# Plain tensor dtypes and their wire codes (docs/protocol.md).
DTYPE_CODES = {"float32": 1, "float16": 2, "int64": 3, "int32": 4, "uint8": 5, "int8": 6, "uint16": 7, "float64": 8}
ENERGY_SOURCES = ("measured", "estimated")
# RoundPlan.optimizer on the wire; the names are training.optimizer's (server and device alike)
OPTIMIZER_CODES = {"sgd": 0, "adam": 1, "adamw": 2}
SERVER_ID = "server"  # the envelope's device id on the broadcast plan and model topics
CLASSES_DIGEST_SIZE = 32  # SHA-256
NO_CLASSES_DIGEST = bytes(CLASSES_DIGEST_SIZE)  # RoundPlan.classes_digest when the plan names no classes
MAX_CROP_PADDING = 64  # pixels per side; RoundPlan.crop_padding travels as u8 but is refused above this


@dataclass(frozen=True)
class Envelope:
    """Which run, round and step a message belongs to, when it was made (Unix seconds), and the
    device it is from or for (``server`` on the broadcast ``plan`` and ``model`` topics)."""

    run_id: str
    round: int
    device_id: str
    step: int = 0
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Tensor:
    """A plain (unquantized) tensor: dtype name, shape and little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "Tensor":
        """Copy ``array`` into a wire tensor (little-endian)."""
        array = np.asarray(array)
        name = array.dtype.name
        if name not in DTYPE_CODES:
            raise MalformedError(f"dtype {name} cannot travel; use one of {', '.join(DTYPE_CODES)}")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # no copy when it already is
        return cls(name, tuple(int(s) for s in array.shape), little.tobytes())

    def to_numpy(self) -> np.ndarray:
        """A read-only array over the bytes."""
        values = np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))
        return values.reshape(self.shape)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


Weights = tuple[tuple[str, Tensor], ...]


def weights_from_numpy(arrays: Mapping[str, np.ndarray]) -> Weights:
    """Named numpy arrays -> the wire form of a weight set (order kept)."""
    return tuple((name, Tensor.from_numpy(value)) for name, value in arrays.items())


def weights_to_numpy(weights: Weights) -> dict[str, np.ndarray]:
    """The inverse of :func:`weights_from_numpy`."""
    return {name: tensor.to_numpy() for name, tensor in weights}


def classes_digest(names: Sequence[str]) -> bytes:
    """SHA-256 of the class names in class-id order, each as UTF-8 followed by one newline byte.

    ValueError for an empty list or a name containing a newline (two lists would share a digest).
    """
    if not names:
        raise ValueError("no class names")
    h = hashlib.sha256()
    for name in names:
        if not isinstance(name, str) or "\n" in name:
            raise ValueError(f"a class name must be a string without a newline, got {name!r}")
        h.update(name.encode("utf-8") + b"\n")
    return h.digest()


@dataclass(frozen=True)
class Allocation:
    """One selected device's share of a round: bits up/down, transmit power, bandwidth."""

    device_id: str
    bits_up: int
    bits_down: int
    tx_power_w: float
    bandwidth_hz: float
    per_token: bool = False


@dataclass(frozen=True)
class Telemetry:
    """What a device measured over a round."""

    compute_time_s: float
    uplink_time_s: float
    energy_j: float
    energy_source: str  # "measured" | "estimated"
    bytes_sent: int
    bytes_received: int
    steps: int


@dataclass(frozen=True)
class Message:
    """Base of every message type."""

    envelope: Envelope


@dataclass(frozen=True)
class Hello(Message):
    """A device announcing itself (at connect, and as heartbeat)."""

    profile: str
    backend: str
    software_version: str
    num_samples: int
    heartbeat: bool = False
    last_telemetry: "Telemetry | None" = None  # the device's last round, for the allocator
    skipped_samples: int = 0  # local images left out because they were unreadable or corrupt


@dataclass(frozen=True)
class Status(Message):
    """Online/offline, retained per device; the offline form is also the last will."""

    online: bool
    reason: str = ""


@dataclass(frozen=True)
class RoundPlan(Message):
    """The server's plan for a round: who trains, with which allocation, by when.

    ``deadline_s`` is how many seconds the round may take, counted from when a device receives
    the plan (relative, so device clocks need not agree). ``lr`` is this round's learning rate
    (a schedule may change it every round); ``optimizer``, ``momentum`` and ``weight_decay`` are
    the server's, which the device follows (edge_runtime.optimizer).

    ``num_classes`` and ``classes_digest`` (:func:`classes_digest` of the class names) state the
    run's class list, so a device whose folder maps names to ids differently refuses to train
    (0 and :data:`NO_CLASSES_DIGEST`: not stated). ``crop_padding`` (pixels of zero padding per
    side before a random crop, 0 = none) and ``hflip`` are the augmentation of training batches.
    """

    model_version: int
    deadline_s: float
    local_epochs: int
    batch_size: int
    lr: float
    allocations: tuple[Allocation, ...]
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    num_classes: int = 0
    classes_digest: bytes = NO_CLASSES_DIGEST
    crop_padding: int = 0
    hflip: bool = False


@dataclass(frozen=True)
class ModelWeights(Message):
    """The global device weights, versioned."""

    version: int
    weights: Weights


@dataclass(frozen=True)
class Activations(Message):
    """One batch of quantized device activations with its labels (round/step in the envelope)."""

    tensor: QuantizedTensor
    labels: Tensor


@dataclass(frozen=True)
class Gradient(Message):
    """d loss / d activation for one step, optionally quantized, with the server's batch loss."""

    tensor: QuantizedTensor
    loss: float


@dataclass(frozen=True)
class RoundUpdate(Message):
    """A device's round result: its trained weights, sample count and telemetry."""

    model_version: int
    num_samples: int
    weights: Weights
    telemetry: Telemetry


@dataclass(frozen=True)
class ErrorReport(Message):
    """A refusal or failure reported to the peer (symbolic code plus text)."""

    code: str
    detail: str


@dataclass(frozen=True)
class Chunk(Message):
    """One piece of a frame too large for one publish; reassembled by ``Reassembler``."""

    message_id: int
    index: int
    count: int
    total_size: int
    data: bytes


def message_types() -> tuple[type[Message], ...]:
    """Every concrete message class (the codec must cover each one; a test checks)."""
    return tuple(Message.__subclasses__())
