"""The device process's memory: its peak, the allocator's behaviour, and buffers sized to the RAM.

- :func:`peak_rss_mib`: the resident-set high-water mark (``VmHWM``), reported in the device's
  summary line and by the footprint benchmark.
- :func:`return_large_blocks`: glibc keeps freed multi-megabyte blocks in the heap once its
  dynamic mmap threshold has grown (the first freed mmap raises it up to 32 MiB), so a loop that
  allocates a new weight-sized array every step grows its resident set step after step. Pinning
  the threshold sends every block above it to ``mmap`` and back to the kernel on ``free``.
- :func:`device_buffer_limits`: inbox and reassembly budgets derived from the profile's RAM
  (docs/reliability.md, "Device-sized buffers").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass

from edge_runtime.inbox import InboxLimits

log = logging.getLogger(__name__)
MIB = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024


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
