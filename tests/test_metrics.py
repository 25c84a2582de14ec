"""Metrics and request IDs as an operator meets them: a real driver serving /metrics, and
its log tying every line of a call (the subprocess runner's included) to one ID."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi import cli
from csi.backends.base import Backend
from csi.backends.local import CAPABILITIES
from csi.generated import csi_pb2 as pb
from csi.metrics import BackendGauges, Metrics
from tests.conftest import running_driver
from tests.support import NODE_ID, Driver, block_capability, mount_capability, require_root, require_tools

MiB = 1 << 20
CREATE = "/csi.v1.Controller/CreateVolume"
GET = "/csi.v1.Controller/ControllerGetVolume"
PROBE = "/csi.v1.Identity/Probe"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def operation(method: str, code: str, backend: str) -> dict[str, str]:
    return {"driver_name": "cairn.csi.io", "method_name": method, "grpc_status_code": code, "backend": backend}


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[Driver, int]]:
    port = free_port()
    with running_driver(tmp_path, ["--metrics-port", str(port)]) as driver:
        yield driver, port


def log_lines(driver: Driver, request_id: str) -> list[str]:
    return [line for line in driver.log.read_text().splitlines() if f'request_id="{request_id}"' in line]


def test_a_driver_serves_call_and_backend_metrics(metered: tuple[Driver, int]) -> None:
    driver, port = metered
    request = pb.CreateVolumeRequest(
        name="pvc-metrics", volume_capabilities=[block_capability()], capacity_range={"required_bytes": 4 * MiB}
    )
    volume_id = driver.controller.CreateVolume(request, timeout=30, metadata=[("x-request-id", "create-1")]).volume
    with pytest.raises(grpc.RpcError) as caught:
        driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="1:local:vol-none"), timeout=30)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    driver.identity.Probe(pb.ProbeRequest(), timeout=30)

    deadline = time.monotonic() + 20
    samples = scrape(port)
    while value(samples, "cairn_backend_free_bytes", backend="local") is None:  # read in the background
        assert time.monotonic() < deadline, "free space never appeared"
        time.sleep(0.1)
        samples = scrape(port)
    assert value(samples, "csi_plugin_operations_seconds_count", **operation(CREATE, "OK", "local")) == 1
    assert value(samples, "csi_plugin_operations_seconds_bucket", **operation(CREATE, "OK", "local"), le="600.0") == 1
    assert value(samples, "csi_plugin_operations_seconds_count", **operation(GET, "NOT_FOUND", "local")) == 1
    assert value(samples, "csi_plugin_operations_seconds_count", **operation(PROBE, "OK", "")) == 1
    assert value(samples, "csi_plugin_inflight_operations", method_name=CREATE) == 0
    assert value(samples, "cairn_backend_healthy", backend="local", kind="local") == 1
    assert (value(samples, "cairn_backend_free_bytes", backend="local") or 0) > 0
    assert value(samples, "process_resident_memory_bytes") is not None

    create = log_lines(driver, "create-1")
    served = [line.split(" csi.server: ", 1)[1].split()[0] for line in create if " csi.server: " in line]
    assert served == ["call", "answer", "done"]
    assert " INFO " in create[-1] and 'backend="local"' in create[-1] and 'request_name="pvc-metrics"' in create[-1]
    failed = next(line for line in driver.log.read_text().splitlines() if 'code="NOT_FOUND"' in line)
    assert " INFO " in failed and 'volume_id="1:local:vol-none"' in failed
    assert re.search(r'request_id="[0-9a-f]{16}"', failed)
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id.volume_id), timeout=30)


@pytest.mark.integration
def test_the_commands_a_call_runs_carry_its_request_id(metered: tuple[Driver, int]) -> None:
    require_root()
    require_tools("mkfs.ext4", "blkid")
    driver, _ = metered
    cap = mount_capability()
    size = 16 * MiB
    request = pb.CreateVolumeRequest(name="pvc-ids", volume_capabilities=[cap], capacity_range={"required_bytes": size})
    volume = driver.controller.CreateVolume(request, timeout=30).volume
    publish = pb.ControllerPublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_ID, volume_capability=cap)
    context = driver.controller.ControllerPublishVolume(publish, timeout=30).publish_context
    staging = str(driver.root / "staging")
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap, publish_context=context
    )
    driver.node.NodeStageVolume(stage, timeout=60, metadata=[("x-request-id", "stage-1")])
    try:
        lines = log_lines(driver, "stage-1")
        commands = [line for line in lines if "ran command" in line]
        assert commands and all(" DEBUG csi.proc: " in line for line in commands)
        assert any('"mkfs.ext4"' in line for line in commands) and any('"blkid"' in line for line in commands)
        assert " csi.server: done " in lines[-1] and 'backend="local"' in lines[-1]
    finally:
        driver.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging), timeout=60
        )
        driver.controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_ID), timeout=30
        )
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=30)


# -- in-process -------------------------------------------------------------------------


@dataclass
class FakeVolumes:
    problem: str | None = None
    free: int | Exception = 1 << 30
    health_calls: int = 0

    def health(self) -> str | None:
        self.health_calls += 1
        return self.problem

    def free_bytes(self) -> int:
        if isinstance(self.free, Exception):
            raise self.free
        return self.free


def backend(name: str, volumes: FakeVolumes) -> Backend:
    return Backend(name, "fake", None, CAPABILITIES, volumes, None)  # type: ignore[arg-type]


def gauges(collector: BackendGauges) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_backend_gauges_serve_health_now_and_free_space_as_last_read(caplog: pytest.LogCaptureFixture) -> None:
    well, ill = FakeVolumes(free=5), FakeVolumes(problem="pool gone", free=RuntimeError("cluster down"))
    collector = BackendGauges([backend("a", well), backend("b", ill)])
    assert gauges(collector) == {
        ("cairn_backend_healthy", ("a", "fake")): 1,
        ("cairn_backend_healthy", ("b", "fake")): 0,
    }
    collector.refresh()
    collector.refresh()
    found = gauges(collector)
    assert found[("cairn_backend_free_bytes", ("a",))] == 5
    assert ("cairn_backend_free_bytes", ("b",)) not in found, "no value rather than a stale or made-up one"
    assert [r.getMessage() for r in caplog.records] == ["cannot read free space"], "logged once, not every refresh"
    ill.free = 7
    collector.refresh()
    assert gauges(collector)[("cairn_backend_free_bytes", ("b",))] == 7
    well.free = 9
    assert gauges(collector)[("cairn_backend_free_bytes", ("a",))] == 5, "a scrape never reads free space"


def test_a_failing_health_check_reads_as_unhealthy() -> None:
    class Exploding(FakeVolumes):
        def health(self) -> str | None:
            raise RuntimeError("bug")

    collector = BackendGauges([backend("a", Exploding())])
    assert gauges(collector) == {("cairn_backend_healthy", ("a", "fake")): 0}


def test_free_space_is_refreshed_in_the_background() -> None:
    volumes = FakeVolumes(free=3)
    metrics = Metrics(free_port(), [backend("a", volumes)], refresh_interval=0.05)
    metrics.start()
    try:
        deadline = time.monotonic() + 10
        while value(scrape(metrics.port), "cairn_backend_free_bytes", backend="a") != 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        volumes.free = 4
        while value(scrape(metrics.port), "cairn_backend_free_bytes", backend="a") != 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        metrics.stop()


def test_a_node_plugin_exports_no_backend_gauges(tmp_path: Path) -> None:
    argv = ["--endpoint", f"unix://{tmp_path}/csi.sock", "--data-dir", str(tmp_path / "data")]
    argv += ["--state-dir", str(tmp_path / "state"), "--metrics-port", "9999"]
    for mode, watched in (("node", []), ("controller", ["local"]), ("all", ["local"])):
        server = cli.build_server(cli.parser().parse_args([*argv, "--mode", mode, "--check-nodes", "off"]))
        assert isinstance(server.metrics, Metrics)
        assert [b.name for b in server.metrics.backends.watched] == watched
    assert cli.build_server(cli.parser().parse_args([*argv[:-2], "--check-nodes", "off"])).metrics is None


def test_the_metrics_port_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parser().parse_args([]).metrics_port == 0
    monkeypatch.setenv("CAIRN_METRICS_PORT", "9812")
    assert cli.parser().parse_args([]).metrics_port == 9812
    assert cli.parser().parse_args(["--metrics-port", "0"]).metrics_port == 0
    for bad in ("70000", "-1", "http"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["--metrics-port", bad])
        assert "is not a TCP port" in capsys.readouterr().err


def test_a_busy_metrics_port_stops_start_up_with_a_reason() -> None:
    from csi.errors import ConfigError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        metrics = Metrics(taken.getsockname()[1])
        with pytest.raises(ConfigError, match="cannot serve metrics on port"):
            metrics.start()
