"""The CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi import DRIVER_NAME, __version__
from csi.backends.base import Expansion as VolumeGrowth
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.registry import Registry

log = logging.getLogger(__name__)

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, registry: Registry, controller: bool, snapshot_metadata: bool = False) -> None:
        self.registry = registry
        self.controller = controller
        self.snapshot_metadata = snapshot_metadata

    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginCapabilitiesResponse:
        services = [Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self.controller:
            services.insert(0, Service.CONTROLLER_SERVICE)
        if self.snapshot_metadata:
            services.append(Service.SNAPSHOT_METADATA_SERVICE)
        capabilities = [pb.PluginCapability(service=Service(type=s)) for s in services]
        growth = {b.capabilities.expansion for b in self.registry}
        if VolumeGrowth.ONLINE in growth:
            capabilities.append(pb.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)))
        elif VolumeGrowth.OFFLINE in growth:
            capabilities.append(pb.PluginCapability(volume_expansion=Expansion(type=Expansion.OFFLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=capabilities)

    def ready(self) -> bool:
        """Whether every backend is healthy, as far as this process's role goes (a node
        plugin checks its node halves only); what is wrong is logged."""
        problems = {b.name: p for b in self.registry if (p := b.health())}
        if problems:
            log.warning("not ready", extra={"problems": problems})
        return not problems

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        """Ready once serving. Probe drives the liveness probe, and restarting the plugin
        mends no backend: an unreachable cluster would only cost the node its rbd-nbd
        daemons. Backend health goes to the readiness probe (grpc.health.v1) and the
        scheduler, which places new volumes on healthy backends only."""
        return pb.ProbeResponse(ready=BoolValue(value=True))
