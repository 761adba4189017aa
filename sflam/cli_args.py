"""What several ``sflam`` subcommands share: argparse types (each says what was wrong with a bad
value) and option groups."""

from __future__ import annotations

import argparse

from sflam_common.bits import BIT_WIDTHS, BIT_WIDTHS_TEXT


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says what was wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def bits(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or {BIT_WIDTHS_TEXT}, got {text!r}") from None
    if value not in BIT_WIDTHS:
        raise argparse.ArgumentTypeError(f"expected 'auto' or {BIT_WIDTHS_TEXT}, got {value}")
    return value


def bit_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of {BIT_WIDTHS_TEXT}, got {text!r}") from None
    bad = [v for v in values if v not in BIT_WIDTHS]
    if bad or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct bit widths of {BIT_WIDTHS_TEXT}, got {text!r}")
    return values


def add_dashboard_options(parser: argparse.ArgumentParser) -> None:
    """``--dashboard`` and ``--dashboard-token`` (server and simulate; docs/dashboard.md)."""
    parser.add_argument("--dashboard", metavar="[ADDR:]PORT",
                        help="serve the live fleet page and GET /api/fleet on ADDR:PORT (default address "
                             "127.0.0.1; any other needs a token)")
    parser.add_argument("--dashboard-token", metavar="TOKEN",
                        help="the page's token, 16+ characters (default: $SFLAM_DASHBOARD_TOKEN, else "
                             "metrics.dashboard_token_file); needed off loopback")
