"""The command line as an operator meets it: start, stop on SIGTERM, refuse bad config,
and the client commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from csi.client import parse_size
from csi.errors import FailedPrecondition
from csi.generated import csi_pb2 as pb
from tests.support import Driver, mount_capability


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_sigterm_stops_gracefully_and_removes_the_socket(tmp_path: Path) -> None:
    driver = Driver(tmp_path).start()
    assert driver.socket.exists()
    request = pb.CreateVolumeRequest(
        name="pvc-1",
        capacity_range=pb.CapacityRange(required_bytes=1 << 20),
        volume_capabilities=[mount_capability("ext4")],
    )
    made = driver.controller.CreateVolume(request, timeout=30).volume.volume_id
    assert list((driver.data / "journal").iterdir()), "the create was journaled"
    assert driver.stop() == 0
    assert not driver.socket.exists()
    assert "stopping" in driver.log.read_text()
    assert list((driver.data / "journal").iterdir()) == [], "a clean stop leaves nothing to replay"
    driver.start()
    try:
        assert [v.volume.volume_id for v in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries] == [made]
    finally:
        driver.stop()


def test_sigusr1_logs_every_threads_stack_and_serves_on(tmp_path: Path) -> None:
    driver = Driver(tmp_path).start()
    try:
        stacks = driver.thread_stacks()
        assert "most recent call first" in stacks and "csi/cli.py" in stacks, stacks
        assert driver.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value
    finally:
        assert driver.stop() == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("backends: [{name: a, kind: tape}]", "unknown kind 'tape'"),
        ("backends: [{name: a, kind: local}]", "'path' is required"),
        ("backends: [{name: a, kind: local, path: /tmp/x, colour: red}]", "unknown local settings ['colour']"),
        ("nonsense: [", "cannot read config file"),
    ],
)
def test_bad_config_stops_start_up_with_a_reason(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(config)
    result = run_cli("--endpoint", f"unix://{tmp_path}/csi.sock", "--config", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "csi.sock").exists()


def test_config_file_with_two_backends_serves_both(tmp_path: Path) -> None:
    config = tmp_path / "cairn.yaml"
    config.write_text(
        f"backends:\n  - {{name: fast, kind: local, path: {tmp_path}/fast}}\n  - {{name: slow, kind: local, path: {tmp_path}/slow}}\n"
    )
    driver = Driver(tmp_path, ["--config", str(config)]).start()
    endpoint = f"unix://{driver.socket}"
    try:
        refused = run_cli("client", "--endpoint", endpoint, "create", "pvc-a", "--size", "4Mi")
        assert refused.returncode == 1
        assert "INVALID_ARGUMENT" in refused.stderr and "'backend' or 'group' is required" in refused.stderr
        created = run_cli(
            "client", "--endpoint", endpoint, "create", "pvc-a", "--size", "4Mi", "--param", "backend=slow"
        )
        assert created.returncode == 0, created.stderr
        assert "1:slow:vol-" in created.stdout and "4.0 MiB" in created.stdout
        assert len(list((tmp_path / "slow" / "volumes").glob("*.img"))) == 1
        assert list((tmp_path / "fast" / "volumes").glob("*.img")) == []
        listed = run_cli("client", "--endpoint", endpoint, "list")
        assert "1:slow:vol-" in listed.stdout
        volume_id = listed.stdout.split()[0]
        assert run_cli("client", "--endpoint", endpoint, "delete", volume_id).returncode == 0
    finally:
        assert driver.stop() == 0


def test_client_info(tmp_path: Path) -> None:
    driver = Driver(tmp_path).start()
    try:
        result = run_cli("client", "--endpoint", f"unix://{driver.socket}", "info")
        assert result.returncode == 0, result.stderr
        assert "cairn.csi.io" in result.stdout and "test-node" in result.stdout
    finally:
        driver.stop()


def test_sizes() -> None:
    assert parse_size("1Gi") == 1 << 30
    assert parse_size("512Mi") == 512 << 20
    assert parse_size("10G") == 10 * 10**9
    assert parse_size("4096") == 4096


def test_a_node_plugin_leaves_the_controllers_work_in_progress_alone(tmp_path: Path) -> None:
    volumes = tmp_path / "data" / "volumes"
    volumes.mkdir(parents=True)
    in_progress = volumes / "vol-00000000-0000-5000-8000-000000000000.img.tmp"
    in_progress.write_bytes(b"being written by the controller")
    node_plugin = Driver(tmp_path, ["--mode", "node"]).start()
    assert node_plugin.stop() == 0
    assert in_progress.exists(), "a node plugin must not run the controller's crash recovery"
    controller = Driver(tmp_path, ["--mode", "controller"]).start()
    assert controller.stop() == 0
    assert not in_progress.exists(), "the controller cleans up after a crash at start-up"


@pytest.mark.parametrize(("mode", "loaded"), [("node", False), ("controller", True)])
def test_a_node_plugin_never_loads_librados_or_librbd(tmp_path: Path, mode: str, loaded: bool) -> None:
    """Each role builds only its halves: a node plugin maps images with the tools and
    has no use for Ceph's Python modules (nor their health checks)."""
    config = tmp_path / "cairn.yaml"
    config.write_text(
        yaml.safe_dump({"backends": [{"name": "ceph", "kind": "rbd", "monitors": ["127.0.0.1:1"], "pool": "p"}]})
    )
    script = (
        "import sys\n"
        "from csi import cli\n"
        f"args = cli.parser().parse_args(['--mode', {mode!r}, '--config', {str(config)!r}, '--check-nodes', 'off',"
        f" '--state-dir', {str(tmp_path / 's')!r}, '--endpoint', 'unix://{tmp_path}/csi.sock'])\n"
        "server = cli.build_server(args)\n"
        "backend = next(iter(server.services.identity.registry))\n"
        "print('rados' in sys.modules, 'rbd' in sys.modules, backend.controller is None, backend.node is None)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(loaded), str(loaded), str(mode == "node"), str(mode == "controller")]


@pytest.mark.unit
def test_an_lvm_backend_without_a_node_is_routed_when_the_api_is_there(tmp_path: Path) -> None:
    """Which backends go through NodeVolume objects, and which node plugins run an agent:
    the wiring alone (the routing itself is tested against a real API server)."""
    from csi import config
    from csi.backends.routed import Objects, RoutedVolumes
    from csi.backup.engine import NodeBackups
    from csi.cli import build_backends

    driver_config = config.parse(
        {
            "backends": [
                {"name": "many", "kind": "lvm", "volumeGroup": "vg"},
                {"name": "some", "kind": "lvm", "volumeGroup": "vg", "nodes": ["worker-2"]},
                {"name": "pinned", "kind": "lvm", "volumeGroup": "vg", "node": "worker-1"},
                {"name": "files", "kind": "local", "path": str(tmp_path / "files")},
                {"name": "spread", "kind": "local", "path": str(tmp_path / "spread"), "nodes": ["worker-1", "w-2"]},
            ]
        },
        "test",
    )
    asked: list[bool] = []

    def routing() -> Objects:
        asked.append(True)
        return Objects(api=None)

    opened: list[bool] = []

    def repositories() -> dict[str, Any]:
        opened.append(True)
        return {"vault": "the repositories"}

    backends, agents = build_backends(driver_config, "worker-1", True, True, routing, repositories)
    kinds = {b.name: type(b.controller).__name__ for b in backends}
    assert kinds == {
        "many": "RoutedVolumes",
        "some": "RoutedVolumes",
        "pinned": "LvmVolumes",
        "files": "LocalVolumes",
        "spread": "RoutedVolumes",
    }
    assert [a.backend for a in agents] == ["many", "spread"], "worker-1 is not among the nodes of 'some'"
    spread = next(b for b in backends if b.name == "spread")
    assert type(spread.node).__name__ == "NodeKeyedConnector", "a local backend's IDs carry the node when routed"
    assert type(agents[1].executor).__name__ == "NodeKeyed"
    files = next(b for b in backends if b.name == "files")
    assert files.capabilities.blocks and not spread.capabilities.blocks, (
        "no block access in the controller, which holds no node's storage when routed"
    )
    with pytest.raises(FailedPrecondition, match="'spread'"):
        assert spread.blocks is None  # raises before
    assert spread.capabilities.node_blocks and spread.capabilities.backups, "its nodes copy and fill the blocks"
    work = agents[1].backups
    assert isinstance(work, NodeBackups) and dict[str, Any](work.repositories) == {"vault": "the repositories"}
    assert work.blocks is cast(object, agents[1].executor)
    many = next(b for b in backends if b.name == "many")
    assert not many.capabilities.backups and agents[0].backups is None, "thick lvm reads no blocks anywhere"
    assert opened == [True], "asked for only by the agent of a backend that reads blocks"
    assert asked == [True], "the API is asked for once"
    some = next(b for b in backends if b.name == "some").controller
    assert isinstance(some, RoutedVolumes) and some.nodes == {"worker-2"}

    node_only, agents = build_backends(driver_config, "worker-2", False, True, routing)
    assert [b.controller for b in node_only] == [None] * 5
    assert [a.backend for a in agents] == ["many", "some"]

    outside, agents = build_backends(driver_config, "worker-1", True, True, lambda: None)
    assert agents == [] and type(outside[0].controller).__name__ == "LvmVolumes", "no API: this node"
    assert type(outside[4].controller).__name__ == "LocalVolumes"
