"""What several ``sflam`` subcommands share: argparse types (each says what was wrong with a bad
value) and option groups."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from server_runtime.presets import GLOBAL_POOLS
from sflam_common.bits import BIT_WIDTHS, BIT_WIDTHS_TEXT



def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str, name: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then refuse what is not ``ok``, saying ``what`` was expected."""
    noun = "a whole number" if convert is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text if convert is float else value}")
        return value

    parse.__name__, parse.__doc__ = name, f"argparse type: {what}."
    return parse


positive_int = _number(int, lambda v: v >= 1, "a number >= 1", "positive_int")
non_negative_int = _number(int, lambda v: v >= 0, "a number >= 0", "non_negative_int")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a finite number > 0", "positive_float")  # not nan
non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0", "non_negative_float")


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


def add_global_pool_option(parser: argparse.ArgumentParser) -> None:
    """``--global-pool token|avg``: the model's pooling layout (docs/checkpoints.md)."""
    parser.add_argument("--global-pool", choices=GLOBAL_POOLS,
                        help="the model's pooling: token (the class token's features) or avg (the patch tokens' "
                             "mean); default: what the checkpoint's keys say, else token (docs/checkpoints.md)")
