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

from sflam.cli_args import (
    add_dashboard_options,
    add_global_pool_option,
    bit_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from sflam.cli_simulate import add_simulate
from sflam_common.version import __version__

Handler = Callable[[argparse.Namespace], int]


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
    check.add_argument("--num-classes", type=positive_int, help="replace the head for N classes")
    check.add_argument("--img-size", type=positive_int, help="resize the position embedding")
    add_global_pool_option(check)
    check.set_defaults(handler="server_runtime.model_cli:cmd_check")


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sets and how they split across devices")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    part = actions.add_parser("partition", help="partition a data set and show per-device labels")
    part.add_argument(
        "--dataset", default="digits", help="digits | cifar10:<dir> | folder:<dir> (default digits)"
    )
    part.add_argument("--devices", type=positive_int, default=10)
    part.add_argument("--scheme", choices=("dirichlet", "iid", "shards"), default="dirichlet")
    part.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration")
    part.add_argument("--shards-per-device", type=positive_int, default=2)
    part.add_argument(
        "--resample",
        metavar="LO-HI",
        help="resample each device to a size drawn in [LO, HI], as the SFLAM code does (400-500)",
    )
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--out", metavar="DIR", help="also write one shard per device to DIR (new or empty)")
    part.add_argument("--format", choices=("folder", "npz"), help="shard layout with --out (default folder)")
    part.set_defaults(handler="server_runtime.data.cli:cmd_partition")


def _add_export(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export", help="export a verified device bundle (ONNX / TFLite / TFLite Micro) for a profile"
    )
    exp.add_argument("--model", required=True, help="a preset (see `sflam models list`)")
    exp.add_argument("--checkpoint", help="a local timm-layout checkpoint for the device weights")
    exp.add_argument("--num-classes", type=positive_int, help="class count of the fine-tuning task")
    add_global_pool_option(exp)
    exp.add_argument("--profile", required=True, help="a device profile (see `sflam profiles list`)")
    exp.add_argument("--batch", type=positive_int, default=8, help="fixed batch of TFLite artifacts")
    exp.add_argument(
        "--formats", help="comma list of onnx,tflite,tflite-int8,tflite-micro (default: the profile's)"
    )
    exp.add_argument("--bits", type=positive_int, default=8, help="default activation bits (1-8)")
    exp.add_argument("--out", required=True, help="bundle directory to create")
    exp.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    exp.set_defaults(handler="export.bundle:cmd_export")


def _add_flash(sub: argparse._SubParsersAction) -> None:
    flash = sub.add_parser(
        "flash", help="copy a bundle to a device (ssh:// or adb://), verify it there and run its check"
    )
    flash.add_argument("--bundle", required=True, help="bundle directory made by `sflam export`")
    flash.add_argument(
        "--target", required=True, help="ssh://user@host[:port]/abs/path or adb://SERIAL/abs/path"
    )
    flash.add_argument(
        "--remote-python", metavar="PATH", help="an interpreter on the device that has sflam[edge] (no venv then)"
    )
    flash.add_argument("--no-venv", action="store_true", help="do not create <path>/.venv on the device")
    flash.add_argument("--no-unit", action="store_true", help="do not install the systemd unit")
    flash.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    flash.add_argument(
        "--wheel", nargs="+", action="extend", metavar="PATH",
        help="wheels to copy to the device for pip (e.g. one from `pip wheel --no-deps .`)",
    )
    flash.add_argument(
        "--pip-arg", action="append", metavar="ARG", help="extra pip install argument, e.g. --pip-arg=--no-index"
    )
    flash.add_argument("-i", "--identity", metavar="FILE", help="ssh private key")
    flash.add_argument("--known-hosts", metavar="FILE", help="ssh known_hosts file to use")
    flash.add_argument("--ssh-config", metavar="FILE", help="ssh config file (-F)")
    flash.add_argument(
        "-o", "--ssh-option", action="append", metavar="KEY=VALUE", help="extra ssh -o option (repeatable)"
    )
    flash.add_argument("--fleet", metavar="DIR",
                       help="a fleet from `sflam fleet provision`: install --device-id's signing key (as "
                            "keys/device.key, 0600) and the server's public key (keys/server.pub) with the bundle")
    flash.add_argument("--device-id", metavar="ID", help="the fleet's device whose keys to install (with --fleet)")
    flash.add_argument("--data", metavar="PATH", help="a device's data shard (a folder or an .npz from `sflam data "
                       "partition`) to install in <path>/data, hashed and verified there")
    flash.set_defaults(handler="export.flash:cmd_flash")


def _add_profile_energy(sub: argparse._SubParsersAction) -> None:
    pe = sub.add_parser(
        "profile-energy",
        help="run a bundle here, measure seconds and joules per sample, write a calibrated profile",
    )
    pe.add_argument("--bundle", required=True, help="bundle directory made by `sflam export`")
    pe.add_argument(
        "--meter", choices=("auto", "rapl", "jetson", "android", "estimate"), default="auto",
        help="energy meter (auto: RAPL, Jetson INA3221, Android battery, else the profile estimate)",
    )
    pe.add_argument("--samples", type=positive_int, default=256, help="samples to run (whole batches)")
    pe.add_argument("--backend", choices=("auto", "litert", "onnx", "numpy"), default="auto")
    pe.add_argument("--out", required=True, help="calibrated profile .toml to write")
    pe.add_argument("--base", help="profile to calibrate, name or .toml path (default: the bundle's)")
    pe.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)  # tests: a fixture sysfs tree
    pe.set_defaults(handler="edge_runtime.profile_energy:cmd_profile_energy")


