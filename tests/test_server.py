"""The server's interceptor and endpoint handling, on a real gRPC server."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import log as calls
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


def test_liveness_ignores_backend_health(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet's native gRPC liveness probe asks for service "liveness": SERVING as long
    as the process serves, on the health port and on the endpoint, while readiness follows
    the backends (a storage outage must not restart node plugins)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import csi.server

    monkeypatch.setattr(csi.server, "HEALTH_INTERVAL", 0.05)
    port = free_port()
    instance = Server(
        f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None), health_port=port, ready=lambda: False
    )
    instance.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        for address in (f"127.0.0.1:{port}", instance.endpoint.address):
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                assert check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == serving
                assert check(health_pb2.HealthCheckRequest(), timeout=10).status != serving
    finally:
        instance.stop()
    assert instance.health.Check(health_pb2.HealthCheckRequest(service="liveness"), None).status != serving


class Talkative(pb_grpc.IdentityServicer):
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        logging.getLogger("csi.proc").debug("ran command", extra={"argv": ["true"]})
        return pb.ProbeResponse()


class TalkativeController(pb_grpc.ControllerServicer):
    """Logs from "inside" a backend and names the backend, as the real services do."""

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.CreateVolumeResponse:
        calls.set_backend("fast")
        logging.getLogger("csi.backends.fake").info("working")
        return pb.CreateVolumeResponse(volume=pb.Volume(volume_id="1:fast:v-1"))

    def ControllerGetVolume(
        self, request: pb.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetVolumeResponse:
        raise NotFound(f"volume {request.volume_id!r} does not exist")


def talkative_server(tmp_path: Path, metrics: Any = None) -> Server:
    services = Services(Talkative(), TalkativeController(), None)
    return Server(f"unix://{tmp_path}/t.sock", services, workers=2, metrics=metrics)


@pytest.fixture
def talkative(tmp_path: Path) -> Iterator[Server]:
    instance = talkative_server(tmp_path)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """What the driver's JSON handler (with its request ID filter) writes, at debug level."""
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(calls.JsonFormatter())
    handler.addFilter(calls.RequestIdFilter())
    logging.getLogger().addHandler(handler)
    yield stream
    logging.getLogger().removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def invoke(server: Server, rpc: str, request: Any, request_id: str | None = None) -> Any:
    metadata = [("x-request-id", request_id)] if request_id is not None else None
    stub: Any = pb_grpc.IdentityStub if rpc == "Probe" else pb_grpc.ControllerStub
    with grpc.insecure_channel(server.endpoint.address) as channel:
        return getattr(stub(channel), rpc)(request, timeout=10, metadata=metadata)


def test_every_line_of_a_call_carries_its_request_id(talkative: Server, json_log: io.StringIO) -> None:
    logging.getLogger("csi").info("outside any call")
    invoke(talkative, "CreateVolume", pb.CreateVolumeRequest(name="pvc-1"), request_id="r" * 100)
    invoke(talkative, "Probe", pb.ProbeRequest())
    invoke(talkative, "Probe", pb.ProbeRequest(), request_id="   ")  # nothing to go by: a new ID
    logged = lines(json_log)
    outside = next(entry for entry in logged if entry["msg"] == "outside any call")
    assert "request_id" not in outside
    info = [entry for entry in logged if entry.get("rpc") == "CreateVolume" or entry["msg"] == "working"]
    assert [entry["msg"] for entry in info] == ["call", "working", "answer", "done"]
    assert {entry["request_id"] for entry in info} == {"r" * 64}
    ran = [entry for entry in logged if entry["msg"] == "ran command"]
    assert len(ran) == 2 and ran[0]["request_id"] != ran[1]["request_id"]
    for entry in ran:
        assert len(entry["request_id"]) == 16 and int(entry["request_id"], 16) >= 0
        probe = [e for e in logged if e.get("request_id") == entry["request_id"]]
        assert [e["msg"] for e in probe] == ["call", "ran command", "answer", "done"]


def test_text_lines_carry_the_request_id_first() -> None:
    record = logging.LogRecord("csi.proc", logging.DEBUG, __file__, 1, "ran command", (), None)
    record.argv = ["losetup"]
    with calls.call_context("abc"):
        assert calls.RequestIdFilter().filter(record)
    text = calls.TextFormatter("%(message)s").format(record)
    assert text == 'ran command request_id="abc" argv=["losetup"]'
    assert json.loads(calls.JsonFormatter().format(record))["request_id"] == "abc"


