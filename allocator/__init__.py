"""The latency/energy system model and the SFLAM resource allocation (numpy/scipy/cvxpy only).

``solve`` (block coordinate descent, :mod:`allocator.bcd`) and ``brute_force`` load scipy on
first use, so importing the system model stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allocator.system import (
    AllocationVectors,
    DeviceArrays,
    Evaluation,
    ModelError,
    Problem,
    SystemParams,
    evaluate,
)

if TYPE_CHECKING:
    from allocator.bcd import Result, solve
    from allocator.bruteforce import BruteForceResult, brute_force

_LAZY = {"solve": "allocator.bcd", "Result": "allocator.bcd", "brute_force": "allocator.bruteforce",
         "BruteForceResult": "allocator.bruteforce"}

__all__ = [
    "AllocationVectors", "BruteForceResult", "DeviceArrays", "Evaluation", "ModelError", "Problem", "Result",
    "SystemParams", "brute_force", "evaluate", "solve",
]


def __getattr__(name: str) -> object:
    """The solver's names, imported on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocator' has no attribute {name!r}")
