"""``sflam server``: run the trainer daemon from a run.toml, printing a progress line per round."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from server_runtime.config import RunConfig, load_config
from server_runtime.round_record import RoundRecord


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C: the round in flight is dropped and redone on --resume."""
    raise KeyboardInterrupt


def cmd_server(args: argparse.Namespace) -> int:
    """Handler of ``sflam server``."""
    overrides = {"broker.url": args.broker} if args.broker else {}
    if args.dashboard:
        from server_runtime.dashboard import parse_bind

        addr, port = parse_bind(args.dashboard)
        overrides.update({"metrics.dashboard_addr": addr, "metrics.dashboard_port": port})
    config = load_config(args.config, overrides or None)
    token = _dashboard_token(config, args.dashboard_token)
    if args.check:
        print(json.dumps(config.to_dict(), indent=2))
        print(f"{args.config}: valid", file=sys.stderr)
        return 0
    from server_runtime.daemon import DaemonError
    from server_runtime.dashboard import DashboardError
    from server_runtime.ranks import RankError, RankLaunch, start_local_ranks, stop_local_ranks
    from server_runtime.signing import SigningSetupError

    try:
        launch = RankLaunch.from_env()
    except RankError as exc:
        print(f"sflam server: error: {exc}", file=sys.stderr)
        return 2
    trainers = config.compute.trainers
    if launch is not None and trainers not in (1, launch.world_size):
        print(f"sflam server: error: compute.trainers is {trainers} but WORLD_SIZE is {launch.world_size}",
              file=sys.stderr)
        return 2
    if launch is not None and launch.rank > 0:
        from server_runtime.rank_worker import run_worker

        return run_worker(config, launch)
    signal.signal(signal.SIGTERM, _interrupt)
    children = []
    if launch is None and trainers > 1:  # the other ranks on this machine, torchrun --nproc-per-node style
        launch, children = start_local_ranks(args.config, trainers, ["--broker", args.broker] if args.broker else [])
    try:
        return _serve(config, resume=args.resume, launch=launch, dashboard_token=token)
    except (DaemonError, DashboardError, RankError, SigningSetupError) as exc:
        print(f"sflam server: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_local_ranks(children)


def _dashboard_token(config: RunConfig, flag: str | None) -> str | None:
    """The fleet page's token; a DashboardError (before anything loads) when the page would be open
    beyond loopback without one, or the token is too short."""
    if not config.metrics.dashboard_port or os.environ.get("RANK", "0") != "0":  # only rank 0 serves the page
        return None
    from server_runtime.dashboard import check_exposure, resolve_token

    token = resolve_token(flag, config.metrics.dashboard_token_file)
    check_exposure(config.metrics.dashboard_addr, token)
    return token


def _scheme(mode: str) -> str:
    """How the start line names ``training.mode``: ``SFL-V1``, ``SFL-V2`` or the ``FL`` baseline."""
    return "FL (FedAvg baseline)" if mode == "fl" else f"SFL-{mode.upper()}"


def _serve(config: RunConfig, *, resume: bool, launch=None, dashboard_token: str | None = None) -> int:
    """Build the daemon, run it to the end, print the summary line."""
    from server_runtime.daemon import ServerDaemon
    from server_runtime.metrics import progress_line

    def show(record: RoundRecord) -> None:
        if config.metrics.progress:
            print(progress_line(record, config.training.rounds), flush=True)

    daemon = ServerDaemon(config, resume=resume, on_round=show, launch=launch, dashboard_token=dashboard_token)
    print(f"sflam server: run {config.broker.run_id!r}, {config.model.preset} {_scheme(config.training.mode)}, "
          f"{config.training.rounds} rounds, broker {config.broker.url}, checkpoints in {config.checkpoint_dir}"
          + (f", {launch.world_size} trainer ranks" if launch is not None else "")
          + (f", resuming after round {daemon.round}" if resume else ""), flush=True)
    print(f"sflam server: messages {daemon.signing.description}", flush=True)
    if daemon.dashboard is not None:
        print(f"sflam server: fleet page on {daemon.dashboard.url}"
              + (" (first visit: add ?token=YOUR_TOKEN)" if dashboard_token else ""), flush=True)
    try:
        summary = daemon.run()
    except KeyboardInterrupt:  # still say what was done and counted, then exit 130 (sflam.cli)
        _print_summary(daemon, daemon.round, daemon.plan_round, daemon.last_accuracy, dict(daemon.all_counters()),
                       True)
        raise
    _print_summary(daemon, summary.rounds, summary.plan_rounds, summary.accuracy, summary.counters, False)
    return 0


def _print_summary(daemon, rounds: int, plan_rounds: int, accuracy: float | None, counters: dict,
                   interrupted: bool) -> None:
    print("sflam-server-summary " + json.dumps({
        "rounds": rounds, "plan_rounds": plan_rounds, "accuracy": accuracy, "counters": counters,
        "interrupted": interrupted, "devices_announced": daemon.registry.announced_count(),
    }), flush=True)
