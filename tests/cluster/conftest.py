"""Fixtures of the cluster tier: the Kubernetes binaries and images (built once, cached
outside the clone), a running single-node cluster, and the chart installed into it with
the local and rbd backends."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi import loopdev
from tests.ceph import POOL, USER, CephCluster
from tests.cluster.build import images
from tests.cluster.kube import NODE, Cluster, ClusterError, build_step
from tests.nfs import EXPORT as NFS_EXPORT
from tests.nfs import NfsServer
from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cairn-csi"
BUILD = Path(__file__).with_name("build")
NAMESPACE = "kube-system"
RELEASE = "cairn"
SECRET = "ceph-cairn"


def helm_binary() -> str:
    return shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")


run = build_step


# The cluster and the release live as long as the tier's tests (package scope): the
# suites after it run on a host without them.
@pytest.fixture(scope="package")
def kube(tmp_path_factory: pytest.TempPathFactory, cluster_binaries: Path) -> Iterator[Kube]:
    built = images.build_all(cluster_binaries)
    cluster = Cluster(Path(tmp_path_factory.mktemp("k8s")), cluster_binaries, images.PAUSE)
    try:
        cluster.start(built)
        yield Kube(cluster)
    finally:
        cluster.stop()


class Kube:
    """kubectl and helm against one cluster, with waits that say what they waited for."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.cluster.kubectl(*args, check=check, timeout=timeout)

    def get(self, kind: str, name: str = "", namespace: str = "default") -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args.append(f"--namespace={namespace}")
        return json.loads(self.kubectl(*args))

    def exists(self, kind: str, name: str, namespace: str = "default") -> bool:
        args = ["get", kind, name, "-o", "name", "--ignore-not-found"]
        if namespace:
            args.append(f"--namespace={namespace}")
        return bool(self.kubectl(*args).strip())

    def apply(self, *objects: dict[str, Any]) -> None:
        self.cluster.feed("apply", *objects)

    def delete(self, kind: str, *names: str, namespace: str = "default", wait: bool = True) -> None:
        self.kubectl(
            "delete", kind, *names, f"--namespace={namespace}", "--ignore-not-found", f"--wait={str(wait).lower()}",
            timeout=300,
        )  # fmt: skip

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float = 180) -> Any:
        """Poll ``ready`` until it returns something true; fail naming ``what`` and
        showing the objects and the plugins' logs."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = ready()
            except ClusterError:
                answer = None
            if answer:
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached after {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(0.5)

    def pod_ready(self, name: str, timeout: float = 180) -> None:
        def ready() -> bool:
            pod = self.get("pod", name)
            if pod["status"].get("phase") == "Failed":
                raise AssertionError(f"pod {name} failed:\n{self.diagnostics()}")
            return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

        self.wait_for(f"pod {name} Ready", ready, timeout)

    def pod_done(self, name: str, timeout: float = 180) -> str:
        """Wait for a pod that runs to completion; its log."""
        phase = self.wait_for(
            f"pod {name} completed",
            lambda: (
                self.get("pod", name)["status"].get("phase") in ("Succeeded", "Failed")
                and self.get("pod", name)["status"]["phase"]
            ),
            timeout,
        )
        log = self.kubectl("logs", name)
        assert phase == "Succeeded", f"pod {name} failed: {log}\n{self.diagnostics()}"
        return log

    def exec(self, pod: str, *command: str) -> str:
        return self.kubectl("exec", pod, "--", *command)

    def diagnostics(self) -> str:
        """What an operator would look at: the claims, pods, attachments and snapshots,
        their events, and the tails of the plugins' logs."""
        parts = []
        for args in (
            ["get", "pvc,pv,pod,volumeattachment,volumesnapshot,volumesnapshotcontent", "-A", "-o", "wide"],
            ["describe", "pvc,pod,volumesnapshot", "--namespace=default"],
            ["get", "events", "-A", "--sort-by=.lastTimestamp"],
            ["logs", f"--namespace={NAMESPACE}", "-l", "app.kubernetes.io/name=cairn-csi", "--all-containers", "--tail=40", "--prefix"],
        ):  # fmt: skip
            parts.append(f"$ kubectl {' '.join(args)}\n{self.kubectl(*args, check=False)[-6000:]}")
        return "\n".join(parts)

    def keep_plugin_logs(self) -> None:
        """The plugins' logs, kept in the cluster's log directory before the pods go."""
        pods = self.kubectl(
            "get", "pod", f"--namespace={NAMESPACE}", "-l", "app.kubernetes.io/name=cairn-csi", "-o", "name"
        )
        for pod in pods.split():
            text = self.kubectl("logs", f"--namespace={NAMESPACE}", pod, "--all-containers", "--prefix", check=False)
            self.cluster.log(pod.replace("/", "-")).write_text(text)

    def helm(self, *args: str, timeout: float = 300) -> str:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "HELM_CACHE_HOME": str(self.cluster.root / "helm"),
        }
        env["HELM_CONFIG_HOME"] = env["HELM_DATA_HOME"] = env["HELM_CACHE_HOME"]
        return run([helm_binary(), *args], timeout=timeout, env=env)


