"""What users do with Cairn through Kubernetes, against the chart installed in a real
cluster: claims bound immediately and on first use, data that outlives its pod,
snapshots, restores and clones, raw block volumes, shared raw block on rbd, generic
ephemeral volumes, published capacity, connection info on VolumeAttachments, an upgrade
that keeps volumes, and an uninstall that leaves nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ceph import POOL, CephCluster
from tests.cluster.build.images import BUSYBOX
from tests.cluster.conftest import NAMESPACE, Kube
from tests.nfs import NfsServer

pytestmark = pytest.mark.cluster
GiB = "1Gi"
CLASSES = {"local": "cairn-local", "rbd": "cairn-rbd"}


def claim(name: str, storage_class: str, *, block: bool = False, source: dict[str, Any] | None = None,
          modes: tuple[str, ...] = ("ReadWriteOnce",)) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "accessModes": list(modes),
        "storageClassName": storage_class,
        "resources": {"requests": {"storage": GiB}},
        "volumeMode": "Block" if block else "Filesystem",
    }
    if source is not None:
        spec["dataSource"] = source
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def pod(name: str, script: str, claim_name: str = "", *, block: bool = False, volume: dict[str, Any] | None = None,
        restart: str = "Never") -> dict[str, Any]:  # fmt: skip
    """A busybox pod running ``script`` with the claim at /data (or /dev/data for block)."""
    container: dict[str, Any] = {
        "name": "main",
        "image": BUSYBOX,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
    }
    if block:
        container["volumeDevices"] = [{"name": "data", "devicePath": "/dev/data"}]
    else:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    source = volume if volume is not None else {"persistentVolumeClaim": {"claimName": claim_name}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "data", **source}],
        },
    }


def snapshot(name: str, claim_name: str, snapshot_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name},
        "spec": {"volumeSnapshotClassName": snapshot_class, "source": {"persistentVolumeClaimName": claim_name}},
    }


def bound(kube: Kube, name: str) -> str:
    """Wait for claim ``name`` to be Bound; its PersistentVolume's name."""
    return str(
        kube.wait_for(
            f"claim {name} Bound",
            lambda: (
                kube.get("pvc", name)["status"].get("phase") == "Bound" and kube.get("pvc", name)["spec"]["volumeName"]
            ),
        )
    )


def gone(kube: Kube, kinds: str = "pv,volumeattachment,volumesnapshotcontent") -> None:
    kube.wait_for(f"no {kinds} left", lambda: kube.kubectl("get", kinds, "-o", "name").strip() == "")


@pytest.fixture(params=["local", "rbd"])
def backend(request: pytest.FixtureRequest, release: dict[str, Any]) -> Iterator[str]:
    yield str(request.param)


