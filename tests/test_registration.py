"""Registration with the kubelet without the node-driver-registrar: a client plays the
kubelet against the registration socket of a real driver process (GetInfo, then
NotifyRegistrationStatus), and of a server in process for the health it reports; a socket
left by a killed process is replaced, a clean stop removes it, and the flags are refused
where they cannot work."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import csi.server
from csi import DRIVER_NAME
from csi.generated import csi_pb2 as csi_pb
from csi.generated import csi_pb2_grpc as csi_grpc
from csi.generated import pluginregistration_pb2 as pb
from csi.generated import pluginregistration_pb2_grpc as pb_grpc
from csi.registration import RegistrationServer, socket_path
from csi.server import Server, Services
from tests.support import NODE_ID, Driver

# The CSI socket as the kubelet sees it on the host; the driver itself listens elsewhere.
HOST_ENDPOINT = f"/var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock"
REFUSAL = "error: plugin cairn.csi.io: NodeGetInfo failed: connection refused"


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def registration_stub(path: Path) -> tuple[grpc.Channel, pb_grpc.RegistrationStub]:
    channel = grpc.insecure_channel(f"unix://{path}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, pb_grpc.RegistrationStub(channel)


def node_plugin(root: Path, *extra: str) -> Driver:
    registration = root / "plugins_registry"
    return Driver(
        root,
        [
            "--mode", "node", "--log-json",
            "--registration-dir", str(registration), "--kubelet-registration-path", HOST_ENDPOINT,
            *extra,
        ],
    )  # fmt: skip


def logged(driver: Driver) -> list[dict[str, Any]]:
    return [json.loads(line) for line in driver.log.read_text().splitlines() if line.startswith("{")]


def test_the_kubelet_learns_the_plugin_and_a_refusal_is_logged(tmp_path: Path) -> None:
    driver = node_plugin(tmp_path).start()
    reg_socket = Path(socket_path(str(tmp_path / "plugins_registry")))
    assert reg_socket.name == "cairn.csi.io-reg.sock"
    try:
        wait_for(reg_socket)
        channel, kubelet = registration_stub(reg_socket)
        with channel:
            info = kubelet.GetInfo(pb.InfoRequest(), timeout=10)
            assert (info.type, info.name, info.endpoint) == ("CSIPlugin", "cairn.csi.io", HOST_ENDPOINT)
            assert list(info.supported_versions) == ["1.0.0"]
            # What the kubelet does next, on the CSI socket.
            node = csi_grpc.NodeStub(driver.channel).NodeGetInfo(csi_pb.NodeGetInfoRequest(), timeout=10)
            assert node.node_id == NODE_ID
            answer = kubelet.NotifyRegistrationStatus(
                pb.RegistrationStatus(plugin_registered=False, error=REFUSAL), timeout=10
            )
            assert answer == pb.RegistrationStatusResponse()
            kubelet.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=10)
    finally:
        assert driver.stop() == 0
    assert not reg_socket.exists(), "a clean stop removes the registration socket: the kubelet deregisters"
    entries = logged(driver)
    refused = [e for e in entries if e["msg"] == "the kubelet refused the registration"]
    assert len(refused) == 1 and refused[0]["level"] == "error"
    assert refused[0]["error"] == REFUSAL and refused[0]["endpoint"] == HOST_ENDPOINT
    assert [e["level"] for e in entries if e["msg"] == "registered with the kubelet"] == ["info"]


def test_a_socket_left_by_a_killed_plugin_is_replaced(tmp_path: Path) -> None:
    driver = node_plugin(tmp_path).start()
    reg_socket = Path(socket_path(str(tmp_path / "plugins_registry")))
    wait_for(reg_socket)
    driver.kill()
    assert reg_socket.is_socket(), "a killed process cannot remove its socket"
    driver.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the old file stays until the new server replaces it
            try:
                channel, kubelet = registration_stub(reg_socket)
                with channel:
                    assert kubelet.GetInfo(pb.InfoRequest(), timeout=10).name == DRIVER_NAME
                break
            except grpc.FutureTimeoutError:
                assert time.monotonic() < deadline, "the stale socket was never replaced"
    finally:
        assert driver.stop() == 0
    assert not reg_socket.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi", *args], capture_output=True, text=True, timeout=60, check=False)


def test_a_file_in_the_way_of_the_socket_is_left_alone(tmp_path: Path) -> None:
    registration = tmp_path / "plugins_registry"
    registration.mkdir()
    precious = Path(socket_path(str(registration)))
    precious.write_text("not a socket")
    result = run_cli(
        "--mode", "node", "--endpoint", f"unix://{tmp_path}/csi.sock", "--data-dir", str(tmp_path / "data"),
        "--state-dir", str(tmp_path / "state"), "--check-nodes", "off",
        "--registration-dir", str(registration), "--kubelet-registration-path", HOST_ENDPOINT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is not a socket; refusing to remove it" in result.stderr
    assert precious.read_text() == "not a socket"
    assert not (tmp_path / "csi.sock").exists(), "a failed start closes the CSI socket too"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--registration-dir", "/r"], "go together: give both or neither"),
        (["--kubelet-registration-path", HOST_ENDPOINT], "go together: give both or neither"),
        (
            ["--mode", "controller", "--registration-dir", "/r", "--kubelet-registration-path", HOST_ENDPOINT],
            "needs --mode node or all",
        ),
        (["--registration-dir", "/r", "--kubelet-registration-path", "csi.sock"], "must be an absolute path"),
        (
            ["--endpoint", "tcp://127.0.0.1:1", "--registration-dir", "/r", "--kubelet-registration-path", "/c.sock"],
            "needs a unix:// --endpoint",
        ),
    ],
)
def test_registration_flags_are_refused_where_they_cannot_work(
    tmp_path: Path, flags: list[str], complaint: str
) -> None:
    result = run_cli("--state-dir", str(tmp_path / "state"), "--data-dir", str(tmp_path / "data"), *flags)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert not (tmp_path / "state").exists(), "refused before anything was built"


class Identity(csi_grpc.IdentityServicer):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def with_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, int, Path]]:
    monkeypatch.setattr(csi.server, "HEALTH_INTERVAL", 0.05)
    registration = RegistrationServer(str(tmp_path / "registry"), HOST_ENDPOINT)
    port = free_port()
    instance = Server(
        f"unix://{tmp_path}/csi.sock",
        Services(Identity(), None, None),
        workers=2,
        health_port=port,
        ready=lambda: False,  # a backend is unwell: readiness says so, liveness does not
        companions=[registration],
    )
    instance.start()
    yield instance, port, Path(registration.socket_path)
    instance.stop()


def status_of(channel: grpc.Channel, service: str) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def eventually(channel: grpc.Channel, service: str, wanted: Any) -> None:
    deadline = time.monotonic() + 10
    while status_of(channel, service) != wanted:
        assert time.monotonic() < deadline, f"health of {service!r} never turned {wanted}"
        time.sleep(0.05)


@pytest.mark.unit
def test_the_health_service_reports_the_kubelets_last_word(with_registration: tuple[Server, int, Path]) -> None:
    instance, port, reg_socket = with_registration
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(f"127.0.0.1:{port}") as health, grpc.insecure_channel(f"unix://{reg_socket}") as reg:
        kubelet = pb_grpc.RegistrationStub(reg)
        assert status_of(health, "registration") == not_serving, "not registered before the kubelet says so"
        kubelet.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=10)
        eventually(health, "registration", serving)
        kubelet.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=False, error=REFUSAL), timeout=10)
        eventually(health, "registration", not_serving)
        assert status_of(health, "") == not_serving
        assert status_of(health, "liveness") == serving
    instance.stop()
    assert not reg_socket.exists()
    assert not Path(instance.endpoint.socket_path or "").exists()
