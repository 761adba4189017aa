"""What every exporter returns and raises: artifacts with their measured parity, typed errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.bundle import file_sha256

FORMATS = ("onnx", "tflite", "tflite-int8", "tflite-micro")


class ExportError(ValueError):
    """An export that cannot be done; the message says why."""


class ParityError(ExportError):
    """An artifact whose outputs differ from torch beyond tolerance; the message has the numbers."""


class ExportRefused(ExportError):
    """A target that cannot hold or run the artifact (the message names the sizes)."""


@dataclass(frozen=True)
class Artifact:
    """One file of a bundle, with what it can do and how closely it matched torch."""

    path: Path  # where it was written
    format: str  # one of FORMATS
    signatures: tuple[str, ...]  # "embed", "forward", "train_step"
    batch: int | None  # fixed batch, or None for a dynamic batch
    parity: dict[str, float] = field(default_factory=dict)  # metric name -> measured value
    trainable: bool = True  # False: a frozen-embedding (inference-only) artifact
    extra: dict[str, object] = field(default_factory=dict)  # format specifics (arena bytes, ...)

    @property
    def sha256(self) -> str:
        """Hex digest of the file as written."""
        return file_sha256(self.path)
