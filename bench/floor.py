"""The floor of the benchmarks: a CSI server that does nothing, in Python with grpcio, so
what it costs per call is what Python and grpcio themselves cost.

It serves Identity, Controller and Node with the driver's server shape (a synchronous
``grpc.server`` on a pool of 8 worker threads, a unix socket), without the driver's
interceptor, validation, locks, logging or storage. Each handler answers the smallest
valid response:

- CreateVolume answers a volume named after the request (its size the size asked for)
  and remembers it in memory; DeleteVolume forgets it. CreateSnapshot and DeleteSnapshot
  likewise.
- ListVolumes pages through the remembered volumes in ID order (a sorted list and a
  bisection: each page costs what the page holds), so a listing of N volumes in pages of
  100 answers as many pages of the same size as the driver does.
- The node calls (stage, publish and their undoing) answer at once.

It runs in a process of its own, as the driver does, so it does not share the client's
interpreter (and its lock) with the benchmark:

    with floor_server(directory) as floor:
        floor.controller.CreateVolume(...)

or on its own: ``python bench/floor.py unix:///path/to/floor.sock``.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from tests.support import Stubs

WORKERS = 8  # the driver's default (--workers)
NODE_ID = "floor-node"


class FloorIdentity(pb_grpc.IdentityServicer):
    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name="floor.bench.cairn.csi.io", vendor_version="0")

    def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginCapabilitiesResponse:
        service = pb.PluginCapability.Service(type=pb.PluginCapability.Service.CONTROLLER_SERVICE)
        return pb.GetPluginCapabilitiesResponse(capabilities=[pb.PluginCapability(service=service)])

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        return pb.ProbeResponse(ready=BoolValue(value=True))


class FloorController(pb_grpc.ControllerServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._volumes: dict[str, int] = {}  # volume ID -> bytes
        self._order: list[str] = []  # volume IDs, sorted

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.CreateVolumeResponse:
        volume_id = f"floor-{request.name}"
        size = request.capacity_range.required_bytes
        with self._lock:
            if volume_id not in self._volumes:
                bisect.insort(self._order, volume_id)
            self._volumes[volume_id] = size
        return pb.CreateVolumeResponse(volume=pb.Volume(volume_id=volume_id, capacity_bytes=size))

    def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext) -> pb.DeleteVolumeResponse:
        with self._lock:
            if self._volumes.pop(request.volume_id, None) is not None:
                del self._order[bisect.bisect_left(self._order, request.volume_id)]
        return pb.DeleteVolumeResponse()

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext) -> pb.ListVolumesResponse:
        """The page after ``starting_token`` (the last ID of the previous page)."""
        limit = request.max_entries or 1 << 31
        with self._lock:
            start = bisect.bisect_right(self._order, request.starting_token) if request.starting_token else 0
            page = [(v, self._volumes[v]) for v in self._order[start : start + limit]]
            more = start + limit < len(self._order)
        entries = [pb.ListVolumesResponse.Entry(volume=pb.Volume(volume_id=v, capacity_bytes=b)) for v, b in page]
        return pb.ListVolumesResponse(entries=entries, next_token=page[-1][0] if more and page else "")

    def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.CreateSnapshotResponse:
        created = Timestamp()
        created.GetCurrentTime()
        snapshot = pb.Snapshot(
            snapshot_id=f"floor-snap-{request.name}",
            source_volume_id=request.source_volume_id,
            size_bytes=self._volumes.get(request.source_volume_id, 0),
            creation_time=created,
            ready_to_use=True,
        )
        return pb.CreateSnapshotResponse(snapshot=snapshot)

    def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSnapshotResponse:
        return pb.DeleteSnapshotResponse()

    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        kinds = pb.ControllerServiceCapability.RPC
        capabilities = [
            pb.ControllerServiceCapability(rpc=kinds(type=t))
            for t in (kinds.CREATE_DELETE_VOLUME, kinds.CREATE_DELETE_SNAPSHOT, kinds.LIST_VOLUMES)
        ]
        return pb.ControllerGetCapabilitiesResponse(capabilities=capabilities)


class FloorNode(pb_grpc.NodeServicer):
    def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeStageVolumeResponse:
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnstageVolumeResponse:
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnpublishVolumeResponse:
        return pb.NodeUnpublishVolumeResponse()

    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        stage = pb.NodeServiceCapability.RPC(type=pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME)
        return pb.NodeGetCapabilitiesResponse(capabilities=[pb.NodeServiceCapability(rpc=stage)])

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=NODE_ID)


def serve(endpoint: str, workers: int = WORKERS) -> grpc.Server:
    """Start the do-nothing server on ``endpoint`` (``unix:///path``) in this process."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_IdentityServicer_to_server(FloorIdentity(), server)
    pb_grpc.add_ControllerServicer_to_server(FloorController(), server)
    pb_grpc.add_NodeServicer_to_server(FloorNode(), server)
    if server.add_insecure_port(endpoint) == 0:
        raise RuntimeError(f"cannot listen on {endpoint}")
    server.start()
    return server


class Floor(Stubs):
    """A client of the do-nothing server running in its own process: the same stubs as
    the driver's test handle offers."""

    def __init__(self, process: subprocess.Popen[bytes], channel: grpc.Channel) -> None:
        self.process = process
        self.channel: grpc.Channel | None = channel


@contextlib.contextmanager
def floor_server(directory: Path, workers: int = WORKERS) -> Iterator[Floor]:
    """The do-nothing server on ``directory``/floor.sock, in a process of its own, for the
    duration of the block; stopped (and its socket removed) at the end."""
    socket = directory / "floor.sock"
    argv = [sys.executable, str(Path(__file__).resolve()), f"unix://{socket}", str(workers)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    channel: grpc.Channel | None = None
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if process.poll() is not None:
                raise RuntimeError(f"the do-nothing server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the do-nothing server did not create its socket")
            time.sleep(0.02)
        channel = grpc.insecure_channel(f"unix://{socket}")
        grpc.channel_ready_future(channel).result(timeout=30)
        yield Floor(process, channel)
    finally:
        if channel is not None:
            channel.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


def main() -> None:
    endpoint = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else WORKERS
    server = serve(endpoint, workers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait()
    if endpoint.startswith("unix://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.removeprefix("unix://"))


if __name__ == "__main__":
    main()
