"""The commands that run devices: ``sflam device`` (one device, its own process) and
``sflam device-host`` (many devices in one process; :mod:`edge_runtime.host`).

Both verify the bundle's hashes before anything connects (a tampered or corrupted bundle is refused
with every problem listed), print one JSON summary line at exit (``sflam-device-summary`` /
``sflam-host-summary``) and treat SIGTERM like Ctrl-C: the devices announce themselves offline,
then the process exits 130.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from edge_runtime.bundle import BundleError, verify_bundle
from edge_runtime.data import DEFAULT_CACHE_BYTES, Preprocess, load_data
from edge_runtime.device import DeviceClient, load_device_profile
from edge_runtime.device_keys import device_signing
from edge_runtime.link import channel_gain_from_distance
from edge_runtime.memory import peak_rss_mib, return_large_blocks
from edge_runtime.mqtt import BrokerAddress, PlaintextSecretsError, plaintext_problem, read_password_file
from sflam_common.limits import raise_open_file_limit


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def verified_bundle(path: str | Path) -> Path:
    """The bundle directory once every file its manifest lists matches its sha256; BundleError, with
    every problem, when not (files the manifest does not list, such as ``keys/``, are not checked)."""
    bundle = Path(path)
    problems = verify_bundle(bundle)
    if problems:
        raise BundleError(f"bundle {bundle} failed its integrity check (re-flash or re-export it):\n  "
                          + "\n  ".join(problems))
    return bundle


def data_cache_bytes(args: argparse.Namespace) -> int:
    """``--data-cache-mb`` in bytes: decoded images a device's shard keeps (edge_runtime.data)."""
    megabytes = getattr(args, "data_cache_mb", None)
    return DEFAULT_CACHE_BYTES if megabytes is None else int(megabytes * 2**20)


def plaintext_opt_in(args: argparse.Namespace) -> bool:
    """``--insecure-plaintext``, once --username / --password-file / --ca-file are known safe to use with
    ``--broker``; PlaintextSecretsError for credentials over mqtt:// to a host that is not loopback."""
    insecure = bool(getattr(args, "insecure_plaintext", False))
    given = [flag for flag, key in (("--username", "username"), ("--password-file", "password_file"),
                                    ("--ca-file", "ca_file")) if getattr(args, key, None) is not None]
    problem = plaintext_problem(BrokerAddress.parse(args.broker), given, insecure=insecure,
                                opt_in="pass --insecure-plaintext")
    if problem is not None:
        raise PlaintextSecretsError(problem)
    return insecure


def cmd_device(args: argparse.Namespace, client_class: type[DeviceClient] = DeviceClient) -> int:
    """``sflam device``: run the device loop; prints a JSON summary line at exit."""
    bundle = verified_bundle(args.bundle)  # before anything is loaded or connects
    insecure = plaintext_opt_in(args)  # before anything is loaded or connects
    signing = device_signing(args.device_id, bundle, signing_key=getattr(args, "signing_key", None),
                             server_key=getattr(args, "server_key", None), unsigned=getattr(args, "unsigned", False),
                             credentials=getattr(args, "username", None) is not None)
    print(f"sflam device {args.device_id}: messages {signing.description}", file=sys.stderr, flush=True)
    return_large_blocks()  # a weight-sized buffer a step must not stay resident (edge_runtime.memory)
    device_json = json.loads((bundle / "device.json").read_text())
    data = load_data(args.data, Preprocess.from_device_json(device_json), num_classes=device_json.get("num_classes"),
                     cache_bytes=data_cache_bytes(args))
    skipped = f", {data.skipped} unreadable image(s) skipped" if data.skipped else ""
    print(f"sflam device {args.device_id}: data {args.data}: {len(data)} samples{skipped}", file=sys.stderr, flush=True)
    password = read_password_file(args.password_file) if getattr(args, "password_file", None) else None
    profile = getattr(args, "profile", None)
    if profile is not None and load_device_profile(profile) is None:
        raise ValueError(f"--profile {profile!r}: no such hardware profile here (see `sflam profiles list`)")
    gain = getattr(args, "channel_gain", None)
    if gain is None and getattr(args, "distance_m", None) is not None:
        gain = channel_gain_from_distance(args.distance_m)
    client = client_class(
        bundle, args.broker, args.device_id, data, backend=args.backend, run_id=args.run_id,
        max_frame_bytes=args.max_frame_bytes, seed=args.seed, ca_file=args.ca_file,
        username=getattr(args, "username", None), password=password, meter=getattr(args, "meter", "auto"),
        emulate_link=bool(getattr(args, "emulate_link", False)), channel_gain=gain,
        shaped_link=getattr(args, "shaped_link", None), keepalive_s=getattr(args, "keepalive_s", 30),
        profile=profile, threads=getattr(args, "threads", None),
        signing_key=signing.key, server_keys=signing.server_keys,
        insecure_plaintext=insecure,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: like Ctrl-C
    client.start()
    interrupted = False
    try:
        client.run(args.rounds)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: still print what was done and counted
        interrupted = True
    finally:
        client.close()
    summary = {
        "rounds": client.counters["rounds"], "interrupted": interrupted, "connections": client.link.connections,
        "counters": dict(client.counters),
        "receiver": dict(client.receiver.counters), "inbox": dict(client.link.inbox.counters),
        "reassembler": dict(client.receiver.reassembler.counters),
        "backend": client.engine.name, "torch_loaded": "torch" in sys.modules,
        "meter": getattr(client.compute_meter, "name", None), "emulated_link": client.emulate_link,
        "shaped_link": client.shaped_link, "uplink_wall_s": client.uplink_wall_s,
        "peak_rss_mib": peak_rss_mib(), "samples": len(data), "skipped_samples": data.skipped,
    }
    print("sflam-device-summary " + json.dumps(summary), flush=True)
    if interrupted:
        raise KeyboardInterrupt  # exit 130, as for every interrupted sflam command
    return 0


def cmd_device_host(args: argparse.Namespace) -> int:
    """``sflam device-host``: many devices in one process until SIGTERM / Ctrl-C; prints a summary line."""
    from edge_runtime.host import DeviceHost, read_host_file

    bundle = verified_bundle(args.bundle)  # before anything is loaded or connects
    raise_open_file_limit()
    return_large_blocks()
    host = DeviceHost(bundle, args.broker, read_host_file(Path(args.devices)), run_id=args.run_id,
                      backend=args.backend, concurrency=args.concurrency, stagger_s=args.stagger_s,
                      threads=args.threads, meter=args.meter, emulate_link=args.emulate_link,
                      heartbeat_s=args.heartbeat_s, keys=Path(args.keys) if args.keys else None,
                      data_cache_bytes=data_cache_bytes(args))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    print(f"sflam device-host: {len(host.devices)} devices, run {args.run_id!r}, broker {args.broker}, messages "
          + (f"signed (Ed25519, each device's key from {args.keys})" if host.signed else "UNSIGNED (no --keys)"),
          flush=True)
    host.start()
    interrupted = False
    try:
        host.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        host.close()
    print("sflam-host-summary " + json.dumps({**host.summary(), "interrupted": interrupted,
                                              "torch_loaded": "torch" in sys.modules}), flush=True)
    if interrupted:
        raise KeyboardInterrupt
    return 0
