"""Kernel links for ``sflam simulate --network netem``: each device in a network namespace of its
own, joined to the broker's namespace by a veth pair on a bridge, its link shaped by the kernel.

The topology of one run (docs/simulate.md, "Kernel links"):

- a bridge ``sf<tag>br`` in the simulating process's namespace with ``10.<B>.0.1/16``: the broker
  listens there as well as on loopback, the server stays on loopback (a data centre's link);
- per device k: namespace ``sflam-<tag>-<k>``; veth ``sf<tag>h<k>`` (on the bridge) to
  ``sf<tag>d<k>`` (in the namespace, address ``10.<B>.<hi>.<lo>/16``);
- the uplink: a tc token bucket filter (tbf) on the device end, at the rate of the device's
  allocation: the device re-rates it each round (``sflam device --shaped-link``,
  :class:`edge_runtime.link.ShapedUplink`); before the first plan it holds the equal-share,
  full-power rate;
- the downlink: a tbf on the bridge end at the system model's fixed downlink rate r_dn;
- delay, jitter and loss: iptables rules park each packet at the receiving end, served by
  :mod:`sflam.delayline` (``sch_netem`` is not in every kernel, and not in this project's CI
  machine's): the downlink in the device namespace's NFQUEUE 0 (input from its link), the
  uplink in the run's NFQUEUE ``int(tag, 16)`` here (input from the bridge, one rule);
- a link flap: the bridge end set down, then up.

``<tag>`` is 4 hex digits reserved per run by an exclusive state file
``/run/sflam-netem/<tag>.json`` (it lists what the run made, and its owner's PID), so parallel
runs never collide; ``<B>`` is a /16 no interface or route of the machine uses yet. Everything is
removed by :meth:`Topology.close` (the caller's ``finally``, so on completion, error, Ctrl-C and
SIGTERM); a run killed with SIGKILL leaves its state file, and the next run sweeps what a dead
owner left (:func:`sweep_stale`). The uplink rule is the one thing outside the run's namespaces
and interfaces: it is deleted first (when iptables' ``filter`` table did not exist here before,
it stays behind, empty). Root, ``ip``/``tc`` (iproute2) and ``iptables`` are needed;
:func:`preflight` names what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.link import ShapedUplink
from sflam.delayline import LinkImpairment

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/sflam-netem")
TOOLS = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables"}
QUEUE = 0  # each device namespace's own NFQUEUE number (queues are per namespace); the uplink's is the tag
MAX_DEVICES = 4096  # a namespace, a veth pair and two qdiscs each; a process per device anyway
SUBNETS = range(200, 255)  # 10.<B>.0.0/16
# One-way delay and jitter (ms) of a radio kind's air interface and core network, as round-trip
# measurements of each kind put them; loss 0: link-layer retransmission hides the radio's losses
# from TCP (pass --link-loss for what it does not hide).
RADIO_DEFAULTS: Mapping[str, LinkImpairment] = {
    "ethernet": LinkImpairment(0.2, 0.0, 0.0),
    "wifi": LinkImpairment(2.0, 1.0, 0.0),
    "5g": LinkImpairment(5.0, 2.0, 0.0),
    "lte": LinkImpairment(15.0, 5.0, 0.0),
    "ble": LinkImpairment(15.0, 5.0, 0.0),
    "nb-iot": LinkImpairment(300.0, 100.0, 0.0),
}


class NetemError(RuntimeError):
    """A kernel link could not be made (or unmade); the message says which command and why."""


def preflight() -> list[str]:
    """What stops kernel links here: one line per problem (empty when none)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("network netem: needs root (network namespaces, tc and iptables); run as root "
                        "or use the default token-bucket links (--network bucket)")
    missing = sorted({f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append(f"network netem: missing {', '.join(missing)}: install them "
                        f"(apt-get install {' '.join(sorted({TOOLS[t.split()[0]] for t in missing}))})")
    if not Path("/proc/self/ns/net").exists():
        problems.append("network netem: this kernel has no network namespaces")
    return problems


def impairment_for(radio: str, delay_ms: float | None = None, jitter_ms: float | None = None,
                   loss: float | None = None) -> LinkImpairment:
    """The radio kind's defaults (RADIO_DEFAULTS; wifi's for an unknown kind) with the given overrides.
    A delay given without a jitter gets no jitter."""
    base = RADIO_DEFAULTS.get(radio, RADIO_DEFAULTS["wifi"])
    delay = base.delay_ms if delay_ms is None else float(delay_ms)
    if jitter_ms is None:
        jitter_ms = base.jitter_ms if delay_ms is None else 0.0
    return LinkImpairment(delay, float(jitter_ms), base.loss if loss is None else float(loss))


@dataclass(frozen=True)
class DeviceLink:
    """One device's end of the topology."""

    device_id: str
    namespace: str
    host_if: str  # on the bridge, in our namespace: its egress is the downlink
    device_if: str  # in the device's namespace: its egress is the uplink
    address: str
    impairment: LinkImpairment


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


@dataclass
class Topology:
    """The namespaces, veths, bridge and qdiscs of one run: :meth:`open` (the bridge the broker
    listens on), :meth:`add_devices`, and always :meth:`close`."""

    run: Callable[[Sequence[str]], subprocess.CompletedProcess] = _run
    state_dir: Path = STATE_DIR
    tag: str = ""
    subnet: int = 0
    links: list[DeviceLink] = field(default_factory=list)
    made: list[list[str]] = field(default_factory=list)  # what close() removes (_undo): netns, link, rule

    @property
    def bridge(self) -> str:
        return f"sf{self.tag}br"

    @property
    def broker_host(self) -> str:
        """The address devices reach the broker at (the bridge's)."""
        return f"10.{self.subnet}.0.1"

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.tag}.json"

    # ------------------------------------------------------------------ building

    def reserve(self) -> None:
        """Pick a free tag (exclusive state file) and a /16 nothing here uses."""
        sweep_stale(self.state_dir, self.run)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rng = random.SystemRandom()
        for _ in range(64):
            tag = f"{rng.randrange(16**4):04x}"
            try:
                fd = os.open(self.state_dir / f"{tag}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            os.close(fd)
            self.tag = tag
            break
        else:
            raise NetemError(f"network netem: no free run tag in {self.state_dir}")
        used = set(re.findall(r"\b10\.(\d+)\.", self._out(["ip", "-4", "-o", "addr"]) + self._out(["ip", "-4", "route"])))
        used |= {str(s.get("subnet")) for s in _states(self.state_dir)}
        free = [b for b in SUBNETS if str(b) not in used]
        if not free:
            raise NetemError("network netem: every 10.200-254.0.0/16 subnet is in use here")
        self.subnet = rng.choice(free)
        self._save()

    def open(self) -> None:
        """Reserve a tag and a subnet, and make the bridge (with the broker's address)."""
        if not self.tag:
            self.reserve()
        self._do(["ip", "link", "add", self.bridge, "type", "bridge"], made=["link", self.bridge])
        self._do(["ip", "addr", "add", f"{self.broker_host}/16", "dev", self.bridge])
        self._do(["ip", "link", "set", self.bridge, "up"])

    def add_devices(self, device_ids: Sequence[str], impairments: Sequence[LinkImpairment],
                    downlink_bps: float, uplink_bps: Sequence[float]) -> None:
        """Each device's namespace, veth pair, address, qdiscs and queue rules. On failure what was
        made stays listed for :meth:`close`."""
        if not (len(device_ids) == len(impairments) == len(uplink_bps)):
            raise ValueError("one impairment and one uplink rate per device")
        if not 0 < len(device_ids) <= MAX_DEVICES:
            raise NetemError(f"network netem: 1..{MAX_DEVICES} devices, got {len(device_ids)}")
        for k, (device_id, impairment) in enumerate(zip(device_ids, impairments)):
            n = k + 2  # .0.0 is the network, .0.1 the bridge
            link = DeviceLink(device_id, f"sflam-{self.tag}-{k}", f"sf{self.tag}h{k}", f"sf{self.tag}d{k}",
                              f"10.{self.subnet}.{n // 256}.{n % 256}", impairment)
            ns = ["ip", "netns", "exec", link.namespace]
            self._do(["ip", "netns", "add", link.namespace], made=["netns", link.namespace])
            self._do(["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.device_if,
                      "netns", link.namespace], made=["link", link.host_if])
            self._do(["ip", "link", "set", link.host_if, "master", self.bridge, "up"])
            self._do(["ip", "-n", link.namespace, "addr", "add", f"{link.address}/16", "dev", link.device_if])
            self._do(["ip", "-n", link.namespace, "link", "set", link.device_if, "up"])
            self._do(["ip", "-n", link.namespace, "link", "set", "lo", "up"])
            self._do(ShapedUplink(link.host_if).tbf_args(downlink_bps))  # the same filter, at r_dn
            self._do(ns + ShapedUplink(link.device_if).tbf_args(uplink_bps[k]))
            if impairment.active:  # the downlink, parked where it arrives
                self._do(ns + ["iptables", "-w", "-A", "INPUT", "-i", link.device_if, "-j", "NFQUEUE",
                               "--queue-num", str(QUEUE)])
            self.links.append(link)
        if any(link.impairment.active for link in self.links):  # the uplink, parked where it arrives
            rule = self.uplink_rule
            self._do(["iptables", "-w", "-I", *rule], made=["rule", *rule])
        self._save()

    @property
    def uplink_queue(self) -> int:
        return int(self.tag, 16)

    @property
    def uplink_rule(self) -> list[str]:
        return ["INPUT", "-i", self.bridge, "-j", "NFQUEUE", "--queue-num", str(self.uplink_queue)]

    def device_command(self, index: int, command: Sequence[str]) -> list[str]:
        """``command`` run inside device ``index``'s namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.links[index].namespace, *command]

    def delayline_file(self, path: Path, seed: int) -> Path | None:
        """The :mod:`sflam.delayline` links file for the devices whose link delays or drops; None if none."""
        active = {link.namespace: {"address": link.address, **asdict(link.impairment)}
                  for link in self.links if link.impairment.active}
        if not active:
            return None
        path.write_text(json.dumps({"seed": seed, "uplink_queue": self.uplink_queue, "links": active}, indent=1) + "\n")
        return path

    def set_link(self, index: int, up: bool) -> None:
        """Device ``index``'s link up or down (a flap: the bridge end loses carrier for the device)."""
        self._do(["ip", "link", "set", self.links[index].host_if, "up" if up else "down"])

    # ------------------------------------------------------------------ removing

    def close(self) -> list[str]:
        """Remove everything this run made; returns what is still there afterwards (empty: clean)."""
        for made in reversed(self.made):
            self.run(_undo(made))
        left = self.leftovers()
        if not left and self.tag:
            self.state_file.unlink(missing_ok=True)
        elif left:
            log.warning("network netem: left after cleanup: %s", ", ".join(left))
        return left

    def leftovers(self) -> list[str]:
        """Interfaces, namespaces and the uplink rule of this run's tag that exist now."""
        return leftovers(self.tag, self.run) if self.tag else []

    def summary(self) -> dict:
        """What summary.json records about the links."""
        return {"tag": self.tag, "subnet": f"10.{self.subnet}.0.0/16", "broker_host": self.broker_host,
                "links": {link.device_id: {"namespace": link.namespace, "address": link.address,
                                           **asdict(link.impairment)} for link in self.links}}

    # ------------------------------------------------------------------ helpers

    def _do(self, cmd: Sequence[str], made: list[str] | None = None) -> None:
        done = self.run(cmd)
        if done.returncode != 0:
            raise NetemError(f"network netem: `{' '.join(cmd)}` failed: {(done.stderr or '').strip()}")
        if made is not None:
            self.made.append(made)
            self._save()

    def _out(self, cmd: Sequence[str]) -> str:
        done = self.run(cmd)
        return (done.stdout or "") if done.returncode == 0 else ""

    def _save(self) -> None:
        if self.tag:
            self.state_file.write_text(json.dumps({"pid": os.getpid(), "subnet": self.subnet, "made": self.made}))


def _undo(made: Sequence[str]) -> list[str]:
    """The command that removes what ``made`` records (a veth goes with its peer and qdiscs, a
    namespace with its interfaces, rules and queue)."""
    kind, rest = made[0], list(made[1:])
    if kind == "rule":
        return ["iptables", "-w", "-D", *rest]
    return ["ip", "link", "del", *rest] if kind == "link" else ["ip", "netns", "del", *rest]


def leftovers(tag: str, run: Callable[[Sequence[str]], subprocess.CompletedProcess] = _run) -> list[str]:
    """Interfaces named ``sf<tag>...``, namespaces named ``sflam-<tag>-...`` and iptables rules
    naming the run's bridge that exist now."""
    links = re.findall(r"^\d+:\s+([^:@\s]+)", run(["ip", "-o", "link", "show"]).stdout or "", re.M)
    spaces = [line.split()[0] for line in (run(["ip", "netns", "list"]).stdout or "").splitlines() if line.strip()]
    rules = run(["iptables", "-w", "-S", "INPUT"]).stdout or ""
    return ([f"link {name}" for name in links if name.startswith(f"sf{tag}")]
            + [f"netns {name}" for name in spaces if name.startswith(f"sflam-{tag}-")]
            + [f"rule {line}" for line in rules.splitlines() if f"sf{tag}br" in line])


def _states(state_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(state_dir).glob("*.json")) if Path(state_dir).is_dir() else []:
        try:
            out.append({**json.loads(path.read_text() or "{}"), "tag": path.stem, "path": path})
        except (OSError, ValueError):
            out.append({"tag": path.stem, "path": path})
    return out


def sweep_stale(state_dir: Path = STATE_DIR,
                run: Callable[[Sequence[str]], subprocess.CompletedProcess] = _run) -> list[str]:
    """Remove what runs whose owner process is gone left behind (a SIGKILLed run); their tags."""
    swept = []
    for state in _states(state_dir):
        pid = state.get("pid")
        if isinstance(pid, int) and _alive(pid):
            continue
        if pid is None and state["path"].stat().st_mtime > time.time() - 60:
            continue  # just reserved by a run that has not written its PID yet
        for made in reversed(state.get("made", [])):
            run(_undo(made))
        if not leftovers(state["tag"], run):
            state["path"].unlink(missing_ok=True)
            swept.append(state["tag"])
            log.info("network netem: removed what run %s (pid %s, gone) left", state["tag"], pid)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



# ---------------------------------------------------------------------------------------------
# one simulated run's links


@dataclass
class Flap:
    """A scheduled link flap (``--link-flap ROUND:DOWN_S[:DEVICE]``): device ``device``'s link
    (index, default 0) down ``after_s`` into round ``round`` (timed from the record of the round
    before), for ``down_s`` seconds; and when that happened."""

    round: int
    down_s: float
    device: int = 0
    after_s: float = 1.5
    started_at: float | None = None
    down_at: float | None = None
    up_at: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Flap":
        """``ROUND:DOWN_S[:DEVICE]``; ValueError saying what is wrong."""
        parts = str(text).split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            flap = cls(int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 0)
        except ValueError:
            raise ValueError(f"link_flap: expected ROUND:DOWN_S[:DEVICE] such as 2:12, got {text!r}") from None
        if flap.round < 2 or not (0 < flap.down_s < 3600) or flap.device < 0:
            raise ValueError(f"link_flap: ROUND >= 2 (it is timed from the record of the round before), "
                             f"0 < DOWN_S < 3600 and DEVICE >= 0, got {text!r}")
        return flap


class RunLinks:
    """``sflam simulate --network netem``: the run's :class:`Topology`, its delay line process and
    its flap. :meth:`open` before the broker starts; :meth:`add_devices` once the scenario exists;
    :meth:`poll` from the monitoring loop; :meth:`close` in the run's ``finally``."""

    DELAYLINE = "delayline"

    def __init__(self, *, delay_ms: float | None, jitter_ms: float | None, loss: float | None,
                 flap: Flap | None, seed: int) -> None:
        self.delay_ms, self.jitter_ms, self.loss = delay_ms, jitter_ms, loss
        self.flap, self.seed = flap, seed
        self.topology = Topology()
        self.closed_clean: bool | None = None
        self.left: list[str] = []

    @property
    def broker_host(self) -> str:
        return self.topology.broker_host

    def open(self) -> None:
        self.topology.open()

    def add_devices(self, devices: Sequence, scenario: Path, devices_per_round: int, group, logs: Path) -> None:
        """Namespaces and links for ``devices`` (DeviceSpec: device_id, profile, channel_gain), shaped
        at the scenario's equal-share full-power uplink and fixed downlink rates; then the delay line
        (when any link delays or drops), started in ``group`` and waited for."""
        from allocator.scenario import load_scenario
        from edge_runtime.link import uplink_rate_bps
        from firmware_profiles import load_profile

        problem = load_scenario(scenario)
        share = problem.params.total_bandwidth_hz / max(1, devices_per_round)
        kinds = {d.profile: load_profile(d.profile).radio.kind for d in devices}
        impairments = [impairment_for(kinds[d.profile], self.delay_ms, self.jitter_ms, self.loss) for d in devices]
        uplinks = [uplink_rate_bps(share, float(problem.fleet.max_tx_power_w[k]), d.channel_gain)
                   for k, d in enumerate(devices)]
        self.topology.add_devices([d.device_id for d in devices], impairments, problem.params.downlink_rate_bps, uplinks)
        links_file = self.topology.delayline_file(Path(logs).parent / "links.json", self.seed)
        if links_file is not None:
            import sys

            from sflam.processes import ProcessError

            group.start(self.DELAYLINE, [sys.executable, "-m", "sflam.delayline", "--links", str(links_file)])
            try:
                group.wait_for_log(self.DELAYLINE, "delayline: ready", 30.0)
            except ProcessError as exc:
                raise NetemError(f"network netem: the delay line did not start: {exc}") from None

    def device_command(self, index: int, command: Sequence[str], channel_gain: float) -> list[str]:
        """``sflam device`` in its namespace, re-rating its own link."""
        link = self.topology.links[index]
        return self.topology.device_command(index, [*command, "--shaped-link", link.device_if,
                                                    "--channel-gain", repr(channel_gain)])

    def poll(self, counted_rounds: int, now: float) -> None:
        """Drive the flap: its round began when ``counted_rounds`` reached round - 1."""
        flap = self.flap
        if flap is None or flap.up_at is not None:
            return
        if flap.started_at is None and counted_rounds >= flap.round - 1:
            flap.started_at = now
        if flap.started_at is not None and flap.down_at is None and now - flap.started_at >= flap.after_s:
            self.topology.set_link(flap.device, up=False)
            flap.down_at = now
            log.info("network netem: link of device %d down (round %d, %.0f s)", flap.device, flap.round, flap.down_s)
        if flap.down_at is not None and now - flap.down_at >= flap.down_s:
            self.topology.set_link(flap.device, up=True)
            flap.up_at = now
            log.info("network netem: link of device %d up again", flap.device)

    def close(self) -> list[str]:
        """Take down everything (the flapped link first back up is not needed: it is deleted)."""
        self.left = self.topology.close()
        return self.left

    def summary(self, delayline_output: str = "") -> dict:
        """summary.json's ``links``: the topology, the flap, the delay line's counts, what was left."""
        out = {**self.topology.summary(), "left_after_cleanup": self.left}
        flap = self.flap
        if flap is not None:
            out["flap"] = {"round": flap.round, "device": flap.device, "down_s": flap.down_s,
                           "happened": flap.down_at is not None,
                           "down_for_s": None if flap.down_at is None or flap.up_at is None
                           else round(flap.up_at - flap.down_at, 3)}
        for line in delayline_output.splitlines():
            if line.startswith("delayline-summary "):
                try:
                    out["delayline"] = json.loads(line.split(" ", 1)[1])
                except ValueError:
                    pass
        return out
