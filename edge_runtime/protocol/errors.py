"""Every way a received message can be refused: one ``ProtocolError`` hierarchy.

Receivers catch ``ProtocolError``, count it by class name and keep serving; nothing else may
escape a decode.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message that cannot be accepted; the message says what was wrong."""


class TruncatedError(ProtocolError):
    """Fewer bytes than the frame or a field declares."""


class TrailingBytesError(ProtocolError):
    """More bytes than the frame or a body declares."""


class BadMagicError(ProtocolError):
    """Not an sflam frame at all."""


class VersionError(ProtocolError):
    """A protocol version this implementation does not speak."""


class IntegrityError(ProtocolError):
    """The CRC-32 does not match: corrupted in transit or tampered with."""


class UnknownTypeError(ProtocolError):
    """A message type code this version does not define."""


class LimitError(ProtocolError):
    """A declared size beyond the configured limits (checked before allocating)."""


class MalformedError(ProtocolError):
    """Fields that decode but contradict each other or the rules (shape/bits, NaN ranges, ...)."""


class ChunkError(ProtocolError):
    """A chunk that does not fit its set (index, count, size) or a set that cannot complete."""


class StaleMessageError(ProtocolError):
    """A message for a round older than the one being served."""


class TopicError(ProtocolError):
    """A topic outside the sflam layout, or an identifier that cannot be part of one."""


class ForeignRunError(ProtocolError):
    """A message of another run than the one being served."""


class SignatureError(ProtocolError):
    """A frame without the signature this receiver requires, signed by a key it does not know or
    that may not speak on this topic, or whose signature does not match its bytes."""
