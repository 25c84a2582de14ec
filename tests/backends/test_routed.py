"""Node-local volumes on many nodes, routed through the Kubernetes API: a real etcd and
kube-apiserver started here, the chart's CustomResourceDefinitions, and two "nodes" that
each hold their own LVM volume group (loop devices; LVM metadata only where the kernel
has no device-mapper), each with its own node agent, and the controller's half beside
them. Every object goes through the API server, every volume is an LV."""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml

from csi import ids
from csi.backends.base import Backend
from csi.backends.local import CAPABILITIES as LOCAL_CAPABILITIES
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.layout import Layout
from csi.backends.lvm.volumes import LvmVolumes, rest_of
from csi.backends.routed import (
    FINALIZER,
    PENDING,
    STORAGES,
    VOLUMES,
    NodeAgent,
    NodeKeyed,
    Objects,
    RoutedVolumes,
    code_of,
    spec_of,
    storage_name,
)
from csi.backup.directory import DirectoryStore
from csi.backup.engine import SNAPSHOT_PREFIX, Backups, NodeBackups
from csi.backup.repository import Repository
from csi.errors import Aborted, AlreadyExists, CairnError, DataLoss, FailedPrecondition, NotFound, ResourceExhausted
from csi.generated import csi_pb2 as pb
from csi.model import (
    TOPOLOGY_NODE_KEY,
    AccessMode,
    AccessType,
    Capability,
    MiB,
    Snapshot,
    SourceRef,
    Volume,
    VolumeSpec,
)
from csi.registry import Registry
from tests.cluster.kube import Cluster
from tests.conftest import running_driver
from tests.lvm import LoopVolumeGroup, loop_volume_group
from tests.support import forget_routed_objects, mount_capability, require_root, require_tools

pytestmark = pytest.mark.integration
BACKEND = "lvm"
REST = functools.partial(rest_of, BACKEND)
RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
T = TypeVar("T")


@pytest.fixture
def api(api_server: Cluster) -> Cluster:
    require_root()
    require_tools("lvm")
    return api_server


def connect(cluster: Cluster) -> Objects:
    return Objects.connect(cluster.client_configuration())


@dataclass
class Node:
    name: str
    group: LoopVolumeGroup
    objects: Objects
    agent: NodeAgent | None = None

    def executor(self) -> LvmVolumes:
        return LvmVolumes(BACKEND, self.group.lvm(), self.group.name, "", self.name)

    def start(self, resync: float = 2.0) -> None:
        self.agent = NodeAgent(BACKEND, self.name, self.objects, self.executor(), REST, resync=resync)
        self.agent.start()

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def lvs(self) -> list[str]:
        """The names of the LVs in this node's volume group, read with LVM itself."""
        return sorted(row["lv_name"] for row in self.group.report("lvs", "lv_name"))

    def free(self) -> int:
        return int(self.group.report("vgs", "vg_free")[0]["vg_free"])


@dataclass
class Nodes:
    a: Node
    b: Node
    objects: Objects
    cluster: Cluster

    def controller(self, **options: Any) -> RoutedVolumes:
        """A fresh controller half, as a restarted controller would make."""
        return RoutedVolumes(BACKEND, self.objects, REST, **options)

    def object(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(VOLUMES, name)


@pytest.fixture
def nodes(api: Cluster, tmp_path: Path) -> Iterator[Nodes]:
    """node-a with a 64 MiB volume group, node-b with a 128 MiB one, both agents running;
    afterwards every object is removed (finalizers too) before the groups go."""
    objects = connect(api)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        loop_volume_group(tmp_path / "a", 64 * MiB) as group_a,
        loop_volume_group(tmp_path / "b", 128 * MiB) as group_b,
    ):
        a, b = Node("node-a", group_a, objects), Node("node-b", group_b, objects)
        a.start()
        b.start()
        try:
            yield Nodes(a, b, objects, api)
        finally:
            a.stop()
            b.stop()
            forget_routed_objects(objects, "")
            api.kubectl("delete", "node", "--all", "--wait=false", check=False)


