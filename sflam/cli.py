"""The ``sflam`` command line: one parser, handlers imported only when their subcommand runs.

Each subcommand names its handler as ``"module:function"``; the module is imported after the
arguments are parsed, so ``sflam device --help`` or ``sflam profiles list`` never pays for (or
needs) torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from sflam import __version__

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says what was wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _add_profiles(sub: argparse._SubParsersAction) -> None:
    profiles = sub.add_parser("profiles", help="list and show device hardware profiles")
    actions = profiles.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per bundled profile")
    listing.set_defaults(handler="firmware_profiles.cli:cmd_list")
    show = actions.add_parser("show", help="every field of one profile, with units")
    show.add_argument("name", help="a bundled profile name, or a path to a .toml profile")
    show.set_defaults(handler="firmware_profiles.cli:cmd_show")
    check = actions.add_parser("validate", help="validate profile files, listing every problem")
    check.add_argument("paths", nargs="+", help=".toml profile files")
    check.set_defaults(handler="firmware_profiles.cli:cmd_validate")


def _add_models(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="ViT presets and their device/server split")
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="presets with parameter counts per side of the split")
    listing.set_defaults(handler="server_runtime.model_cli:cmd_list")
    check = actions.add_parser(
        "check", help="load a preset (and optionally a checkpoint) and verify the split"
    )
    check.add_argument("preset", help="a preset name (see `sflam models list`)")
    check.add_argument("--checkpoint", help="a local timm-layout .safetensors/.pth/.npz file")
    check.add_argument("--num-classes", type=_positive_int, help="replace the head for N classes")
    check.add_argument("--img-size", type=_positive_int, help="resize the position embedding")
    check.set_defaults(handler="server_runtime.model_cli:cmd_check")


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sets and how they split across devices")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    part = actions.add_parser("partition", help="partition a data set and show per-device labels")
    part.add_argument(
        "--dataset", default="digits", help="digits | cifar10:<dir> | folder:<dir> (default digits)"
    )
    part.add_argument("--devices", type=_positive_int, default=10)
    part.add_argument("--scheme", choices=("dirichlet", "iid", "shards"), default="dirichlet")
    part.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration")
    part.add_argument("--shards-per-device", type=_positive_int, default=2)
    part.add_argument(
        "--resample",
        metavar="LO-HI",
        help="resample each device to a size drawn in [LO, HI], as the SFLAM code does (400-500)",
    )
    part.add_argument("--seed", type=int, default=0)
    part.set_defaults(handler="server_runtime.data.cli:cmd_partition")


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    quick = sub.add_parser(
        "quickstart",
        help="preview: train the split ViT in one process on digits (no MQTT yet)",
    )
    quick.add_argument("--model", default="vit_quick_patch4_16")
    quick.add_argument("--dataset", default="digits")
    quick.add_argument("--devices", type=_positive_int, default=10)
    quick.add_argument("--alpha", type=_positive_float, default=0.5)
    quick.add_argument("--rounds", type=_positive_int, default=60)
    quick.add_argument("--per-round", type=_positive_int, default=5)
    quick.add_argument("--local-epochs", type=_positive_int, default=5)
    quick.add_argument("--batch-size", type=_positive_int, default=32)
    quick.add_argument("--lr", type=_positive_float, default=0.05)
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(handler="server_runtime.quickstart:cmd_quickstart")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI; cheap to build (imports nothing beyond the standard library)."""
    parser = argparse.ArgumentParser(
        prog="sflam",
        description="Split federated fine-tuning of Vision Transformers on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"sflam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_profiles(sub)
    _add_models(sub)
    _add_data(sub)
    _add_quickstart(sub)
    return parser


def _resolve(spec: str) -> Handler:
    module_name, _, func_name = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sflam`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = _resolve(args.handler)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("sflam: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # Every package raises typed ValueError/OSError subclasses for bad input: show the
        # message, not a traceback (unless asked for one).
        if args.verbose:
            raise
        print(f"sflam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
