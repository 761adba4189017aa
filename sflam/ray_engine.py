"""Device hosts as Ray actors (``sflam simulate --engine ray``), for fleets one machine cannot hold.

The broker and the server stay where ``sflam simulate`` runs; each device host (the same
:class:`edge_runtime.host.DeviceHost` a local ``sflam device-host`` process runs) becomes a named
Ray actor placed by Ray, on nodes that offer the ``sflam_host`` resource when any does, and its
devices reach the broker over the network. The bundle and the shards are read by path: the nodes
must share the run directory's file system (NFS, or one machine's namespaces as in the tests).
An actor that dies takes its devices' sessions with it: the broker publishes their wills, the
server fails those devices as offline, and the run goes on with the rest.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

from sflam.options import SimulateError

RESOURCE = "sflam_host"  # a node offering it gets the device hosts
INSTALL_HINT = "pip install 'sflam[cluster]' (ray==2.58.0)"
CONNECT_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 60.0


class HostActor:
    """The body of one device-host actor: build the host, serve until stopped, report."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from edge_runtime.host import DeviceHost, HostedDevice
        from sflam_common.limits import raise_open_file_limit

        raise_open_file_limit()
        self.host = DeviceHost(Path(spec["bundle"]), spec["broker"], [HostedDevice(**d) for d in spec["devices"]],
                               **spec["options"])
        self.stopping = threading.Event()

    def run(self) -> dict[str, Any]:
        import ray

        self.host.start()
        try:
            self.host.run(self.stopping)
        finally:
            self.host.close()
        return {**self.host.summary(), "node": ray.util.get_node_ip_address()}

    def stop(self) -> None:
        self.stopping.set()


def preflight(address: str | None) -> Any:
    """The ``ray`` module, once Ray is known to be installed and ``address`` to answer; SimulateError
    at once otherwise (run before anything of the run starts)."""
    try:
        import ray
    except ImportError:
        raise SimulateError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    if address not in (None, "auto"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise SimulateError(f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
                                f"`ray start --head` or give the head's HOST:PORT") from None
    return ray


def connect(address: str | None) -> Any:
    """``ray`` connected to the cluster at ``address`` (None: a local one), after :func:`preflight`."""
    ray = preflight(address)
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    return ray


class RayHosts:
    """The run's device-host actors, seen like processes by ``sflam simulate`` (exited, tail, stop)."""

    def __init__(self, ray: Any, specs: list[dict[str, Any]], namespace: str) -> None:
        self.ray = ray
        actor_class = ray.remote(max_concurrency=2)(HostActor)  # run() blocks; stop() must get through
        placement = {"resources": {RESOURCE: 1}} if ray.cluster_resources().get(RESOURCE) else {}
        self.names = [f"sflam-host-{k}" for k in range(len(specs))]
        self.actors = {name: actor_class.options(name=name, namespace=namespace, num_cpus=0, **placement).remote(spec)
                       for name, spec in zip(self.names, specs)}
        self.runs = {name: actor.run.remote() for name, actor in self.actors.items()}
        self.results: dict[str, dict[str, Any] | str] = {}

    def exited(self, names: list[str] | None = None) -> dict[str, int]:
        """0 for an actor whose run returned, 1 for one that died or raised."""
        done = {}
        for name in names or self.names:
            ready, _ = self.ray.wait([self.runs[name]], timeout=0)
            if ready:
                done[name] = 0 if isinstance(self._result(name), dict) else 1
        return done

    def _result(self, name: str) -> dict[str, Any] | str:
        if name not in self.results:
            try:
                self.results[name] = self.ray.get(self.runs[name])
            except Exception as exc:  # noqa: BLE001 - RayActorError, RayTaskError: both mean "gone"
                self.results[name] = f"{type(exc).__name__}: {exc}"
        return self.results[name]

    def tail(self, name: str, lines: int = 8) -> str:
        result = self.results.get(name, "still running")
        return result if isinstance(result, str) else "completed"

    def stop(self) -> list[dict[str, Any]]:
        """Ask every live actor to stop, wait for its summary, kill what does not answer."""
        for name, actor in self.actors.items():
            if name not in self.exited([name]):
                actor.stop.remote()
        ready, pending = self.ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=STOP_TIMEOUT_S)
        for name, actor in self.actors.items():
            if self.runs[name] in pending:
                self.ray.kill(actor)
        return [{"name": name, **result} if isinstance(result, dict) else {"name": name, "error": result}
                for name in self.names for result in [self._result(name)]]
