"""The installed driver the way an operator meets it: csi-sanity against the sockets the
chart serves, the plugins' logs and metrics read through Kubernetes, and a `helm upgrade`
that rolls the pods without losing a volume in use."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from tests.ceph import USER, CephCluster
from tests.cluster.conftest import CHART, NAMESPACE, RELEASE, Kube
from tests.cluster.kube import NODE
from tests.cluster.test_flows import bound, claim, gone, pod
from tests.conformance.test_sanity import SECRET_NAMES, check, imposed_skips, run_sanity
from tests.support import mount_capability

pytestmark = pytest.mark.cluster


def plugin_pods(kube: Kube, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/name=cairn-csi,app.kubernetes.io/component={component}"
    pods: list[dict[str, Any]] = json.loads(
        kube.kubectl("get", "pod", f"--namespace={NAMESPACE}", "-l", selector, "-o", "json")
    )["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def controller_socket(kube: Kube) -> Path:
    """The controller plugin's socket, in its pod's emptyDir, as the host sees it."""
    (controller,) = plugin_pods(kube, "controller")
    uid = str(controller["metadata"]["uid"])
    return kube.cluster.kubelet_dir / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / "socket-dir" / "csi.sock"


@pytest.mark.parametrize("backend", ["local", "rbd"])
def test_csi_sanity_against_the_installed_driver(
    kube: Kube, release: dict[str, Any], ceph: CephCluster, tmp_path: Path, backend: str
) -> None:
    """The controller's and the node plugin's sockets, as the sidecars and the kubelet
    use them. Inside Kubernetes the controller knows the nodes (their CSINode objects), so
    the rbd skip for an unknown node is not imposed here: that spec must pass."""
    node_socket = kube.cluster.kubelet_dir / "plugins" / "cairn.csi.io" / "csi.sock"
    work = kube.cluster.kubelet_dir / f"sanity-{uuid.uuid4().hex[:8]}"  # a path the node plugin sees
    work.mkdir()
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text(yaml.safe_dump({"backend": "local" if backend == "local" else "ceph"}))
    # The controller's socket is deep in its pod's directory, beyond the length a unix
    # socket address may have: it is reached through a short link.
    link = Path(tempfile.mkdtemp(prefix="cairn-")) / "controller.sock"
    link.symlink_to(controller_socket(kube))
    extra = [f"--csi.controllerendpoint=unix://{link}", f"--csi.testvolumeparameters={parameters}"]
    if backend == "rbd":
        secrets = tmp_path / "secrets.yaml"
        credentials = {"userID": USER, "userKey": ceph.user_key}
        secrets.write_text(yaml.safe_dump({name: credentials for name in SECRET_NAMES}))
        extra.append(f"--csi.secrets={secrets}")
    # Checked as "<backend>-cluster" in skips.yaml: the skip imposed on rbd outside
    # Kubernetes (an unknown node) is neither imposed nor explained here.
    name = f"{backend}-cluster"
    result = run_sanity(work, f"unix://{node_socket}", "mount", [*extra, *imposed_skips(name)])
    shutil.rmtree(link.parent)
    check(work, result, name)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def called(kube: Kube, release: dict[str, Any]) -> None:
    """A CreateVolume and a DeleteVolume through the controller's socket, so the tests of
    its logs and metrics need no earlier test to have made a volume."""
    link = Path(tempfile.mkdtemp(prefix="cairn-")) / "controller.sock"  # a short path to a deep socket
    link.symlink_to(controller_socket(kube))
    try:
        with grpc.insecure_channel(f"unix://{link}") as channel:
            controller = pb_grpc.ControllerStub(channel)
            request = pb.CreateVolumeRequest(
                name=f"called-{uuid.uuid4().hex[:8]}",
                capacity_range=pb.CapacityRange(required_bytes=1 << 20),
                volume_capabilities=[mount_capability("ext4")],
                parameters={"backend": "local"},
            )
            made = controller.CreateVolume(request, timeout=60).volume
            controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made.volume_id), timeout=60)
    finally:
        shutil.rmtree(link.parent)


def test_logs_show_one_line_per_call_and_no_secret(
    kube: Kube, release: dict[str, Any], ceph: CephCluster, called: None
) -> None:
    (controller,) = plugin_pods(kube, "controller")
    log = kube.kubectl("logs", f"--namespace={NAMESPACE}", controller["metadata"]["name"], "-c", "cairn")
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    done = [line for line in lines if line.get("msg") == "done"]
    created = [line for line in done if line.get("rpc") == "CreateVolume" and line.get("code") == "OK"]
    assert created, f"no CreateVolume call logged:\n{log[-3000:]}"
    ids = [line.get("request_id") for line in done]
    assert all(ids), f"a call without a request ID: {[line for line in done if not line.get('request_id')][:3]}"
    assert len(set(ids)) == len(ids), "two calls logged as done under one request ID"
    assert ceph.user_key not in log, "a Ceph key reached the controller's log"
    for node in plugin_pods(kube, "node"):
        assert ceph.user_key not in kube.kubectl(
            "logs", f"--namespace={NAMESPACE}", node["metadata"]["name"], "-c", "cairn"
        )


def restarts(kube: Kube, name: str) -> int:
    found: dict[str, Any] = json.loads(kube.kubectl("get", "pod", f"--namespace={NAMESPACE}", name, "-o", "json"))
    return sum(int(c["restartCount"]) for c in found["status"]["containerStatuses"] if c["name"] == "cairn")


@pytest.mark.parametrize("component", ["controller", "node"])
def test_sigusr1_writes_the_plugins_thread_stacks_to_its_log(
    kube: Kube, release: dict[str, Any], component: str
) -> None:
    """The README's command: the driver is PID 1 of its container, and serves on."""
    (plugin,) = plugin_pods(kube, component)
    name = plugin["metadata"]["name"]
    before = restarts(kube, name)
    kube.kubectl("exec", f"--namespace={NAMESPACE}", name, "-c", "cairn", "--", "sh", "-c", "kill -USR1 1")
    deadline = time.monotonic() + 30
    while "most recent call first" not in (
        log := kube.kubectl("logs", f"--namespace={NAMESPACE}", name, "-c", "cairn")
    ):
        assert time.monotonic() < deadline, f"no thread stacks in the {component}'s log:\n{log[-2000:]}"
        time.sleep(0.5)
    assert "csi/cli.py" in log
    assert restarts(kube, name) == before, "the signal restarted the plugin"