@pytest.fixture
def names(kube: Kube) -> Iterator[list[tuple[str, str]]]:
    """Objects a test made, as (kind, name), deleted in reverse order afterwards; then no
    PersistentVolume, VolumeAttachment or snapshot content may remain."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in reversed(made):
        kube.delete(kind, name)
    gone(kube)


def test_data_outlives_its_pod(kube: Kube, backend: str, names: list[tuple[str, str]]) -> None:
    """Immediate (rbd, and local's second class) and WaitForFirstConsumer (local) claims:
    bound, attached, staged and mounted; written by one pod, read back by the next."""
    storage_class = CLASSES[backend]
    token = uuid.uuid4().hex
    kube.apply(claim("data", storage_class))
    names.append(("pvc", "data"))
    binding = kube.get("storageclass", "", namespace="")
    mode = next(c["volumeBindingMode"] for c in binding["items"] if c["metadata"]["name"] == storage_class)
    if mode == "WaitForFirstConsumer":
        assert kube.get("pvc", "data")["status"]["phase"] == "Pending", "bound before any pod used it"
    kube.apply(pod("writer", f"echo {token} > /data/token && sync", "data"))
    names.append(("pod", "writer"))
    kube.pod_done("writer")
    bound(kube, "data")
    kube.delete("pod", "writer")
    kube.apply(pod("reader", "cat /data/token", "data"))
    names.append(("pod", "reader"))
    assert kube.pod_done("reader").strip() == token


def test_immediate_binding_on_the_local_backend(
    kube: Kube, release: dict[str, Any], names: list[tuple[str, str]]
) -> None:
    kube.apply(claim("now", "cairn-local-now"))
    names.append(("pvc", "now"))
    volume = kube.get("pv", bound(kube, "now"), namespace="")
    assert volume["spec"]["csi"]["driver"] == "cairn.csi.io"
    assert volume["spec"]["csi"]["fsType"] == "xfs"
    kube.apply(pod("xfs", "stat -f -c %T /data", "now"))
    names.append(("pod", "xfs"))
    assert kube.pod_done("xfs").strip() == "xfs"


def test_snapshot_restore_and_clone(kube: Kube, backend: str, names: list[tuple[str, str]]) -> None:
    storage_class, token = CLASSES[backend], uuid.uuid4().hex
    kube.apply(claim("origin", storage_class), pod("fill", f"echo {token} > /data/token && sync", "origin"))
    names += [("pvc", "origin"), ("pod", "fill")]
    kube.pod_done("fill")
    kube.delete("pod", "fill")  # a snapshot of an unused volume; a busy one is frozen (local) or crash-consistent
    kube.apply(snapshot("snap", "origin", storage_class))
    names.append(("volumesnapshot", "snap"))
    kube.wait_for("snapshot readyToUse", lambda: kube.get("volumesnapshot", "snap").get("status", {}).get("readyToUse"))
    restored = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    cloned = {"kind": "PersistentVolumeClaim", "name": "origin"}
    kube.apply(claim("restored", storage_class, source=restored), claim("cloned", storage_class, source=cloned))
    names += [("pvc", "restored"), ("pvc", "cloned")]
    for copy in ("restored", "cloned"):
        kube.apply(pod(f"read-{copy}", "cat /data/token", copy))
        names.append(("pod", f"read-{copy}"))
        assert kube.pod_done(f"read-{copy}").strip() == token, f"the {copy} claim lacks the data"


def test_raw_block_claim(kube: Kube, backend: str, names: list[tuple[str, str]]) -> None:
    token = uuid.uuid4().hex
    kube.apply(claim("raw", CLASSES[backend], block=True))
    names.append(("pvc", "raw"))
    kube.apply(pod("raw-write", f"echo {token} | dd of=/dev/data bs=512 count=1 conv=sync,fsync", "raw", block=True))
    names.append(("pod", "raw-write"))
    kube.pod_done("raw-write")
    kube.delete("pod", "raw-write")
    kube.apply(pod("raw-read", "dd if=/dev/data bs=512 count=1 2>/dev/null | head -c 32", "raw", block=True))
    names.append(("pod", "raw-read"))
    assert kube.pod_done("raw-read").strip() == token


def test_shared_raw_block_on_rbd(kube: Kube, release: dict[str, Any], names: list[tuple[str, str]]) -> None:
    """ReadWriteMany raw block: two pods at once, each seeing what the other wrote."""
    kube.apply(claim("shared", CLASSES["rbd"], block=True, modes=("ReadWriteMany",)))
    names.append(("pvc", "shared"))
    for side, offset in (("left", 0), ("right", 1)):
        other = "right" if side == "left" else "left"
        read = f"dd if=/dev/data bs=512 skip={1 - offset} count=1 iflag=direct 2>/dev/null"
        script = (
            f"echo {side} | dd of=/dev/data bs=512 seek={offset} count=1 conv=sync,fsync 2>/dev/null;"
            f" until {read} | grep -q {other}; do sleep 0.2; done; {read} | head -c {len(other)}"
        )
        kube.apply(pod(f"share-{side}", script, "shared", block=True))
        names.append(("pod", f"share-{side}"))
    assert kube.pod_done("share-left").strip() == "right"
    assert kube.pod_done("share-right").strip() == "left"


def test_generic_ephemeral_volume_lives_and_dies_with_its_pod(kube: Kube, release: dict[str, Any]) -> None:
    template = {
        "ephemeral": {
            "volumeClaimTemplate": {
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "cairn-local",
                    "resources": {"requests": {"storage": GiB}},
                }
            }
        }
    }
    kube.apply(pod("scratch", "echo scratch > /data/f && cat /data/f", volume=template))
    assert kube.pod_done("scratch").strip() == "scratch"
    assert kube.exists("pvc", "scratch-data"), "the pod's claim is named after the pod and the volume"
    kube.delete("pod", "scratch")
    kube.wait_for("the ephemeral claim deleted with its pod", lambda: not kube.exists("pvc", "scratch-data"))
    gone(kube)


def test_a_local_backend_on_its_nodes_through_node_volumes(
    kube: Kube, release: dict[str, Any], names: list[tuple[str, str]]
) -> None:
    """The local backend served by the node plugins (``nodes``): the claim waits for its
    pod, the controller has the node's agent make the volume through a NodeVolume, the
    pod writes, a snapshot and its restore (on the same node) read the data back, and
    capacity is published per node from the node's NodeStorage report."""
    token = uuid.uuid4().hex
    kube.apply(claim("spread", "cairn-spread"), pod("fill-spread", f"echo {token} > /data/token && sync", "spread"))
    names += [("pvc", "spread"), ("pod", "fill-spread")]
    kube.pod_done("fill-spread")
    handle = kube.get("pv", bound(kube, "spread"), namespace="")["spec"]["csi"]["volumeHandle"]
    assert handle.startswith("1:spread:localhost@vol-"), handle
    made = kube.get("nodevolumes", handle.rsplit("@", 1)[1], namespace="")
    assert made["spec"]["node"] == "localhost" and made["status"]["phase"] == "Ready", made
    kube.delete("pod", "fill-spread")
    kube.apply(snapshot("spread-snap", "spread", "cairn-spread"))
    names.append(("volumesnapshot", "spread-snap"))
    kube.wait_for(
        "snapshot readyToUse", lambda: kube.get("volumesnapshot", "spread-snap").get("status", {}).get("readyToUse")
    )
    restored = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "spread-snap"}
    kube.apply(
        claim("spread-restored", "cairn-spread", source=restored),
        pod("read-spread", "cat /data/token", "spread-restored"),
    )
    names += [("pvc", "spread-restored"), ("pod", "read-spread")]
    assert kube.pod_done("read-spread").strip() == token

    def published() -> list[dict[str, Any]]:
        items = kube.get("csistoragecapacity", namespace=NAMESPACE)["items"]
        return [c for c in items if c["storageClassName"] == "cairn-spread" and int(_bytes(c.get("capacity", "0"))) > 0]

    terms = kube.wait_for("CSIStorageCapacity for cairn-spread", published)[0]["nodeTopology"]["matchLabels"]
    assert any(value == "localhost" for value in terms.values()), f"not tied to the node: {terms}"


