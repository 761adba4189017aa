"""The sflam wire protocol: the one definition of what crosses the network (numpy only).

``encode(message) -> bytes`` and ``decode(data) -> message``; messages are frozen dataclasses;
every refusal is a ``ProtocolError``. docs/protocol.md describes the bytes.
"""

from edge_runtime.protocol.chunking import Reassembler, split
from edge_runtime.protocol.codec import DEFAULT_LIMITS, MAGIC, VERSION, Limits, decode, encode
from edge_runtime.protocol.errors import (
    BadMagicError,
    ChunkError,
    ForeignRunError,
    IntegrityError,
    LimitError,
    MalformedError,
    ProtocolError,
    SignatureError,
    StaleMessageError,
    TopicError,
    TrailingBytesError,
    TruncatedError,
    UnknownTypeError,
    VersionError,
)
from edge_runtime.protocol.messages import (
    Activations,
    Allocation,
    Chunk,
    Envelope,
    ErrorReport,
    Gradient,
    Hello,
    Message,
    ModelWeights,
    MAX_CROP_PADDING,
    NO_CLASSES_DIGEST,
    OPTIMIZER_CODES,
    RoundPlan,
    SERVER_ID,
    RoundUpdate,
    Status,
    Telemetry,
    Tensor,
    classes_digest,
    weights_from_numpy,
    weights_to_numpy,
)
from edge_runtime.protocol.receive import Deduplicator, Receiver
from edge_runtime.protocol.signing import KeyFileError, Keyring, SigningKey
from edge_runtime.protocol.topics import Topics, parse_topic

__all__ = [
    "Activations", "Allocation", "BadMagicError", "Chunk", "ChunkError", "DEFAULT_LIMITS",
    "Deduplicator", "SERVER_ID", "Envelope", "ErrorReport", "ForeignRunError", "Gradient", "Hello", "IntegrityError",
    "LimitError", "Limits", "MAGIC", "MalformedError", "Message", "ModelWeights",
    "ProtocolError", "Reassembler", "Receiver", "RoundPlan", "RoundUpdate", "StaleMessageError",
    "Status", "Telemetry", "Tensor", "TopicError", "Topics", "TrailingBytesError",
    "TruncatedError", "UnknownTypeError", "VERSION", "VersionError", "decode", "encode",
    "parse_topic", "split", "weights_from_numpy", "weights_to_numpy",
    "OPTIMIZER_CODES", "KeyFileError", "Keyring", "SignatureError", "SigningKey",
    "MAX_CROP_PADDING", "NO_CLASSES_DIGEST", "classes_digest",
]
