"""The node directory that lets ControllerPublishVolume answer NOT_FOUND for a node that
does not exist: ``KubernetesNodes`` against a small HTTP server in the test that answers
as the API server does (CSINode objects, lists, 404, 403, 500, silence), through the real
``kubernetes`` client; and the whole path through a running driver.

The fake server speaks only the few requests the directory makes. The proof against a
real API server (kubelet's own CSINode objects, the chart's RBAC) comes with the cluster
test tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from kubernetes.client import Configuration

from csi import DRIVER_NAME
from csi.errors import NotFound, Unavailable
from csi.generated import csi_pb2 as pb
from csi.nodes import KubernetesNodes
from tests.support import NODE_ID, Driver, mount_capability

PREFIX = "/apis/storage.k8s.io/v1/csinodes"


def csinode(name: str, *drivers: tuple[str, str]) -> dict[str, Any]:
    """A CSINode as the API server serves it; ``drivers`` are (driver name, node ID)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSINode",
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "7"},
        "spec": {"drivers": [{"name": driver, "nodeID": node_id, "topologyKeys": None} for driver, node_id in drivers]},
    }


@dataclass
class FakeApiServer:
    """CSINode objects served over HTTP on loopback; ``status`` forces an error answer and
    ``hang`` makes every request wait (until the test ends) without answering."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: int = 0
    hang: bool = False
    requests: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    released: threading.Event = field(default_factory=threading.Event)

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if self.status:
            return self.status, status_body(self.status, "InternalError" if self.status >= 500 else "Forbidden")
        name = path.removeprefix(PREFIX).lstrip("/")
        if not name:
            items = [self.objects[n] for n in sorted(self.objects)]
            return 200, {"apiVersion": "storage.k8s.io/v1", "kind": "CSINodeList", "metadata": {}, "items": items}
        if name in self.objects:
            return 200, self.objects[name]
        return 404, status_body(404, "NotFound", f'csinodes.storage.k8s.io "{name}" not found')

    def count(self, kind: str) -> int:
        """How many GETs of one object ("get") or lists ("list") were served."""
        return sum(1 for r in self.requests if (urlsplit(r).path == PREFIX) == (kind == "list"))


def status_body(code: int, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message or reason,
        "reason": reason,
        "code": code,
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.requests.append(self.path)
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            if fake.hang:
                fake.released.wait(30)
                return
            path = urlsplit(self.path).path
            code, body = fake.answer(path) if path.startswith(PREFIX) else (404, status_body(404, "NotFound"))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.released.set()
    server.shutdown()
    server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def directory(api: FakeApiServer, clock: Clock | None = None, timeout: float = 5.0) -> KubernetesNodes:
    return KubernetesNodes.from_configuration(
        Configuration(host=api.url), timeout=timeout, clock=clock or Clock(), ttl=30.0, relist=5.0
    )


def test_a_node_whose_csinode_lists_the_driver_is_accepted_and_remembered(api: FakeApiServer) -> None:
    api.objects["worker-1"] = csinode("worker-1", ("other.csi.io", "i-0abc"), (DRIVER_NAME, "worker-1"))
    clock = Clock()
    nodes = directory(api, clock)
    nodes.require("worker-1")
    assert api.requests == [f"{PREFIX}/worker-1"], "one GET of the node's own CSINode, no list"
    for _ in range(20):  # a publish storm
        nodes.require("worker-1")
    assert len(api.requests) == 1, "an accepted node is remembered"
    clock.now += 31
    nodes.require("worker-1")
    assert len(api.requests) == 2, "and asked about again once that is stale"


def test_an_unknown_node_is_not_found_and_named(api: FakeApiServer) -> None:
    api.objects["worker-1"] = csinode("worker-1", (DRIVER_NAME, "worker-1"))
    nodes = directory(api)
    with pytest.raises(NotFound, match=rf"node 'ghost' does not exist: no CSINode lists driver {DRIVER_NAME}"):
        nodes.require("ghost")
    assert (api.count("get"), api.count("list")) == (1, 1), "a 404, then the list for a node ID not its name"


def test_a_node_without_the_cairn_node_plugin_is_not_found(api: FakeApiServer) -> None:
    api.objects["worker-2"] = csinode("worker-2", ("other.csi.io", "worker-2"))
    with pytest.raises(NotFound, match=f"node 'worker-2' does not run the Cairn node plugin: its CSINode lists no driver {DRIVER_NAME}"):  # fmt: skip
        directory(api).require("worker-2")


def test_a_node_name_is_not_a_node_id_when_the_plugin_registered_another(api: FakeApiServer) -> None:
    api.objects["worker-3"] = csinode("worker-3", (DRIVER_NAME, "rack-7-worker-3"))
    nodes = directory(api)
    nodes.require("rack-7-worker-3")  # the node ID kubelet registered: found by listing
    with pytest.raises(NotFound, match=r"node 'worker-3' is not a Cairn node ID.*registered as 'rack-7-worker-3'"):
        nodes.require("worker-3")


def test_node_ids_that_are_not_object_names_are_looked_up_in_the_list(api: FakeApiServer) -> None:
    api.objects["worker-4"] = csinode("worker-4", (DRIVER_NAME, "Worker_4/eu"))
    nodes = directory(api)
    nodes.require("Worker_4/eu")
    assert api.count("get") == 0, "no GET of a name the API server could not hold"
    with pytest.raises(NotFound, match="'Ghost_1'"):
        nodes.require("Ghost_1")


def test_the_list_is_cached_and_a_miss_refreshes_it_at_most_every_few_seconds(api: FakeApiServer) -> None:
    clock = Clock()
    nodes = directory(api, clock)
    for _ in range(10):  # a storm of publishes to a node that is not there
        with pytest.raises(NotFound):
            nodes.require("NEW_NODE")
    assert api.count("list") == 1
    api.objects["late"] = csinode("late", (DRIVER_NAME, "NEW_NODE"))  # its plugin registers
    clock.now += 5
    nodes.require("NEW_NODE")
    assert api.count("list") == 2, "a miss lists again once the list is a few seconds old"


def test_api_failures_are_unavailable_never_a_refusal(api: FakeApiServer) -> None:
    api.objects["worker-1"] = csinode("worker-1", (DRIVER_NAME, "worker-1"))
    nodes = directory(api)
    api.status = 500
    with pytest.raises(Unavailable, match=r"cannot tell whether node 'worker-1' runs the Cairn node plugin.*500"):
        nodes.require("worker-1")
    api.status = 403
    with pytest.raises(Unavailable, match=r"403.*ClusterRole must allow get and list on storage.k8s.io csinodes"):
        nodes.require("worker-1")
    api.status = 0  # the API server is back: the same node is accepted
    nodes.require("worker-1")


def test_an_api_server_that_does_not_answer_is_unavailable_within_the_timeout(api: FakeApiServer) -> None:
    api.hang = True
    started = time.monotonic()
    with pytest.raises(Unavailable, match="could not be reached"):
        directory(api, timeout=0.5).require("worker-1")
    assert time.monotonic() - started < 5, "every request is bounded by the timeout (one retry)"


def test_an_api_server_that_is_not_there_is_unavailable(api: FakeApiServer) -> None:
    api.url = "http://127.0.0.1:1"  # nothing listens there
    with pytest.raises(Unavailable, match="could not be reached"):
        directory(api, timeout=2).require("worker-1")


# -- through a running driver ---------------------------------------------------------


def kubeconfig(path: Path, api: FakeApiServer) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "cairn", "user": {"token": "controller-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "cairn"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def publish(driver: Driver, volume_id: str, node_id: str) -> pb.ControllerPublishVolumeResponse:
    request = pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=mount_capability()
    )
    response: pb.ControllerPublishVolumeResponse = driver.controller.ControllerPublishVolume(request, timeout=30)
    return response


def test_publish_to_a_node_the_directory_does_not_know_is_not_found(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the cluster the tests may run in
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api)))
    driver = Driver(tmp_path / "driver", ["--check-nodes", "kubernetes"]).start()
    try:
        created = driver.controller.CreateVolume(
            pb.CreateVolumeRequest(name="pvc-n", volume_capabilities=[mount_capability()]), timeout=30
        )
        volume_id = created.volume.volume_id
        # The driver's own node has not registered yet: the local backend could serve it,
        # but the directory says no such node runs the plugin.
        with pytest.raises(grpc.RpcError) as refused:
            publish(driver, volume_id, NODE_ID)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"node {NODE_ID!r} does not exist" in str(refused.value.details())
        assert api.headers and api.headers[0].get("authorization") == "Bearer controller-token"
        api.status = 503
        with pytest.raises(grpc.RpcError) as unsure:
            publish(driver, volume_id, NODE_ID)
        assert unsure.value.code() == grpc.StatusCode.UNAVAILABLE
        api.status = 0
        api.objects[NODE_ID] = csinode(NODE_ID, (DRIVER_NAME, NODE_ID))  # the node plugin registered
        assert publish(driver, volume_id, NODE_ID).publish_context["image"]
        driver.controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID), timeout=30
        )
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=30)
    finally:
        assert driver.stop() == 0


def test_check_nodes_kubernetes_without_any_configuration_stops_start_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "missing")
    result = subprocess.run(
        [sys.executable, "-m", "csi", "--endpoint", f"unix://{tmp_path}/csi.sock", "--data-dir", str(tmp_path / "d"),
         "--mode", "controller", "--check-nodes", "kubernetes"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no Kubernetes configuration" in result.stderr


@pytest.mark.parametrize("mode", ["node", "controller"])
def test_outside_a_cluster_the_kubernetes_client_is_never_loaded(tmp_path: Path, mode: str) -> None:
    """A node plugin never checks nodes; a controller outside a cluster (auto) has no
    directory. Neither imports the client."""
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    script = (
        "import sys\n"
        "from csi import cli\n"
        f"args = cli.parser().parse_args(['--mode', {mode!r}, '--data-dir', {str(tmp_path / 'd')!r},"
        f" '--state-dir', {str(tmp_path / 's')!r}, '--endpoint', 'unix://{tmp_path}/csi.sock'])\n"
        "built = []\n"
        "service = cli.ControllerService\n"
        "cli.ControllerService = lambda registry, scheduler, nodes=None, backups=None: built.append(nodes) or (\n"
        "    service(registry, scheduler, nodes, backups))\n"
        "cli.build_server(args)\n"
        "print(built, 'kubernetes' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("[] False" if mode == "node" else "[None] False")
