"""The server's interceptor and endpoint handling, on a real gRPC server."""

from __future__ import annotations

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