def eventually(
    what: str, probe: Callable[[], T | None], timeout: float = 60, explain: Callable[[], str] | None = None
) -> T:
    """``probe``'s first answer that is not None or False, read until ``timeout``; on a
    timeout the message carries what ``explain`` says of the state then."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f"; {explain()}" if explain else ""))
        time.sleep(0.1)


def agent_state(node: Node, name: str) -> str:
    """What a node's agent and its LVM say, for a check that waited in vain."""
    agent = node.agent
    said = "no agent"
    if agent is not None:
        said = f"agent passes={agent.passes} serving={agent.serving()} last problem={agent.last_problem!r}"
    return f"{said}; LVs on {node.name}: {node.lvs()}; object: {node.objects.get(VOLUMES, name)}"


def spec(name: str, size: int = 8 * MiB, preferred: str = "", **extra: Any) -> VolumeSpec:
    where = ({TOPOLOGY_NODE_KEY: preferred},) if preferred else ()
    return VolumeSpec(name, size, 0, (RWO,), preferred=where, **extra)


def reported(nodes: Nodes) -> RoutedVolumes:
    """A controller that has seen both nodes' reports."""
    controller = nodes.controller()
    eventually("both nodes report", lambda: len(controller.reports()) == 2)
    return controller


def test_a_volume_is_made_once_on_the_preferred_node_and_capacity_is_per_node(nodes: Nodes) -> None:
    controller = reported(nodes)
    assert controller.free_bytes({TOPOLOGY_NODE_KEY: "node-a"}) == nodes.a.free()
    assert controller.free_bytes({TOPOLOGY_NODE_KEY: "node-b"}) == nodes.b.free()
    assert controller.free_bytes({TOPOLOGY_NODE_KEY: "node-c"}) == 0, "a node without the backend has no room"
    assert nodes.a.free() != nodes.b.free(), "the two groups differ, so the answers cannot be one figure"

    volume = controller.create_volume(spec("first", preferred="node-a"))
    assert volume.topology == ({TOPOLOGY_NODE_KEY: "node-a"},)
    assert volume.local_id.startswith("node-a@")
    lv = f"cairn-{REST('volume', 'first')}"
    assert nodes.a.lvs() == [lv] and nodes.b.lvs() == []

    again = nodes.controller().create_volume(spec("first", preferred="node-b"))
    assert again == volume, "a retry finds the volume where it is, whatever it prefers now"
    assert nodes.a.lvs() == [lv] and nodes.b.lvs() == []
    assert controller.get_volume(volume.local_id) == volume
    assert controller.lookup_volume("first") == volume
    assert [v.local_id for v in controller.list_volumes()] == [volume.local_id]

    # The node's report follows what was made.
    eventually(
        "node-a reports the space the volume took",
        lambda: nodes.controller().free_bytes({TOPOLOGY_NODE_KEY: "node-a"}) == nodes.a.free(),
    )
    assert nodes.a.free() == 64 * MiB - 4 * MiB - 8 * MiB  # one extent of metadata, the volume

    other = controller.create_volume(spec("second", 16 * MiB))
    assert other.topology == ({TOPOLOGY_NODE_KEY: "node-b"},), "without a preference: the node with most room"
    assert nodes.b.lvs() == [f"cairn-{REST('volume', 'second')}"]


def test_a_node_without_room_passes_the_create_to_the_next_node(nodes: Nodes) -> None:
    controller = reported(nodes)
    nodes.a.stop()
    nodes.a.start(resync=3600)  # its report stays as it is now: room it no longer has
    # Something else takes node-a's space behind the report's back.
    filler = nodes.a.group.lvm()
    filler.create(nodes.a.group.name, "other-tenant", nodes.a.free(), [], activate=False)
    assert nodes.a.free() == 0
    assert controller.free_bytes({TOPOLOGY_NODE_KEY: "node-a"}) > 0, "the report is behind"

    volume = controller.create_volume(spec("moved", 8 * MiB, preferred="node-a"))
    assert volume.topology == ({TOPOLOGY_NODE_KEY: "node-b"},), "node-a refused for want of room; node-b took it"
    assert nodes.a.lvs() == ["other-tenant"], "nothing of the refused create stays on node-a"
    assert nodes.b.lvs() == [f"cairn-{REST('volume', 'moved')}"]
    found = nodes.object(REST("volume", "moved"))
    assert found is not None and found["spec"]["tried"] == ["node-a"]


