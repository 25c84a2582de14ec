"""The server's interceptor and endpoint handling, on a real gRPC server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.errors import ConfigError, NotFound
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.server import STRIPPED, Server, Services, parse_endpoint, redacted


class Misbehaving(pb_grpc.IdentityServicer):
    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        raise NotFound("volume 'x' does not exist")

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        responses: dict[str, pb.ProbeResponse] = {}
        return responses["a bug"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    instance = Server(f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None), workers=2)
    instance.start()
    yield instance
    instance.stop()


def call(server: Server, rpc: str, request: Any) -> Any:
    with grpc.insecure_channel(server.endpoint.address) as channel, pytest.raises(grpc.RpcError) as caught:
        getattr(pb_grpc.IdentityStub(channel), rpc)(request, timeout=10)
    return caught.value


def test_domain_errors_get_their_code(server: Server) -> None:
    error = call(server, "GetPluginInfo", pb.GetPluginInfoRequest())
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "volume 'x' does not exist"


def test_bugs_are_internal_never_unknown(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    error = call(server, "Probe", pb.ProbeRequest())
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "KeyError" in error.details()
    assert any(r.exc_info for r in caplog.records), "the traceback must be logged"


def test_stop_removes_the_socket(tmp_path: Path) -> None:
    instance = Server(f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None))
    instance.start()
    assert (tmp_path / "s.sock").exists()
    instance.stop()
    instance.stop()
    assert not (tmp_path / "s.sock").exists()


def test_a_stale_socket_is_replaced_but_a_file_is_not(tmp_path: Path) -> None:
    first = Server(f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None))
    first.start()
    first._server.stop(None)  # a crash: the socket file stays behind
    second = Server(f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None))
    second.start()
    second.stop()
    (tmp_path / "file").write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        Server(f"unix://{tmp_path}/file", Services(Misbehaving(), None, None)).start()
    assert (tmp_path / "file").read_text() == "precious"


def test_endpoints() -> None:
    assert parse_endpoint("unix:///run/csi/csi.sock").socket_path == "/run/csi/csi.sock"
    assert parse_endpoint("unix:/run/csi.sock").address == "unix:///run/csi.sock"
    assert parse_endpoint("tcp://127.0.0.1:10000").address == "127.0.0.1:10000"
    with pytest.raises(ConfigError, match="must be unix"):
        parse_endpoint("/run/csi.sock")


def test_secrets_are_stripped_at_every_depth() -> None:
    request = pb.CreateVolumeRequest(name="pvc", secrets={"userKey": "s3cr3t"}, parameters={"pool": "rbd"})
    request.volume_capabilities.add().mount.fs_type = "xfs"
    logged = redacted(request)
    assert logged["secrets"] == STRIPPED
    assert logged["parameters"] == {"pool": "rbd"}
    assert logged["volume_capabilities"] == [{"mount": {"fs_type": "xfs"}}]
    stage = redacted(pb.NodeStageVolumeRequest(volume_id="v", secrets={"k": "s3cr3t"}))
    assert "s3cr3t" not in repr(stage)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_health_port_serves_only_health_and_follows_readiness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import csi.server

    monkeypatch.setattr(csi.server, "HEALTH_INTERVAL", 0.05)
    ready = {"now": True}
    port = free_port()
    instance = Server(
        f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None), health_port=port, ready=lambda: ready["now"]
    )
    instance.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            ready["now"] = False
            deadline = time.monotonic() + 10
            while check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.IdentityStub(channel).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        instance.stop()