def values(cluster: Cluster, ceph: CephCluster | None, nfs: NfsServer | None = None) -> dict[str, Any]:
    """The chart's values for the test cluster: every backend the tier tests, and the
    sidecars this cluster has (see the README: the registrar is the driver's own, the
    kubelet probes liveness natively, and there is no resizer image)."""
    data = cluster.root / "cairn"
    backends: list[dict[str, Any]] = [
        {"name": "local", "kind": "local", "path": f"{data}/local", "node": NODE},
        # Served on its nodes (one here) through NodeVolume objects: the node plugin's
        # token and role, the agent, and the controller's routing in a real cluster.
        {"name": "spread", "kind": "local", "path": f"{data}/spread", "nodes": [NODE]},
    ]
    classes: list[dict[str, Any]] = [
        {"name": "cairn-local", "backend": "local", "volumeBindingMode": "WaitForFirstConsumer", "fsType": "ext4"},
        {"name": "cairn-local-now", "backend": "local", "volumeBindingMode": "Immediate", "fsType": "xfs"},
        {"name": "cairn-spread", "backend": "spread", "volumeBindingMode": "WaitForFirstConsumer", "fsType": "ext4"},
    ]
    snapshot_classes: list[dict[str, Any]] = [{"name": "cairn-local", "isDefault": True}, {"name": "cairn-spread"}]
    if ceph is not None:
        backends.append(
            {
                "name": "ceph",
                "kind": "rbd",
                "monitors": ceph.monitors,
                "pool": POOL,
                "mapper": "rbd-fuse",
                "controllerSecret": SECRET,
            }
        )
        secret = {"secretName": SECRET, "secretNamespace": NAMESPACE}
        classes.append({"name": "cairn-rbd", "backend": "ceph", "volumeBindingMode": "Immediate", **secret})
        snapshot_classes.append({"name": "cairn-rbd", **secret})
    if nfs is not None:
        backends.append(
            {
                "name": "nfs",
                "kind": "nfs",
                "server": "127.0.0.1",
                "share": NFS_EXPORT,
                "port": nfs.port,
                "subDir": "${pvc.metadata.namespace}/${pvc.metadata.name}",
            }
        )
        classes.append({"name": "cairn-nfs", "backend": "nfs", "volumeBindingMode": "Immediate"})
        snapshot_classes.append({"name": "cairn-nfs"})
    return {
        "image": {"pullPolicy": "Never"},
        "logLevel": "debug",
        "backends": backends,
        "node": {"kubeletDir": str(cluster.kubelet_dir), "stateDir": f"{data}/node-state", "registrar": "builtin"},
        "sidecars": {"livenessProbe": {"enabled": False}, "resizer": {"enabled": False}},
        "snapshotController": {"enabled": True},
        "metrics": {"enabled": True},
        "storageClasses": classes,
        "volumeSnapshotClasses": snapshot_classes,
    }