def test_publish_expand_and_delete_go_to_the_owning_node(nodes: Nodes) -> None:
    controller = reported(nodes)
    volume = controller.create_volume(spec("used", preferred="node-b"))
    lv = f"cairn-{REST('volume', 'used')}"
    with pytest.raises(NotFound, match="local to node 'node-b'"):
        controller.publish_volume(volume.local_id, "node-a", RWO, False)
    assert controller.publish_volume(volume.local_id, "node-b", RWO, False) == {}
    assert nodes.controller().publish_volume(volume.local_id, "node-b", RWO, False) == {}
    assert controller.get_volume(volume.local_id).published_nodes == ("node-b",)
    with pytest.raises(FailedPrecondition, match="still published to node\\(s\\) node-b"):
        controller.delete_volume(volume.local_id)

    assert controller.expand_volume(volume.local_id, 20 * MiB, 0) == 20 * MiB
    sizes = {row["lv_name"]: int(row["lv_size"]) for row in nodes.b.group.report("lvs", "lv_name,lv_size")}
    assert sizes == {lv: 20 * MiB}
    assert controller.get_volume(volume.local_id).capacity_bytes == 20 * MiB

    controller.unpublish_volume(volume.local_id, "node-b")
    controller.unpublish_volume(volume.local_id, "node-b")
    controller.delete_volume(volume.local_id)
    assert nodes.b.lvs() == []
    assert nodes.object(REST("volume", "used")) is None
    controller.delete_volume(volume.local_id)  # gone is fine
    with pytest.raises(NotFound):
        controller.get_volume(volume.local_id)


def test_a_volume_whose_lv_vanished_is_abnormal_and_still_deletes(nodes: Nodes) -> None:
    controller = reported(nodes)
    volume = controller.create_volume(spec("vanishing", preferred="node-a"))
    assert not controller.get_volume(volume.local_id).condition.abnormal
    removed = nodes.a.group.run("lvremove", "--yes", f"{nodes.a.group.name}/cairn-{REST('volume', 'vanishing')}")
    assert removed.returncode == 0, removed.stderr
    condition = eventually(
        "the agent notices",
        lambda: (
            controller.get_volume(volume.local_id).condition
            if controller.get_volume(volume.local_id).condition.abnormal
            else None
        ),
        explain=lambda: agent_state(nodes.a, REST("volume", "vanishing")),
    )
    assert condition.message == "its data is missing on node 'node-a'"
    assert [v.condition.abnormal for v in controller.list_volumes()] == [True]
    controller.delete_volume(volume.local_id)
    assert nodes.object(REST("volume", "vanishing")) is None


def test_an_older_version_of_an_object_makes_nothing_again(nodes: Nodes) -> None:
    """A watch may bring an object's older version (still Pending) after the newer one
    was handled, when events lag under load: a volume made and then gone (deleted, or
    removed by hand) must not be made again from it. The agent reads the object again
    before it makes anything."""
    controller = reported(nodes)
    volume = controller.create_volume(spec("lagging", preferred="node-a"))
    name = REST("volume", "lagging")
    current = nodes.object(name)
    assert current is not None and FINALIZER in current["metadata"]["finalizers"]
    stale = {**current, "status": {"phase": PENDING}}  # as the event of the finalizer's write
    removed = nodes.a.group.run("lvremove", "--yes", f"{nodes.a.group.name}/cairn-{name}")
    assert removed.returncode == 0, removed.stderr
    assert nodes.a.agent is not None
    nodes.a.agent.handle(stale)
    assert f"cairn-{name}" not in nodes.a.lvs(), "the LV was made again from an older version"
    controller.delete_volume(volume.local_id)
    assert nodes.a.lvs() == [] and nodes.object(name) is None