def test_capacity_is_published_for_the_node_local_backend(kube: Kube, release: dict[str, Any]) -> None:
    def published() -> list[dict[str, Any]]:
        items = kube.get("csistoragecapacity", namespace=NAMESPACE)["items"]
        return [c for c in items if c["storageClassName"] == "cairn-local" and int(_bytes(c.get("capacity", "0"))) > 0]

    capacities = kube.wait_for("CSIStorageCapacity for cairn-local", published)
    terms = capacities[0]["nodeTopology"]["matchLabels"]
    assert any(value == "localhost" for value in terms.values()), f"not tied to the node: {terms}"


def test_attachments_carry_rbd_connection_info(
    kube: Kube, release: dict[str, Any], ceph: CephCluster, names: list[tuple[str, str]]
) -> None:
    kube.apply(claim("attached", CLASSES["rbd"]), pod("holder", "sleep 3600", "attached", restart="Always"))
    names += [("pvc", "attached"), ("pod", "holder")]
    kube.pod_ready("holder")
    volume = bound(kube, "attached")
    attachment = next(
        a
        for a in kube.get("volumeattachment", namespace="")["items"]
        if a["spec"]["source"].get("persistentVolumeName") == volume
    )
    assert attachment["status"]["attached"] is True
    info = attachment["status"].get("attachmentMetadata", {})
    assert info, "ControllerPublishVolume returned no connection info"
    text = json.dumps(info)
    assert POOL in text and any(m in text for m in ceph.monitors), f"connection info lacks the pool or monitors: {info}"
    assert ceph.user_key not in text, "a key reached the VolumeAttachment"


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_nfs_claims_snapshots_and_deletion(
    kube: Kube, release: dict[str, Any], nfs_server: NfsServer, names: list[tuple[str, str]]
) -> None:
    """The nfs backend through Kubernetes, as far as this host's kernel allows (it has no
    NFS client, so no pod mounts these claims here; the vm tier mounts them): a
    ReadWriteMany claim lands in the folder its namespace and name make (the provisioner
    passes them with --extra-create-metadata), a VolumeSnapshot copies it, a claim restored
    from the snapshot holds the data, and deleting the claims removes the folders."""
    kube.apply(claim("shared", "cairn-nfs", modes=("ReadWriteMany",)))
    names.append(("pvc", "shared"))
    volume = kube.get("pv", bound(kube, "shared"), namespace="")
    assert volume["spec"]["csi"]["volumeAttributes"]["subDir"] == "default/shared"
    assert "fsType" not in volume["spec"]["csi"], "a share has no filesystem to choose"
    folder = nfs_server.export_dir / "default" / "shared"
    token = uuid.uuid4().hex
    (folder / "token").write_text(token)  # as a pod on a node with an NFS client would
    kube.apply(snapshot("nfs-snap", "shared", "cairn-nfs"))
    names.append(("volumesnapshot", "nfs-snap"))
    kube.wait_for(
        "snapshot readyToUse", lambda: kube.get("volumesnapshot", "nfs-snap").get("status", {}).get("readyToUse")
    )
    source = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nfs-snap"}
    kube.apply(claim("restored", "cairn-nfs", modes=("ReadWriteMany",), source=source))
    names.append(("pvc", "restored"))
    bound(kube, "restored")
    assert (nfs_server.export_dir / "default" / "restored" / "token").read_text() == token
    for name in ("restored", "shared"):
        kube.delete("pvc", name)
    kube.delete("volumesnapshot", "nfs-snap")
    gone(kube)
    assert not folder.exists() and not (nfs_server.export_dir / "default" / "restored").exists()