def test_backend_is_per_call() -> None:
    calls.set_backend("outside")  # no call: no effect
    assert calls.backend() == ""
    with calls.call_context("a"):
        calls.set_backend("fast")
        assert (calls.request_id(), calls.backend()) == ("a", "fast")
        with calls.call_context("b"):
            assert calls.backend() == ""
        assert calls.backend() == "fast"
    assert (calls.request_id(), calls.backend()) == (None, "")


def test_one_summary_line_per_call(
    talkative: Server, server: Server, json_log: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    invoke(talkative, "CreateVolume", pb.CreateVolumeRequest(name="pvc-1"))
    invoke(talkative, "Probe", pb.ProbeRequest())
    with pytest.raises(grpc.RpcError):
        invoke(talkative, "ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id="1:fast:v-2"))
    call(server, "Probe", pb.ProbeRequest())  # a bug: INTERNAL
    summaries = [entry for entry in lines(json_log) if entry["msg"] in ("done", "failed")]
    assert [(e["rpc"], e["level"], e["code"]) for e in summaries] == [
        ("CreateVolume", "info", "OK"),
        ("Probe", "debug", "OK"),  # a frequent call
        ("ControllerGetVolume", "info", "NOT_FOUND"),
        ("Probe", "error", "INTERNAL"),
    ]
    assert summaries[0]["backend"] == "fast" and summaries[0]["request_name"] == "pvc-1"
    assert "backend" not in summaries[1]
    assert summaries[2]["error"] == "volume '1:fast:v-2' does not exist"
    assert summaries[2]["volume_id"] == "1:fast:v-2"
    assert "KeyError" in summaries[3]["traceback"]
    for entry in summaries:
        assert isinstance(entry["seconds"], float) and entry["request_id"]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.getMessage() in ("call", "answer")]


def test_the_summary_names_what_the_call_acts_on() -> None:
    from csi.server import acted_on

    long_id = "1:local:" + "v" * 300
    assert acted_on(pb.ControllerPublishVolumeRequest(volume_id=long_id, node_id="n1")) == {
        "volume_id": long_id[:128],
        "node_id": "n1",
    }
    assert acted_on(pb.CreateSnapshotRequest(name="snap", source_volume_id="1:a:b")) == {
        "request_name": "snap",
        "source_volume_id": "1:a:b",
    }
    assert acted_on(pb.DeleteSnapshotRequest(snapshot_id="1:a:s")) == {"snapshot_id": "1:a:s"}
    assert acted_on(pb.ProbeRequest()) == {}


class Broken(logging.Handler):
    """A handler whose filter raises, which the logging module does not catch."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(self.explode)

    @staticmethod
    def explode(record: logging.LogRecord) -> bool:
        raise RuntimeError("the log is broken")

    def emit(self, record: logging.LogRecord) -> None:
        raise AssertionError("never reached")


class BrokenMetrics:
    def started(self, method: str) -> None:
        raise RuntimeError("metrics are broken")

    def finished(self, method: str, code: str, backend: str, seconds: float) -> None:
        raise RuntimeError("metrics are broken")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_broken_log_or_metrics_never_fails_a_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broken = Broken()
    instance = talkative_server(tmp_path, BrokenMetrics())
    instance.start()
    logging.getLogger("csi.server").addHandler(broken)
    try:
        assert invoke(instance, "CreateVolume", pb.CreateVolumeRequest(name="v")).volume.volume_id == "1:fast:v-1"
        assert invoke(instance, "Probe", pb.ProbeRequest()) == pb.ProbeResponse()
        with pytest.raises(grpc.RpcError) as caught:
            invoke(instance, "ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id="x"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        logging.getLogger("csi.server").removeHandler(broken)
        instance.stop()


def test_readiness_is_checked_sooner_until_first_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver not ready at start (a node agent's first report, a storage cluster still
    starting) is checked again within about a second, not a whole interval later; once
    it was ready, every interval."""
    from grpc_health.v1 import health_pb2

    import csi.server

    monkeypatch.setattr(csi.server, "HEALTH_INTERVAL", 3600.0)
    monkeypatch.setattr(csi.server, "FIRST_HEALTH_CHECK", 0.05)
    asked: list[float] = []

    def ready() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 4

    instance = Server(f"unix://{tmp_path}/s.sock", Services(Misbehaving(), None, None), ready=ready)
    instance.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        deadline = time.monotonic() + 30
        while instance.health.Check(health_pb2.HealthCheckRequest(), None).status != serving:
            assert time.monotonic() < deadline, f"not ready after {len(asked)} checks"
            time.sleep(0.02)
        time.sleep(0.5)
        assert len(asked) == 4, "once ready, the next check waits a whole interval"
    finally:
        instance.stop()