def _add_device(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("device", help="run the device training loop against an MQTT broker")
    _device_options(dev)
    dev.set_defaults(handler="edge_runtime.commands:cmd_device")


def _add_device_host(sub: argparse._SubParsersAction) -> None:
    host = sub.add_parser(
        "device-host", help="run many devices in one process (each its own MQTT session) from a host file",
    )
    host.add_argument("--bundle", required=True, help="bundle directory made by `sflam export`")
    host.add_argument("--broker", required=True, help="mqtt://host[:port] or mqtts://host[:port]")
    host.add_argument("--devices", required=True, metavar="FILE",
                      help='host file: {"devices": [{"device_id": ..., "data": "npz:PATH", "seed": 0, '
                           '"profile": null, "channel_gain": null}, ...]}')
    host.add_argument("--run-id", default="default", help="the run's id (topic level)")
    host.add_argument("--backend", default="auto", choices=("auto", "onnx", "numpy"))
    host.add_argument("--concurrency", type=positive_int, default=8,
                      help="devices that may train at the same time (each on a thread while it trains)")
    host.add_argument("--stagger-s", type=positive_float, default=1.0,
                      help="spread the devices' first connects over this many seconds")
    host.add_argument("--meter", default="estimate", choices=("estimate",),
                      help="compute energy: the profile estimate (one process cannot meter each device)")
    host.add_argument("--emulate-link", action="store_true", help="as for `sflam device`, per device")
    host.add_argument("--heartbeat-s", type=positive_float, default=10.0,
                      help="an idle device's Hello interval (a fleet of N devices sends N / this per second)")
    host.add_argument("--threads", type=positive_int, help="backend intra-op threads of the shared session")
    host.add_argument("--data-cache-mb", type=float, default=16.0, help="MB of decoded images each training device keeps")
    host.add_argument("--keys", metavar="DIR",
                      help="sign and verify: a fleet's keys/ folder (server.pub, devices/<id>.key); default unsigned")
    host.set_defaults(handler="edge_runtime.commands:cmd_device_host")


def _add_fl_device(sub: argparse._SubParsersAction) -> None:
    fl = sub.add_parser(
        "fl-device",
        help="federated-learning baseline device: trains the whole model with torch "
             "(for `sflam simulate --scheme fl`, not an edge runtime)",
    )
    _device_options(fl)
    fl.set_defaults(handler="sflam.fl_device:cmd_fl_device")


def _device_options(dev: argparse.ArgumentParser) -> None:
    dev.add_argument("--bundle", required=True, help="bundle directory made by `sflam export`")
    dev.add_argument("--broker", required=True, help="mqtt://host[:port] or mqtts://host[:port]")
    dev.add_argument("--device-id", required=True, help="1-64 of A-Z a-z 0-9 _ . -")
    dev.add_argument("--data", required=True, help="the device's shard: folder:DIR (a sub-folder per class), "
                     "manifest:FILE.csv (path,label rows) or npz:PATH (images uint8 (N,H,W,3), labels)")
    dev.add_argument("--data-cache-mb", type=float, default=16.0, help="MB of decoded images a shard keeps (0: none)")
    dev.add_argument("--backend", default="auto", choices=("auto", "litert", "onnx", "numpy"))
    dev.add_argument("--run-id", default="default", help="the run's id (topic level)")
    dev.add_argument("--rounds", type=positive_int, help="exit after N rounds (default: serve forever)")
    dev.add_argument(
        "--max-frame-bytes", type=positive_int, default=256 * 1024, help="chunk frames larger than this"
    )
    dev.add_argument("--seed", type=int, default=0, help="seed of the shuffling and quantizer noise")
    dev.add_argument("--ca-file", "--cafile", dest="ca_file", help="CA certificate for mqtts://")
    dev.add_argument("--username", help="MQTT username (with --password-file)")

    def refuse_password(_text: str) -> str:
        raise argparse.ArgumentTypeError("never on the command line: put the password in a file, --password-file")

    # explicit, so that argparse does not take --password as an abbreviation of --password-file
    dev.add_argument("--password", type=refuse_password, help=argparse.SUPPRESS)
    dev.add_argument(
        "--password-file", help="file whose first line is the MQTT password (never pass it on the command line)"
    )
    dev.add_argument("--insecure-plaintext", action="store_true",
                     help="allow --username/--password-file/--ca-file with mqtt:// to a host that is not loopback")
    dev.add_argument("--signing-key", metavar="FILE",
                     help="this device's Ed25519 private key (PEM, mode 0600); default: the bundle's keys/device.key")
    dev.add_argument("--server-key", metavar="FILE",
                     help="the server's Ed25519 public key; default: the bundle's keys/server.pub")
    dev.add_argument("--unsigned", action="store_true",
                     help="run without signatures even with broker credentials (anyone who may publish on the "
                          "run's topics can then steer this device)")
    dev.add_argument(
        "--meter", default="auto", choices=("auto", "rapl", "jetson", "android", "estimate"),
        help="compute energy meter; auto: the first measured one readable here, else the profile estimate",
    )
    dev.add_argument(
        "--emulate-link", action="store_true",
        help="pace uplink publishes at the plan's rate B log2(1 + p h / (N0 B)) and count p x airtime",
    )
    dev.add_argument(
        "--shaped-link", metavar="IFACE",
        help="a kernel link: re-rate IFACE's tc token bucket to each plan's rate (root, in the device's "
             "network namespace; what `sflam simulate --network netem` passes) and count p x what it carried",
    )
    dev.add_argument("--keepalive-s", type=positive_int, default=30,
                     help="MQTT keep-alive in seconds: a silent link is noticed after 1.5x this (default 30)")
    dev.add_argument("--threads", type=positive_int, help="backend intra-op threads (default: the runtime's, all cores)")
    dev.add_argument(
        "--profile", metavar="NAME",
        help="hardware profile to announce and estimate energy with (default: the bundle's); for emulated fleets",
    )
    gain = dev.add_mutually_exclusive_group()
    gain.add_argument("--distance-m", type=positive_float, help="emulated link: distance to the server (path loss)")
    gain.add_argument("--channel-gain", type=positive_float, help="emulated link: linear channel power gain h")


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    quick = sub.add_parser(
        "quickstart",
        help="preview: train the split ViT in one process on digits (no MQTT yet)",
    )
    quick.add_argument("--model", default="vit_quick_patch4_16")
    quick.add_argument("--dataset", default="digits")
    quick.add_argument("--devices", type=positive_int, default=10)
    quick.add_argument("--alpha", type=positive_float, default=0.5)
    quick.add_argument("--rounds", type=positive_int, default=60)
    quick.add_argument("--per-round", type=positive_int, default=5)
    quick.add_argument("--local-epochs", type=positive_int, default=5)
    quick.add_argument("--batch-size", type=positive_int, default=32)
    quick.add_argument("--lr", type=positive_float, default=0.05)
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(handler="server_runtime.quickstart:cmd_quickstart")


def _add_server(sub: argparse._SubParsersAction) -> None:
    server = sub.add_parser("server", help="run the trainer daemon (coordinator, split training, checkpoints)")
    server.add_argument("--config", required=True, help="the run's TOML file (see examples/run.toml)")
    server.add_argument("--broker", help="broker URL mqtt://host:port or mqtts://host:port (overrides broker.url)")
    server.add_argument("--resume", action="store_true", help="continue after the last checkpointed round")
    server.add_argument("--check", action="store_true", help="validate the config, print it and exit")
    add_dashboard_options(server)
    server.set_defaults(handler="server_runtime.server_cli:cmd_server")


def _add_allocate(sub: argparse._SubParsersAction) -> None:
    alloc = sub.add_parser(
        "allocate", help="solve one round's bits/power/bandwidth allocation and compare it with the baselines"
    )
    gen = alloc.add_argument_group("generated scenario (default: 10 devices, seed 0)")
    gen.add_argument("--devices", type=positive_int, metavar="N", help="devices in the round (default 10)")
    gen.add_argument("--seed", type=int, metavar="S", help="seed of positions, fading and sample counts (default 0)")
    gen.add_argument("--profiles", metavar="A,B,...", help="comma list of firmware profiles, assigned round-robin")
    gen.add_argument("--model", metavar="PRESET", help="ViT preset whose split sizes the traffic (default vit_base_patch32_224)")
    gen.add_argument("--radius-m", type=positive_float, metavar="R", help="cell radius in metres (default 500)")
    gen.add_argument("--local-epochs", type=positive_int, metavar="E", help="passes over each device's data per round")
    prm = alloc.add_argument_group("problem parameters (override the scenario's)")
    prm.add_argument("--t-max", type=positive_float, metavar="SEC", help="latency cap per round (default: 1.5 x fixed's)")
    prm.add_argument("--lambda-energy", type=non_negative_float, metavar="W", help="weight per joule (default 1)")
    prm.add_argument("--lambda-time", type=non_negative_float, metavar="W", help="weight per second of round latency (default 0)")
    prm.add_argument("--lambda-quant", type=non_negative_float, metavar="W", help="weight of the quantization term (default 1e-3)")
    prm.add_argument("--subchannels", type=non_negative_int, metavar="N", help="N equal subchannels (0: continuous bandwidth)")
    prm.add_argument("--bits-down", type=bit_list, metavar="G,G,...",
                     help="gradient bit-widths to choose from per device (default: the scenario's fixed gradient bits)")
    prm.add_argument("--downlink-rate", type=positive_float, metavar="BPS", help="downlink bit/s per device (default 100e6)")
    alloc.add_argument("--scenario", metavar="FILE", help="a scenario JSON file instead of a generated one")
    alloc.add_argument("--dump-scenario", metavar="FILE", help="write the problem as a scenario JSON file")
    alloc.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    alloc.set_defaults(handler="allocator.cli:cmd_allocate")


def _add_fleet(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser(
        "fleet", help="provision a TLS broker with per-device credentials and keys; revoke a device (docs/security.md)",
    )
    actions = fleet.add_subparsers(dest="action", metavar="ACTION", required=True)
    prov = actions.add_parser(
        "provision", help="CA + server certificate, device passwords and signing keys, mosquitto "
                          "passwd/ACL/conf, fleet.json",
    )
    prov.add_argument("--devices", type=positive_int, required=True, metavar="N", help="devices in the fleet")
    prov.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write into")
    prov.add_argument("--hostname", action="append", metavar="H",
                      help="name or IP address devices reach the broker by; repeat for more names in the "
                           "certificate (the first is the broker URL's; default 127.0.0.1)")
    prov.add_argument("--run-id", default="default", help="the run whose topics the ACL grants (default: default)")
    prov.add_argument("--device-prefix", default="dev-", help="device ids are PREFIX + index (default: dev-)")
    prov.add_argument("--port", type=positive_int, default=8883, help="the TLS listener's port (default 8883)")
    prov.add_argument("--days", type=positive_int, default=365, help="certificate validity in days (default 365)")
    prov.add_argument("--bind", metavar="ADDR",
                      help="listener address (default: 127.0.0.1 when every --hostname is loopback, else all)")
    prov.add_argument("--broker-user", metavar="USER",
                      help="user mosquitto switches to when started as root (default: the user running this)")
    prov.add_argument("--max-frame-bytes", type=positive_int, metavar="BYTES",
                      help="the frame size the server and devices chunk to (their max_frame_bytes); sizes the "
                           "broker's max_packet_size (default 262144, theirs)")
    prov.add_argument("--write-ca-key", action="store_true",
                      help="keep the CA's private key as ca.key (default: drop it once it has signed, so "
                           "this fleet can never issue another certificate)")
    prov.set_defaults(handler="sflam.fleet:cmd_fleet_provision")
    revoke = actions.add_parser(
        "revoke", help="remove a device's broker login, password and signing key; list it as revoked in fleet.json",
    )
    revoke.add_argument("--fleet", required=True, metavar="DIR", help="the provisioned fleet's directory")
    revoke.add_argument("--device", required=True, metavar="ID", help="the device id to revoke")
    revoke.add_argument("--broker-pid", type=positive_int, metavar="PID",
                        help="the running mosquitto's PID: send it SIGHUP so it re-reads passwd and acl now")
    revoke.set_defaults(handler="sflam.fleet_revoke:cmd_fleet_revoke")


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
    _add_export(sub)
    _add_flash(sub)
    _add_device(sub)
    _add_device_host(sub)
    _add_fl_device(sub)
    _add_profile_energy(sub)
    _add_quickstart(sub)
    _add_server(sub)
    add_simulate(sub)
    _add_allocate(sub)
    _add_fleet(sub)
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