@pytest.mark.parametrize(("component", "port"), [("controller", 9812), ("node", 9813)])
def test_metrics_are_scraped_through_the_pod(
    kube: Kube, release: dict[str, Any], called: None, component: str, port: int
) -> None:
    (plugin,) = plugin_pods(kube, component)
    name = plugin["metadata"]["name"]
    # From inside the pod: this cluster's pod IPs are loopback addresses, which the API
    # server's pod proxy refuses, so the scrape runs in the driver's container.
    scrape = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    text = kube.kubectl("exec", f"--namespace={NAMESPACE}", name, "-c", "cairn", "--", "python3", "-c", scrape)
    assert "csi_plugin_operations_seconds" in text, text[:2000]
    if component == "controller":
        assert "csi_plugin_operations_seconds_count{" in text and "CreateVolume" in text


def test_helm_upgrade_rolls_the_pods_and_keeps_the_volumes(kube: Kube, release: dict[str, Any]) -> None:
    """A changed value rolls the controller and the node plugin; a pod using a local
    volume keeps reading and writing through the roll, and a new pod finds the data."""
    token = uuid.uuid4().hex
    script = (
        f"echo {token} > /data/token && sync && while true; do cat /data/token > /dev/null || exit 1; sleep 1; done"
    )
    kube.apply(claim("kept", "cairn-local"), pod("busy", script, "kept", restart="Always"))
    kube.pod_ready("busy")
    bound(kube, "kept")
    before = {p["metadata"]["uid"] for p in plugin_pods(kube, "controller") + plugin_pods(kube, "node")}
    settings = {**release, "logLevel": "info"}
    path = kube.cluster.root / "values-upgrade.yaml"
    path.write_text(yaml.safe_dump(settings))
    kube.helm(
        "upgrade", RELEASE, str(CHART), f"--namespace={NAMESPACE}", f"--values={path}", "--wait", "--timeout=300s"
    )
    kube.wait_for(
        "every plugin pod replaced",
        lambda: (
            not before & {p["metadata"]["uid"] for p in plugin_pods(kube, "controller") + plugin_pods(kube, "node")}
        ),
    )
    kube.wait_for(
        "the node plugin registered again",
        lambda: "cairn.csi.io" in kube.kubectl("get", "csinode", NODE, "-o", "jsonpath={.spec.drivers[*].name}"),
    )
    status = kube.get("pod", "busy")["status"]
    assert all(c["restartCount"] == 0 for c in status["containerStatuses"]), "the pod lost its volume in the roll"
    assert kube.exec("busy", "cat", "/data/token").strip() == token
    kube.delete("pod", "busy")
    kube.apply(pod("after", "cat /data/token", "kept"))
    assert kube.pod_done("after").strip() == token
    kube.delete("pod", "after")
    kube.delete("pvc", "kept")
    gone(kube)