def test_an_object_whose_step_keeps_failing_holds_up_no_other(nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that fails on every pass (here a bug in one volume's growth) is logged and
    retried; the node's other objects, its presence checks and its report go on."""
    controller = reported(nodes)
    stuck = controller.create_volume(spec("stuck", preferred="node-a"))
    vanishing = controller.create_volume(spec("vanishing", preferred="node-a"))
    assert nodes.a.agent is not None

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("a bug in one object's step")

    monkeypatch.setattr(nodes.a.agent.executor, "expand_volume", broken)
    with pytest.raises(Aborted):
        nodes.controller(wait=1.0).expand_volume(stuck.local_id, 2 * stuck.capacity_bytes, 0)
    removed = nodes.a.group.run("lvremove", "--yes", f"{nodes.a.group.name}/cairn-{REST('volume', 'vanishing')}")
    assert removed.returncode == 0, removed.stderr
    eventually(
        "the agent notices",
        lambda: controller.get_volume(vanishing.local_id).condition.abnormal,
        explain=lambda: agent_state(nodes.a, REST("volume", "vanishing")),
    )
    before = controller.reports()["node-a"]["heartbeat"]
    eventually("node-a keeps reporting", lambda: controller.reports()["node-a"]["heartbeat"] != before)
    for volume in (stuck, vanishing):
        controller.delete_volume(volume.local_id)


def test_a_create_cut_short_on_either_side_leaves_exactly_one_lv(nodes: Nodes) -> None:
    reported(nodes)
    nodes.b.stop()  # the node plugin is down; its report is still fresh
    impatient = nodes.controller(wait=1.0)  # the CO's deadline, short: the node is away
    with pytest.raises(Aborted, match="node 'node-b' has not finished"):
        impatient.create_volume(spec("cut", preferred="node-b"))
    intent = nodes.object(REST("volume", "cut"))
    assert intent is not None and intent["status"]["phase"] == PENDING
    assert nodes.b.lvs() == []

    # The node plugin made the LV, then died before it wrote the outcome.
    made = nodes.b.executor().create_volume(spec_of(intent))
    with pytest.raises(Aborted):
        nodes.controller(wait=1.0).create_volume(spec("cut", preferred="node-b"))  # a restarted controller retries

    nodes.b.start()
    volume = nodes.controller().create_volume(spec("cut", preferred="node-b"))
    assert volume.local_id == made.local_id
    assert nodes.b.lvs() == [f"cairn-{REST('volume', 'cut')}"], "one LV, the one made before the crash"
    assert nodes.a.lvs() == []
    done = nodes.object(REST("volume", "cut"))
    assert done is not None and FINALIZER in done["metadata"]["finalizers"]


def test_a_lost_node_releases_its_volumes_only_once_it_is_gone(nodes: Nodes) -> None:
    controller = reported(nodes)
    volume = controller.create_volume(spec("stranded", preferred="node-b"))
    nodes.b.stop()
    nodes.cluster.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}})
    later = nodes.controller(clock=lambda: time.time() + 3600, wait=1.0)  # every report is stale by then

    with pytest.raises(Aborted, match="node 'node-b' has not finished"):
        later.delete_volume(volume.local_id)  # the Node is there: it may come back
    held = nodes.object(REST("volume", "stranded"))
    assert held is not None and held["metadata"].get("deletionTimestamp")

    nodes.cluster.kubectl("delete", "node", "node-b")
    later.delete_volume(volume.local_id)
    assert nodes.object(REST("volume", "stranded")) is None, "released: the claim and its PV can go"
    with pytest.raises(NotFound):
        later.get_volume(volume.local_id)

    # The node comes back after all, with the LV: an orphan, reported and kept.
    nodes.b.start()
    storage = storage_name(BACKEND, "node-b")
    eventually(
        "node-b reports the orphan",
        lambda: (nodes.objects.get(STORAGES, storage) or {}).get("spec", {}).get("orphans") == [volume.local_id],
    )
    assert nodes.b.lvs() == [f"cairn-{REST('volume', 'stranded')}"], "never deleted by the driver"


# -- snapshots and restores, over the local backend's files ------------------------------
# Thin snapshots need device-mapper, which this host's kernel lacks (the vm tier tests
# them on one node). The routing of snapshots is the same for every backend: here the
# nodes keep real volumes and snapshots as the local backend's files.


