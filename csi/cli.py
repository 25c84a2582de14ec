"""Command line: flags and the config file to objects, and the only place that picks
concrete backend implementations.

    cairn-csi --endpoint unix:///run/cairn/csi.sock --node-id NODE [--config FILE]
              [--registration-dir DIR --kubelet-registration-path PATH]
    cairn-csi client --endpoint ... COMMAND     (see csi/client.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import cast

from prometheus_client.registry import Collector

from csi import DRIVER_NAME, __version__, config, kube
from csi import log as logsetup
from csi.backends import local, lvm, nfs
from csi.backends.base import Backend, SnapshotBlocks
from csi.backends.routed import NodeAgent, NodeKeyed, NodeKeyedConnector, Objects, RoutedVolumes
from csi.backup.configured import build_repositories
from csi.backup.engine import Backups, NodeBackups
from csi.backup.repository import Repository
from csi.config import BackendConfig
from csi.controller import ControllerService
from csi.errors import CairnError, ConfigError
from csi.identity import IdentityService
from csi.metrics import Metrics
from csi.node import NodeService
from csi.nodes import KubernetesNodes, NodeDirectory
from csi.nodestate import NodeState
from csi.orphans import OrphanWatch, References
from csi.registration import RegistrationServer
from csi.registry import Registry
from csi.scheduler import Scheduler
from csi.server import STOP_GRACE, STOP_STEP, Companion, Server, Services, parse_endpoint
from csi.snapshot_metadata import SnapshotMetadataService, offered

log = logging.getLogger("csi")

DEFAULT_ROOT = "/var/lib/cairn-csi"
STOP_DEADLINE = 25.0
"""The longest a stop takes, from the signal to the end of the process: less than the 30 s
the kubelet gives a pod to end before it kills it (the default terminationGracePeriodSeconds)."""
SIGNAL_POLL = 1.0


# kind -> builder(config, node ID, whether this process serves the controller, the node)
def _rbd(config: BackendConfig, node_id: str, controller: bool, node: bool) -> Backend:
    # Imported on use: a controller needs python3-rbd only where an rbd backend is configured.
    try:
        from csi.backends import rbd
    except ImportError as exc:
        raise ConfigError(f"backend {config.name!r}: the rbd kind needs python3-rbd and python3-rados ({exc})") from exc
    try:
        return rbd.build(config, node_id, controller, node)
    except ImportError as exc:
        raise ConfigError(
            f"backend {config.name!r}: the rbd controller needs python3-rbd and python3-rados ({exc})"
        ) from exc


BUILDERS: dict[str, Callable[[BackendConfig, str, bool, bool], Backend]] = {
    "local": local.build,
    "rbd": _rbd,
    "nfs": nfs.build,
    "lvm": lvm.build,
}


def build_backends(
    driver_config: config.DriverConfig,
    node_id: str,
    controller: bool,
    node: bool,
    routing: Callable[[], Objects | None] = lambda: None,
    repositories: Callable[[], Mapping[str, Repository]] = dict,
) -> tuple[list[Backend], list[NodeAgent]]:
    """The backends of the configuration, each with the halves this process's role
    needs, and the node agents of the routed ones. A node-local backend is routed
    through the Kubernetes API (``backends.routed``) when it pins no ``node``, and
    ``routing`` gives a connection (asked once, only when such a backend is configured):
    an lvm backend by default, a local backend only with a ``nodes`` list, as the
    volumes of a local backend serving one node have IDs without their node. The agent
    of a backend that reads its blocks copies backups into ``repositories`` (asked only
    then) and restores from them."""
    backends, agents = [], []
    objects: Objects | None = None
    asked = False
    for entry in driver_config.backends:
        builder = BUILDERS.get(entry.kind)
        if builder is None:
            raise ConfigError(f"backend {entry.name!r}: unknown kind {entry.kind!r} (known: {', '.join(BUILDERS)})")
        candidate = not entry.settings.get("node") and (entry.kind == "lvm" or "nodes" in entry.settings)
        if candidate and not asked:
            objects, asked = routing(), True
        if candidate and objects is not None:
            # The controller half is the agent's, on each node; never built here.
            backend, agent = _routed(
                builder(entry, node_id, False, node), entry, node_id, controller, node, objects, repositories
            )
            agents += [agent] if agent else []
        else:
            backend = builder(entry, node_id, controller, node)
        backends.append(backend)
    return backends, agents


def _routed(
    backend: Backend,
    entry: BackendConfig,
    node_id: str,
    controller: bool,
    node: bool,
    objects: Objects,
    repositories: Callable[[], Mapping[str, Repository]] = dict,
) -> tuple[Backend, NodeAgent | None]:
    """``backend`` served on many nodes: the controller half through NodeVolume objects,
    the node's own storage through an agent (on the nodes ``nodes`` lists, or every one)."""
    how = backend.routing
    if how is None:
        raise ConfigError(f"backend {entry.name!r}: a {entry.kind} backend cannot serve many nodes")
    nodes = entry.settings.get("nodes") or []
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise ConfigError(f"backend {entry.name!r}: 'nodes' must be a list of node names")
    if entry.kind != "lvm" and not nodes:
        raise ConfigError(f"backend {entry.name!r}: 'nodes' must name at least one node")
    selector = entry.settings.get("nodeSelector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise ConfigError(f"backend {entry.name!r}: 'nodeSelector' must map label names to values")
    routed = None
    if controller:
        routed = RoutedVolumes(
            backend.name,
            objects,
            how.rest,
            volume_parameters=how.volume_parameters,
            snapshot_parameters=how.snapshot_parameters,
            nodes=nodes,
        )
    agent = None
    connector = backend.node
    if node and (not nodes or node_id in nodes) and _selected(objects, node_id, selector, entry.name):
        executor = BUILDERS[entry.kind](entry, node_id, True, False).volumes
        if not how.node_in_ids:
            executor = NodeKeyed(executor, backend.name, node_id)
        work = NodeBackups(repositories(), cast(SnapshotBlocks, executor)) if backend.capabilities.blocks else None
        agent = NodeAgent(backend.name, node_id, objects, executor, how.rest, backups=work)
    if connector is not None and not how.node_in_ids:
        connector = NodeKeyedConnector(connector)
    log.info("backend %s: volumes on many nodes, reached through the Kubernetes API", backend.name)
    # The controller holds no node's storage here: the nodes read and fill the blocks of
    # backups and restores, and no changed-block tracking is offered.
    capabilities = dataclasses.replace(backend.capabilities, blocks=False, node_blocks=backend.capabilities.blocks)
    return dataclasses.replace(backend, capabilities=capabilities, controller=routed, node=connector), agent


def _selected(objects: Objects, node_id: str, selector: dict[str, str], backend: str) -> bool:
    """Whether this node's labels match a backend's ``nodeSelector`` (read once, at start:
    a node relabelled later takes effect when its plugin restarts)."""
    if not selector:
        return True
    try:
        labels = objects.node_labels(node_id)
    except CairnError as exc:
        raise ConfigError(f"backend {backend!r}: cannot read node {node_id!r} for its nodeSelector: {exc}") from exc
    if labels is None:
        raise ConfigError(f"backend {backend!r}: there is no Node {node_id!r} to match its nodeSelector against")
    chosen = all(labels.get(key) == value for key, value in selector.items())
    if not chosen:
        log.info("backend %s: this node's labels do not match its nodeSelector; not serving it here", backend)
    return chosen


def node_routing(mode: str, kubeconfig: str | None = None) -> Objects | None:
    """The Kubernetes API for routed backends: like ``node_directory``, ``auto`` uses it
    in a pod, ``kubernetes`` insists (the kubeconfig outside a cluster), ``off`` never."""
    if mode == "off" or (mode == "auto" and not kube.in_cluster()):
        log.info("node routing off: node-local backends serve the node they name, or this one")
        return None
    return Objects.connect(
        kube.configuration(kubeconfig=mode == "kubernetes", config_file=kubeconfig, purpose="node routing")
    )


def tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535)")
    return port


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="cairn-csi", description=f"{DRIVER_NAME}: a CSI driver with many backends")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--endpoint",
        default=env("CSI_ENDPOINT", f"unix://{DEFAULT_ROOT}/csi.sock"),
        help="unix:///path/csi.sock or tcp://host:port (env CSI_ENDPOINT)",
    )
    p.add_argument("--node-id", default=env("NODE_ID") or socket.gethostname(), help="this node's ID (env NODE_ID)")
    p.add_argument(
        "--config", default=env("CAIRN_CONFIG"), help="driver config file (YAML); none: embedded local backend"
    )
    p.add_argument("--data-dir", default=f"{DEFAULT_ROOT}/local", help="directory of the embedded local backend")
    p.add_argument("--state-dir", default=f"{DEFAULT_ROOT}/node", help="where the node plugin records staged volumes")
    p.add_argument("--mode", choices=("all", "controller", "node"), default="all", help="which CSI services to serve")
    p.add_argument("--max-volumes-per-node", type=int, default=0, help="attach limit reported to Kubernetes (0: none)")
    p.add_argument(
        "--volume-mount-group",
        action="store_true",
        default=env("CAIRN_VOLUME_MOUNT_GROUP") == "true",
        help="apply pods' fsGroup to volumes in the driver (root folder only, setgid) instead of the kubelet's walk",
    )
    p.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    p.add_argument(
        "--check-nodes",
        choices=("auto", "kubernetes", "off"),
        default="auto",
        help="refuse ControllerPublishVolume to a node whose CSINode does not list the driver: "
        "auto (when running in a Kubernetes cluster), kubernetes (in-cluster, else the kubeconfig), off",
    )
    p.add_argument(
        "--node-routing",
        choices=("auto", "kubernetes", "off"),
        default="auto",
        help="serve node-local backends that name no node on every node, reaching each node through the "
        "Kubernetes API: auto (when running in a Kubernetes cluster), kubernetes (in-cluster, else the "
        "kubeconfig), off (they serve --node-id)",
    )
    p.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG") or None,
        help="outside a cluster, the kubeconfig that --node-routing kubernetes uses (env KUBECONFIG; "
        "default ~/.kube/config)",
    )
    p.add_argument(
        "--orphan-interval",
        type=float,
        default=300.0,
        help="seconds between two checks for volumes and snapshots no Kubernetes object names, logged and "
        "exported as cairn_orphans (in a cluster; 0: off)",
    )
    p.add_argument(
        "--health-port", type=int, default=0, help="TCP port serving only grpc.health.v1, for gRPC probes (0: off)"
    )
    p.add_argument(
        "--metrics-port",
        type=tcp_port,
        default=env("CAIRN_METRICS_PORT", "0"),
        help="TCP port serving Prometheus metrics at /metrics on every interface (0: off; env CAIRN_METRICS_PORT)",
    )
    p.add_argument(
        "--registration-dir",
        metavar="DIR",
        help="register the node plugin with the kubelet itself (no node-driver-registrar): serve the kubelet's "
        f"plugin-registration API on DIR/{DRIVER_NAME}-reg.sock, DIR being the kubelet's plugins_registry as "
        "mounted here; needs --kubelet-registration-path",
    )
    p.add_argument(
        "--kubelet-registration-path",
        metavar="PATH",
        help="the CSI socket (--endpoint) as the kubelet sees it on the host, "
        f"e.g. /var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock; needs --registration-dir",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    return p


def check_registration(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The registration flags come together, only where the node service runs, and name a
    socket the kubelet can dial (the kubelet speaks to CSI drivers over unix sockets only).
    Exits with usage and code 2 otherwise."""
    directory, path = args.registration_dir, args.kubelet_registration_path
    if directory is None and path is None:
        return
    if directory is None or path is None:
        p.error("--registration-dir and --kubelet-registration-path go together: give both or neither")
    if args.mode == "controller":
        p.error("--registration-dir registers a node plugin with the kubelet: it needs --mode node or all")
    if not os.path.isabs(path):
        p.error(f"--kubelet-registration-path must be an absolute path on the host, not {path!r}")
    if not directory:
        p.error("--registration-dir must name a directory")
    try:
        unix = parse_endpoint(args.endpoint).socket_path is not None
    except ConfigError:
        return  # build_server names the bad endpoint
    if not unix:
        p.error("--registration-dir needs a unix:// --endpoint: the kubelet reaches CSI drivers over unix sockets")


def node_directory(mode: str) -> NodeDirectory | None:
    """Where ControllerPublishVolume learns which nodes exist. ``auto`` uses Kubernetes
    when running in a pod (KUBERNETES_SERVICE_HOST set, service account mounted) and
    nothing otherwise; ``kubernetes`` insists, falling back to the kubeconfig outside a
    cluster, and stops start-up when neither is there."""
    if mode == "off" or (mode == "auto" and not kube.in_cluster()):
        log.info("node checks off: ControllerPublishVolume accepts any node ID")
        return None
    try:
        nodes = KubernetesNodes.connect(kubeconfig=mode == "kubernetes")
    except ConfigError as exc:
        if mode == "kubernetes":
            raise
        log.warning("node checks off: %s", exc)
        return None
    log.info("node checks on: ControllerPublishVolume refuses nodes whose CSINode does not list %s", DRIVER_NAME)
    return nodes


def orphan_watch(registry: Registry, interval: float) -> OrphanWatch | None:
    """The controller's periodic orphan check, in a Kubernetes cluster (off with 0)."""
    if interval <= 0 or not kube.in_cluster():
        return None
    try:
        references = References.connect(kube.configuration(purpose="the orphan check"))
    except ConfigError as exc:
        log.warning("orphan check off: %s", exc)
        return None
    return OrphanWatch(registry, references, interval=interval)


def build_server(args: argparse.Namespace) -> Server:
    driver_config = config.load(args.config) if args.config else config.embedded_default(args.data_dir)
    serves_controller = args.mode in ("all", "controller")
    serves_node = args.mode in ("all", "node")
    repositories = functools.cache(lambda: build_repositories(driver_config.repositories))
    backends, agents = build_backends(
        driver_config,
        args.node_id,
        serves_controller,
        serves_node,
        lambda: node_routing(args.node_routing, args.kubeconfig),
        repositories,
    )
    registry = Registry(backends)
    controller = snapshot_metadata = None
    backups: Backups | None = None
    if serves_controller:
        backups = Backups(registry, repositories())
        controller = ControllerService(registry, Scheduler(registry), node_directory(args.check_nodes), backups)
        if offered(registry):
            snapshot_metadata = SnapshotMetadataService(registry)
    node = None
    if serves_node:
        node = NodeService(
            registry, args.node_id, NodeState(args.state_dir), args.max_volumes_per_node, args.volume_mount_group
        )
    identity = IdentityService(
        registry, controller=controller is not None, snapshot_metadata=snapshot_metadata is not None
    )
    services = Services(identity, controller, node, snapshot_metadata)
    # Backend health and free space only where the controller runs: a node plugin has no
    # business asking a storage cluster.
    watched = list(registry) if serves_controller else []
    companions: list[Companion] = list(agents)
    watch = orphan_watch(registry, args.orphan_interval) if serves_controller else None
    if watch is not None:
        companions.append(watch)
    collectors: list[Collector] = [c for c in (watch, backups) if c is not None]
    metrics = Metrics(args.metrics_port, watched, collectors=collectors) if args.metrics_port else None
    if serves_node and args.registration_dir:
        companions.append(RegistrationServer(args.registration_dir, args.kubelet_registration_path))
    settlers = [(f"settling backend {b.name}", b.controller.settle) for b in backends if b.controller is not None]
    return Server(
        args.endpoint,
        services,
        workers=args.workers,
        health_port=args.health_port,
        ready=identity.ready,
        metrics=metrics,
        companions=companions,
        closers=settlers,
    )


def serve(argv: Sequence[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_registration(p, args)
    logsetup.setup(args.log_level, args.log_json)
    try:
        server = build_server(args)
        server.start()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2

    return run_until_signalled(server)


def run_until_signalled(
    server: Server, grace: float = STOP_GRACE, step: float = STOP_STEP, deadline: float = STOP_DEADLINE
) -> int:
    """Serve until SIGTERM or SIGINT, then stop ``server`` (see ``Server.stop``) and end
    the process within ``deadline`` seconds of the signal, whatever still runs:

    * The handler only notes the signal, and the main thread waits for it in slices of
      SIGNAL_POLL seconds: Python runs a handler in the main thread once that thread runs
      again, and a wait without end might not, when the signal lands on another thread.
    * The stop bounds each of its steps. When it cut calls short or left a step behind,
      the process exits at once (``os._exit``): an orderly exit would wait for the threads
      still in those calls, as long as their backend takes (a Ceph operation, a copy).
      Every operation is safe to cut short: a retry finishes it, as after a crash.
    * Whatever else holds the end up (an exit blocked in a library), ``faulthandler``
      ends the process at ``deadline``: it logs every thread's stack, which names what
      held it, and exits with 1. Its timer runs without the interpreter's lock."""
    signalled = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not signalled.is_set():
            faulthandler.dump_traceback_later(deadline, exit=True)
            log.info("signal %s: stopping", signal.Signals(signum).name)
        signalled.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGUSR1 writes every thread's stack to the log and serves on: where a call that
    # never answers (a backend library waiting on something) is held, without a stop.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("serving until SIGTERM or SIGINT")
    while not signalled.wait(SIGNAL_POLL):
        pass
    if server.stop(grace=grace, step=step):
        return 0
    log.warning("exiting without waiting for what the stop cut short")
    logging.shutdown()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        from csi.client import main as client_main

        return client_main(argv[1:])
    return serve(argv)
