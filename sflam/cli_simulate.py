"""``sflam simulate``'s command line (the handler is ``sflam.simulate:cmd_simulate``)."""

from __future__ import annotations

import argparse

from sflam.cli_args import (
    add_dashboard_options,
    add_global_pool_option,
    bits,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_simulate(sub: argparse._SubParsersAction) -> None:
    """The ``simulate`` subcommand and its options."""
    sim = sub.add_parser(
        "simulate",
        help="a whole run on this machine: broker, server daemon and device processes over MQTT",
        description="Export the bundle, start a broker (unless given), the server daemon and one device "
                    "process per device, train, then write summary.json, plots and a result table. "
                    "Flags override --config; defaults are the quickstart (make demo).",
    )
    sim.add_argument("--config", metavar="FILE", help="TOML with a [simulate] table (and [server.*] run.toml overrides)")
    sim.add_argument("--devices", type=positive_int, metavar="N", help="devices in the fleet (default 10)")
    sim.add_argument("--per-round", type=positive_int, metavar="K", help="devices per round (default 5)")
    sim.add_argument("--rounds", type=positive_int, metavar="R", help="rounds (default 60)")
    sim.add_argument("--alpha", type=positive_float, metavar="A", help="Dirichlet concentration of the split (default 0.5)")
    sim.add_argument("--resample", metavar="LO-HI",
                     help="draw each device's shard with replacement: U{LO..HI} images with a Dir(alpha) "
                          "label mix, for fleets larger than the data set (e.g. 20-40; default: a partition)")
    sim.add_argument("--bits", type=bits, metavar="auto|Q", help="activation bits; auto: the allocator (default)")
    sim.add_argument("--gradient-bits", type=bits, metavar="auto|Q",
                     help="bits per activation-gradient value on the downlink; auto: the allocator's "
                          "(the default with --bits auto, else 32)")
    sim.add_argument("--model-bits", type=int, choices=(16, 32),
                     help="precision of the global device weights broadcast each round (default 16 with "
                          "--scheme sflam, else 32)")
    sim.add_argument("--scheme", choices=("sflam", "sfl", "sl", "fl"), help="sflam (default), sfl, sl or fl")
    sim.add_argument("--dataset", metavar="SPEC", help="digits (default), cifar10:<dir> or folder:<dir>")
    sim.add_argument("--model", metavar="PRESET", help="ViT preset (default vit_quick_patch4_16)")
    sim.add_argument("--checkpoint", metavar="FILE", help="local timm-layout weights to start from (a headless "
                     "backbone gets a fresh head for the data set's classes)")
    add_global_pool_option(sim)
    sim.add_argument("--broker", metavar="URL|embedded",
                     help="an mqtt:// URL, or a private loopback broker: embedded (default: mosquitto when "
                          "installed, else amqtt), mosquitto or amqtt")
    sim.add_argument("--out", metavar="DIR", help="a new output directory (default runs/sim-<scheme>-<time>)")
    sim.add_argument("--seed", type=int, metavar="S", help="seed of data split, scenario, selection (default 0)")
    sim.add_argument("--local-epochs", type=positive_int, metavar="E", help="local epochs per round (default 5)")
    sim.add_argument("--batch-size", type=positive_int, metavar="B", help="device batch (default 32)")
    sim.add_argument("--lr", type=positive_float, help="learning rate of round 1 (default 0.002)")
    sim.add_argument("--validation-fraction", type=float, metavar="F",
                     help="share of the training set the server holds out to pick the best round on "
                          "(default 0.1; 0: none); the test set only gives the reported figures")
    sim.add_argument("--optimizer", choices=("sgd", "adam", "adamw"),
                     help="the optimizer of both halves of the model (default adam)")
    sim.add_argument("--lr-schedule", choices=("constant", "cosine"),
                     help="cosine (default): from --lr in round 1 down to 0 in the last; or constant")
    sim.add_argument("--mode", choices=("v1", "v2"), help="SFL-V1 (default) or V2 for the split schemes")
    sim.add_argument("--profiles", metavar="A,B,...", help="hardware profiles, assigned round-robin")
    sim.add_argument("--radius-m", type=positive_float, metavar="R", help="cell radius in metres (default 500)")
    sim.add_argument("--t-max", dest="t_max_s", type=positive_float, metavar="SEC",
                     help="the allocator's latency cap per round with --bits auto (default 5)")
    sim.add_argument("--backend", choices=("onnx", "numpy", "litert", "auto"), help="device backend (default onnx)")
    _add_simulate_scale(sim)
    _add_simulate_links(sim)
    add_dashboard_options(sim)
    sim.set_defaults(handler="sflam.simulate:cmd_simulate")



def _add_simulate_scale(sim: argparse.ArgumentParser) -> None:
    """Where the devices and the server's trainer ranks run (docs/scale.md, docs/server.md)."""
    sim.add_argument("--engine", choices=("local", "ray"),
                     help="where device hosts run: local processes (default) or Ray actors on a cluster")
    sim.add_argument("--ray-address", metavar="HOST:PORT", help="--engine ray: the Ray head (default: a local Ray)")
    sim.add_argument("--hosts", type=non_negative_int, metavar="N",
                     help="device host processes the devices are spread over (0: a process per device; "
                          "default: a process per device up to 50 devices, one host per core beyond)")
    sim.add_argument("--trainers", type=positive_int, metavar="N",
                     help="server trainer ranks (torch.distributed, gloo on CPU); devices are balanced over "
                          "them each round (default 1)")


def _add_simulate_links(sim: argparse.ArgumentParser) -> None:
    """``sflam simulate``'s link model and the kernel links' options (docs/simulate.md)."""
    sim.add_argument("--no-emulate-link", dest="emulate_link", action="store_false", default=None,
                     help="do not pace uplinks at their allocated rate")
    sim.add_argument("--network", choices=("bucket", "netem"),
                     help="how the radios are emulated: bucket (default: a token bucket in each device) or "
                          "netem (root: kernel links, a network namespace per device, tc at the allocated rate, "
                          "delay, jitter and loss; docs/simulate.md)")
    sim.add_argument("--link-delay-ms", type=non_negative_float, metavar="MS",
                     help="netem: one-way delay each way (default: the device radio's, e.g. wifi 2 ms, lte 15 ms)")
    sim.add_argument("--link-jitter-ms", type=non_negative_float, metavar="MS",
                     help="netem: +- uniform jitter (default: the radio's; 0 when --link-delay-ms is given)")
    sim.add_argument("--link-loss", type=non_negative_float, metavar="P",
                     help="netem: packet loss probability each way, e.g. 0.05 (default 0)")
    sim.add_argument("--link-flap", metavar="ROUND:DOWN_S[:DEVICE]",
                     help="netem: take device DEVICE's (index, default 0) link down for DOWN_S seconds in round ROUND")
    sim.add_argument("--keepalive-s", type=positive_int, metavar="SEC",
                     help="the devices' MQTT keep-alive (default 30): a dead link is noticed after 1.5x this")
    sim.add_argument("--sign", action="store_true", default=None,
                     help="sign every message with Ed25519 keys made for the run, as a provisioned fleet does "
                          "(default: unsigned, on the run's private loopback broker)")