def test_snapshots_and_restores_stay_on_the_node_of_their_source(api: Cluster, tmp_path: Path) -> None:
    objects = connect(api)

    def rest(kind: str, name: str) -> str:
        return Layout.local_id("volume" if kind == "volume" else "snapshot", name)

    agents = {
        node: NodeAgent(
            "files", node, objects, NodeKeyed(LocalVolumes(str(tmp_path / node), node), "files", node), rest, resync=2.0
        )
        for node in ("node-a", "node-b")
    }
    for agent in agents.values():
        agent.start()
    try:
        controller = RoutedVolumes("files", objects, rest)
        eventually("both nodes report", lambda: len(controller.reports()) == 2)
        volume = controller.create_volume(spec("origin", 4 * MiB, preferred="node-b"))
        image = tmp_path / "node-b" / "volumes" / f"{ids.split_node(volume.local_id)[1]}.img"
        assert image.exists() and list((tmp_path / "node-a" / "volumes").glob("*.img")) == []
        with open(image, "r+b") as handle:
            handle.write(b"written before the snapshot")

        snapshot = controller.create_snapshot("snap", volume.local_id, {})
        assert snapshot.local_id.startswith("node-b@") and snapshot.source_volume_local_id == volume.local_id
        assert controller.create_snapshot("snap", volume.local_id, {}) == snapshot, "a retry finds it"
        assert [s.local_id for s in controller.list_snapshots()] == [snapshot.local_id]
        with pytest.raises(AlreadyExists):
            controller.create_snapshot("snap", "node-b@vol-00000000-0000-0000-0000-000000000000", {})

        # Preferring node-a changes nothing: a restore is made where its snapshot is.
        restored = controller.create_volume(
            spec("restored", 4 * MiB, preferred="node-a", source=SourceRef("snapshot", snapshot.local_id))
        )
        assert restored.topology == ({TOPOLOGY_NODE_KEY: "node-b"},)
        restored_image = tmp_path / "node-b" / "volumes" / f"{ids.split_node(restored.local_id)[1]}.img"
        assert restored_image.read_bytes().startswith(b"written before the snapshot")
        with pytest.raises(ResourceExhausted, match="outside the requested topology"):
            controller.create_volume(
                VolumeSpec(
                    "elsewhere", 4 * MiB, 0, (RWO,),
                    requisite=({TOPOLOGY_NODE_KEY: "node-a"},),
                    source=SourceRef("snapshot", snapshot.local_id),
                )
            )  # fmt: skip
        assert list((tmp_path / "node-a" / "volumes").glob("*.img")) == []

        controller.delete_snapshot(snapshot.local_id)
        controller.delete_snapshot(snapshot.local_id)
        assert controller.list_snapshots() == []
        assert list((tmp_path / "node-b" / "snapshots").glob("*")) == []
        for made in (restored, volume):
            controller.delete_volume(made.local_id)
        assert list((tmp_path / "node-b" / "volumes").glob("*.img")) == []
        assert objects.list(VOLUMES, "cairn.csi.io/backend=files")[0] == []
    finally:
        for agent in agents.values():
            agent.stop()
        forget_routed_objects(objects, "cairn.csi.io/backend=files")


