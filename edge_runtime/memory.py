"""The device process's memory: its peak, the allocator's behaviour, and buffers sized to the RAM.

- :func:`peak_rss_mib`: the resident-set high-water mark (``VmHWM``), reported in the device's
  summary line and by the footprint benchmark.
- :func:`return_large_blocks`: glibc keeps freed multi-megabyte blocks in the heap once its
  dynamic mmap threshold has grown (the first freed mmap raises it up to 32 MiB), so a loop that
  allocates a new weight-sized array every step grows its resident set step after step. Pinning
  the threshold sends every block above it to ``mmap`` and back to the kernel on ``free``.
- :func:`device_buffer_limits`: inbox and reassembly budgets derived from the profile's RAM
  (docs/reliability.md, "Device-sized buffers"). The rule: a device buffers at most 1/16 of its
  RAM for received messages, half of it in the link inbox (``max_bytes`` = RAM/32; the per-source
  limit, ``max_source_bytes``, is the same budget, since a source is one topic and a model's
  chunks all share the ``model`` source) and half in the chunk reassembler (RAM/32). Each is
  clamped to [``BUFFER_FLOOR_BYTES`` (16 MiB), the server-sized default: 256 MiB inbox, 64 MiB per
  source, 512 MiB reassembly]; an unknown RAM (no profile) gets the defaults. The reassembler's
  per-sender cap is its whole budget: what a device reassembles comes from the server.
  :func:`check_fits` refuses, with what to do, a device whose largest download does not fit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass

from edge_runtime.inbox import InboxLimits
from edge_runtime.protocol.chunking import DEFAULT_MAX_BUFFERED_BYTES, Reassembler

log = logging.getLogger(__name__)
MIB = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024
RAM_SHARE = 32  # the inbox and the reassembler may each hold 1/32 of the RAM: 1/16 in all
BUFFER_FLOOR_BYTES = 16 * MIB  # below this a ViT-B/32 weights message (9.4 MB) would not fit
DEFAULT_INBOX = InboxLimits()
DEFAULT_REASSEMBLY_BYTES = DEFAULT_MAX_BUFFERED_BYTES  # Reassembler's default: what a server uses


def peak_rss_mib() -> float | None:
    """This process's resident-memory high-water mark (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def return_large_blocks(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve blocks above ``threshold_bytes`` with mmap and unmap them on free.

    True when set; False (nothing changed) on other C libraries (musl, Bionic, macOS) or when the
    call is refused. Safe to call more than once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
    log.debug("mmap threshold %d bytes: %s", threshold_bytes, "set" if ok else "refused")
    return ok


@dataclass(frozen=True)
class DeviceBuffers:
    """How much a device buffers of what it receives: its link inbox and its chunk reassembler.

    ``ram_bytes`` is the RAM they were derived from (None: unknown, the server defaults)."""

    inbox: InboxLimits
    reassembly_bytes: int
    ram_bytes: int | None = None

    def reassembler(self) -> Reassembler:
        """A chunk reassembler holding at most ``reassembly_bytes``, all of it open to one sender: a
        device's chunk sets all come from the server (plans, models and its own gradients)."""
        return Reassembler(max_buffered_bytes=self.reassembly_bytes, max_bytes_per_device=self.reassembly_bytes)

    def describe(self) -> str:
        ram = "unknown RAM" if self.ram_bytes is None else f"{self.ram_bytes / MIB:,.0f} MiB RAM"
        return (f"{ram}: inbox {self.inbox.max_bytes / MIB:,.0f} MiB ({self.inbox.max_source_bytes / MIB:,.0f} MiB "
                f"per topic), chunk reassembly {self.reassembly_bytes / MIB:,.0f} MiB")


def _share(ram_bytes: int, ceiling: int) -> int:
    return max(BUFFER_FLOOR_BYTES, min(ram_bytes // RAM_SHARE, ceiling))


def device_buffer_limits(ram_bytes: int | None) -> DeviceBuffers:
    """The inbox and reassembly budgets of a device with ``ram_bytes`` of RAM (module doc's rule).

    ``None`` (no profile) gives the server-sized defaults. The message count and expiry limits of
    the inbox stay at their defaults: bytes are what a small device runs out of."""
    if ram_bytes is None:
        return DeviceBuffers(DEFAULT_INBOX, DEFAULT_REASSEMBLY_BYTES)
    if ram_bytes <= 0:
        raise ValueError(f"RAM must be > 0 bytes, got {ram_bytes}")
    inbox_bytes = _share(ram_bytes, DEFAULT_INBOX.max_bytes)
    # The floor and both ceilings keep max_source_bytes <= max_bytes, as InboxLimits requires.
    per_source = min(_share(ram_bytes, DEFAULT_INBOX.max_source_bytes), inbox_bytes)
    inbox = InboxLimits(max_bytes=inbox_bytes, max_source_bytes=per_source,
                        max_source_messages=DEFAULT_INBOX.max_source_messages, expiry_s=DEFAULT_INBOX.expiry_s)
    return DeviceBuffers(inbox, _share(ram_bytes, DEFAULT_REASSEMBLY_BYTES), ram_bytes)


def check_fits(buffers: DeviceBuffers, message_bytes: int, what: str = "the model weights message") -> None:
    """ValueError, saying what to do, when a ``message_bytes`` message cannot be received whole.

    A chunked message waits, all of its chunks, first in one inbox source (its topic) and then in
    the reassembler, so it must fit both ``max_source_bytes`` and ``reassembly_bytes``."""
    room = min(buffers.inbox.max_source_bytes, buffers.reassembly_bytes)
    if message_bytes <= room:
        return
    ceiling = min(DEFAULT_INBOX.max_source_bytes, DEFAULT_REASSEMBLY_BYTES)
    if message_bytes > ceiling:
        advice = (f"no device gets more than {ceiling / MIB:,.0f} MiB for one message: "
                  "export a smaller preset (fewer device weights)")
    else:
        advice = (f"this needs a profile with at least {RAM_SHARE * message_bytes / MIB:,.0f} MiB of RAM "
                  f"(the budgets are 1/{RAM_SHARE} of it each), or a smaller preset")
    raise ValueError(f"{what} ({message_bytes / MIB:,.1f} MiB) does not fit this device's receive buffers "
                     f"({buffers.describe()}): {advice}")