@pytest.fixture(scope="package")
def release(kube: Kube, ceph: CephCluster, nfs_server: NfsServer) -> Iterator[dict[str, Any]]:
    """The chart installed with `helm install`, the way an operator installs it; removed
    with `helm uninstall` at the end, after which no object of the release is left."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "stringData": {"userID": USER, "userKey": ceph.user_key},
        }
    )
    devices_before = set(loopdev.attached())
    settings = values(kube.cluster, ceph, nfs_server)
    path = kube.cluster.root / "values.yaml"
    path.write_text(yaml.safe_dump(settings))
    started = time.monotonic()
    kube.helm(
        "install", RELEASE, str(CHART), f"--namespace={NAMESPACE}", f"--values={path}", "--wait", "--timeout=300s"
    )
    kube.cluster.timings["helm install"] = time.monotonic() - started
    kube.wait_for(
        "the node plugin registered with the kubelet",
        lambda: "cairn.csi.io" in kube.kubectl("get", "csinode", NODE, "-o", "jsonpath={.spec.drivers[*].name}"),
    )
    try:
        yield settings
    finally:
        kube.keep_plugin_logs()
        kube.helm("uninstall", RELEASE, f"--namespace={NAMESPACE}", "--wait", "--timeout=300s")
        kube.delete("secret", SECRET, namespace=NAMESPACE)
    # An error here fails the run: an uninstall after the claims are gone must leave no
    # object of the release, no volume, and no registration with the kubelet (pods take
    # their grace period to go).
    deadline = time.monotonic() + 120
    while (left := nothing_left(kube, ceph, nfs_server, devices_before)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == {}, "left behind by helm uninstall"


def nothing_left(kube: Kube, ceph: CephCluster, nfs: NfsServer, devices_before: set[str]) -> dict[str, str]:
    selector = f"app.kubernetes.io/instance={RELEASE}"
    found = {
        "namespaced": kube.kubectl(
            "get", "all,configmap,secret,serviceaccount,role,rolebinding,lease", f"--namespace={NAMESPACE}",
            "-l", selector, "-o", "name",
        ),
        "cluster": kube.kubectl(
            "get", "csidriver,storageclass,volumesnapshotclass,clusterrole,clusterrolebinding", "-l", selector,
            "-o", "name",
        ),
        "volumes": kube.kubectl("get", "pv,volumeattachment,volumesnapshotcontent", "-o", "name"),
        "images": ceph.rbd("ls", POOL),
        "files": "\n".join(
            str(path)
            for backend in ("local", "spread")
            for path in (kube.cluster.root / "cairn" / backend).rglob("*")
            if path.is_file()
        ),
        "node volumes": kube.kubectl("get", "nodevolumes", "-o", "name"),
        # Records and images are files; a volume's folder is <namespace>/<claim> (the
        # namespace folders the template made stay, as on any export).
        "export": "\n".join(
            [str(p) for p in nfs.export_dir.rglob("*") if p.is_file()]
            + [str(p) for p in nfs.export_dir.glob("*/*") if p.is_dir() and p.parent.name != ".cairn"]
        ),
    }  # fmt: skip
    found["loop devices"] = "\n".join(
        f"{device} -> {back}" for device, back in loopdev.attached().items() if device not in devices_before
    )
    found["registration"] = kube.kubectl("get", "csinode", NODE, "-o", "jsonpath={.spec.drivers[*].name}")
    return {what: text.strip() for what, text in found.items() if text.strip()}


@pytest.fixture
def require_cluster_tools() -> None:
    require(shutil.which("buildah") is not None, "buildah is not installed (scripts/setup.sh test installs it)")