def test_a_local_backend_served_on_two_nodes_by_two_drivers(api: Cluster, tmp_path: Path) -> None:
    """The whole path through two driver processes: one serving the controller and
    node-a, one serving node-b alone, both with the same local backend listing both
    nodes. A volume made for node-b is a file on node-b, staged and mounted only there."""
    require_tools("losetup", "mkfs.ext4")
    objects = connect(api)
    base = ["--node-routing", "kubernetes", "--kubeconfig", str(api.kubeconfig)]

    def config(node: str) -> str:
        path = tmp_path / f"config-{node}.yaml"
        backend = {
            "name": "spread",
            "kind": "local",
            "path": str(tmp_path / node / "files"),
            "nodes": ["node-a", "node-b"],
        }
        path.write_text(yaml.safe_dump({"backends": [backend]}))
        return str(path)

    cap = mount_capability()
    try:
        with (
            running_driver(tmp_path / "a", [*base, "--config", config("node-a"), "--node-id", "node-a"]) as a,
            running_driver(
                tmp_path / "b", [*base, "--config", config("node-b"), "--node-id", "node-b", "--mode", "node"]
            ) as b,
        ):

            def room(node: str) -> int:
                where = pb.Topology(segments={TOPOLOGY_NODE_KEY: node})
                answer = a.controller.GetCapacity(pb.GetCapacityRequest(accessible_topology=where))
                return int(answer.available_capacity)

            eventually("both nodes report", lambda: room("node-a") > 0 and room("node-b") > 0)
            on_b = {"segments": {TOPOLOGY_NODE_KEY: "node-b"}}
            volume = a.controller.CreateVolume(
                pb.CreateVolumeRequest(
                    name="spread-1",
                    volume_capabilities=[cap],
                    capacity_range={"required_bytes": 16 * MiB},
                    accessibility_requirements={"requisite": [on_b], "preferred": [on_b]},
                )
            ).volume
            assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_NODE_KEY: "node-b"}]
            local_id = volume.volume_id.split(":", 2)[2]
            assert local_id.startswith("node-b@vol-")

            def images(node: str) -> list[str]:
                return sorted(p.name for p in (tmp_path / node / "files" / "volumes").glob("*.img"))

            assert images("node-b") == [f"{local_id.split('@')[1]}.img"] and images("node-a") == []

            with pytest.raises(grpc.RpcError) as refused:
                a.controller.ControllerPublishVolume(
                    pb.ControllerPublishVolumeRequest(
                        volume_id=volume.volume_id, node_id="node-a", volume_capability=cap
                    )
                )
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            a.controller.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(volume_id=volume.volume_id, node_id="node-b", volume_capability=cap)
            )
            staging = str(tmp_path / "staging")
            stage = pb.NodeStageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap
            )
            with pytest.raises(grpc.RpcError) as elsewhere:
                a.node.NodeStageVolume(stage)
            assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND, "node-a has no such volume"
            b.node.NodeStageVolume(stage)
            target = str(tmp_path / "target")
            b.node.NodePublishVolume(
                pb.NodePublishVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
                )
            )
            Path(target, "hello").write_text("on node-b")
            b.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target))
            b.node.NodeUnstageVolume(
                pb.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging)
            )
            a.controller.ControllerUnpublishVolume(
                pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="node-b")
            )
            a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
            assert images("node-b") == []
            assert objects.list(VOLUMES, "cairn.csi.io/backend=spread")[0] == []
    finally:
        forget_routed_objects(objects, "cairn.csi.io/backend=spread")


def test_a_node_selector_picks_the_nodes_that_serve_a_backend(api: Cluster) -> None:
    """The nodes whose labels match a backend's nodeSelector run its agent; the others do
    not, and a node plugin whose Node the API does not know refuses to start."""
    from csi import config
    from csi.cli import build_backends
    from csi.errors import ConfigError

    api.create(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"disk": "nvme"}}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b", "labels": {"disk": "sata"}}},
    )
    try:
        driver_config = config.parse(
            {"backends": [{"name": "fast", "kind": "lvm", "volumeGroup": "vg", "nodeSelector": {"disk": "nvme"}}]},
            "test",
        )
        agents = {
            node: build_backends(driver_config, node, False, True, lambda: connect(api))[1]
            for node in ("node-a", "node-b")
        }
        assert [a.node for a in agents["node-a"]] == ["node-a"]
        assert agents["node-b"] == []
        with pytest.raises(ConfigError, match="there is no Node 'node-c'"):
            build_backends(driver_config, "node-c", False, True, lambda: connect(api))
    finally:
        api.kubectl("delete", "node", "node-a", "node-b", "--wait=false", check=False)


@dataclass
class Backed:
    """A routed local backend on two nodes whose agents copy backups and fill restores,
    and the controller's backup engine beside it: each with its own handle on one
    directory repository, as separate processes would have."""

    controller: RoutedVolumes
    backups: Backups
    agents: dict[str, NodeAgent]
    root: Path

    def image(self, node: str, kind: str, local_id: str) -> Path:
        folder = "volumes" if kind == "volume" else "snapshots"
        return self.root / node / folder / f"{ids.split_node(local_id)[1]}.img"

    def backup(self, name: str, volume_local_id: str) -> Snapshot:
        """Ask as the CO does until the backup is ready."""

        def ready() -> Snapshot | None:
            found = self.backups.backup("vault", name, ids.encode("files", volume_local_id))
            return found if found.ready else None

        return eventually(f"backup {name} is saved", ready, timeout=90)

    def restore(self, name: str, backup: Snapshot, preferred: str) -> Volume:
        """Ask as the CO does (ABORTED while the node writes) until the volume is made."""
        source = SourceRef("backup", ids.encode("vault", backup.local_id))

        def made() -> Volume | None:
            try:
                return self.controller.create_volume(spec(name, backup.size_bytes, preferred=preferred, source=source))
            except Aborted:
                return None

        return eventually(f"volume {name} is restored", made, timeout=90)


def _repository(root: Path) -> Repository:
    return Repository("vault", DirectoryStore(str(root / "vault")), chunk_size=64 * 1024)


@pytest.fixture
def backed(api: Cluster, tmp_path: Path) -> Iterator[Backed]:
    objects = connect(api)

    def rest(kind: str, name: str) -> str:
        return Layout.local_id("volume" if kind == "volume" else "snapshot", name)

    agents = {}
    for node in ("node-a", "node-b"):
        executor = NodeKeyed(LocalVolumes(str(tmp_path / node), node), "files", node)
        work = NodeBackups({"vault": _repository(tmp_path)}, executor)
        agents[node] = NodeAgent("files", node, objects, executor, rest, resync=2.0, backups=work)
        agents[node].start()
    controller = RoutedVolumes("files", objects, rest)
    capabilities = dataclasses.replace(LOCAL_CAPABILITIES, blocks=False, node_blocks=True)
    registry = Registry([Backend("files", "local", None, capabilities, controller, None)])
    backups = Backups(registry, {"vault": _repository(tmp_path)})
    try:
        eventually("both nodes report", lambda: len(controller.reports()) == 2)
        yield Backed(controller, backups, agents, tmp_path)
    finally:
        backups.wait(60)
        for agent in agents.values():
            agent.stop()
        forget_routed_objects(objects, "cairn.csi.io/backend=files")


def test_backups_of_a_routed_backend_are_copied_and_restored_by_the_nodes(backed: Backed) -> None:
    """The controller holds no node's storage: node-b copies its volume's backups into the
    repository (the second one reading only what changed), node-a fills a restore of them,
    byte for byte, and a damaged chunk fails the restore with DATA_LOSS."""
    volume = backed.controller.create_volume(spec("origin", 4 * MiB, preferred="node-b"))
    image = backed.image("node-b", "volume", volume.local_id)
    rng = random.Random(7)
    with open(image, "r+b") as handle:
        for offset in (0, 300 * 1024, 3 * MiB + 5):
            handle.seek(offset)
            handle.write(rng.randbytes(100 * 1024))
    first = backed.backup("nightly-1", volume.local_id)
    vault = _repository(backed.root)
    full = vault.manifest(first.local_id)
    assert full.parent == "" and full.read_bytes > 0

    with open(image, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(b"changed")
    content = image.read_bytes()
    second = backed.backup("nightly-2", volume.local_id)
    incremental = vault.manifest(second.local_id)
    assert incremental.parent == first.local_id
    assert incremental.read_bytes == 64 * 1024, "only the chunk that changed is read"
    backed.backups.wait(60)  # ready once saved; the older base goes right after
    bases = [s for s in backed.controller.list_snapshots() if s.name.startswith(SNAPSHOT_PREFIX)]
    assert [s.name for s in bases] == [SNAPSHOT_PREFIX + second.local_id], "one base per volume, the newest"
    assert bases[0].local_id.startswith("node-b@")

    restored = backed.restore("moved", second, preferred="node-a")
    assert restored.topology == ({TOPOLOGY_NODE_KEY: "node-a"},), "a backup restores on any node"
    assert backed.image("node-a", "volume", restored.local_id).read_bytes() == content

    # A flipped byte in a stored chunk: the node's fill fails, the controller answers it.
    digest = next(d for d in incremental.chunks if d is not None)
    chunk = next((backed.root / "vault" / "chunks").rglob(digest))
    damaged = bytearray(chunk.read_bytes())
    damaged[-1] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    source = SourceRef("backup", ids.encode("vault", second.local_id))

    def answered() -> BaseException | None:
        try:
            backed.controller.create_volume(spec("damaged", second.size_bytes, preferred="node-a", source=source))
        except Aborted:
            return None
        except DataLoss as exc:
            return exc
        raise AssertionError("a restore of a damaged backup was made")

    assert digest in str(eventually("the fill fails", answered))
    assert backed.controller.lookup_volume("damaged") is None, "a volume not filled is not made"
    damaged_object = backed.controller.objects.get(VOLUMES, Layout.local_id("volume", "damaged"))
    assert damaged_object is not None
    damaged_id = ids.with_node("files", "node-a", damaged_object["metadata"]["name"])
    backed.controller.delete_volume(damaged_id)

    for made in (second, first):
        backed.backups.delete("vault", made.local_id)
    assert [s for s in backed.controller.list_snapshots()] == [], "the bases went with their backups"
    assert list((backed.root / "node-b" / "snapshots").glob("*")) == []
    assert vault.manifests() == []
    for made_volume in (restored, volume):
        backed.controller.delete_volume(made_volume.local_id)
    assert backed.controller.objects.list(VOLUMES, "cairn.csi.io/backend=files")[0] == []


def test_a_routed_backup_deleted_while_its_node_copies_it_leaves_nothing(backed: Backed) -> None:
    """Deleted right after it started: the node's copy is stopped and its snapshot goes;
    no manifest, no marker, no snapshot is left, whatever point the copy had reached."""
    volume = backed.controller.create_volume(spec("big", 48 * MiB, preferred="node-a"))
    with open(backed.image("node-a", "volume", volume.local_id), "r+b") as handle:
        handle.write(random.Random(3).randbytes(32 * MiB))
    volume_id = ids.encode("files", volume.local_id)
    started = backed.backups.backup("vault", "cut-short", volume_id)
    assert not started.ready

    def deleted() -> bool:
        try:
            backed.backups.delete("vault", started.local_id)
        except Aborted:
            return False  # the node has not let go of the snapshot yet: the CO retries
        return True

    eventually("the backup is deleted", deleted)
    vault = _repository(backed.root)
    assert vault.manifests() == []
    assert not vault.pending(started.local_id)
    assert backed.controller.list_snapshots() == []
    assert list((backed.root / "node-a" / "snapshots").glob("*")) == []
    backed.controller.delete_volume(volume.local_id)


def test_a_copy_that_fails_on_its_node_is_answered_once_then_started_again(
    backed: Backed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's copy that fails (here, an error outside the domain's, as a broken disk
    would raise) is answered to the CO once, naming the node, as INTERNAL; the next ask
    has the node copy it again."""
    volume = backed.controller.create_volume(spec("flaky", 1 * MiB, preferred="node-a"))
    work = backed.agents["node-a"].backups
    assert work is not None

    def broken(*args: Any, **kwargs: Any) -> object:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(work, "copy", broken)
    volume_id = ids.encode("files", volume.local_id)

    def answered() -> CairnError | None:
        try:
            backed.backups.backup("vault", "flaky-1", volume_id)
        except CairnError as exc:
            return exc
        return None

    failure = eventually("the node's failure is answered", answered)
    assert code_of(failure) == "Internal" and "node-a" in str(failure) and "Input/output error" in str(failure)
    monkeypatch.undo()
    saved = backed.backup("flaky-1", volume.local_id)
    assert _repository(backed.root).manifest(saved.local_id).name == "flaky-1"
    backed.backups.wait(60)
    backed.backups.delete("vault", saved.local_id)
    backed.controller.delete_volume(volume.local_id)
