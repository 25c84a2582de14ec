"""Identity: Probe feeds the liveness probe and stays ready while a backend is unwell
(restarting the plugin mends no backend); readiness follows backend health."""

from __future__ import annotations

from typing import cast

from csi.backends.base import Backend, VolumeBackend
from csi.backends.rbd import CAPABILITIES
from csi.generated import csi_pb2 as pb
from csi.identity import IdentityService
from csi.registry import Registry


class Unwell:
    def health(self) -> str | None:
        return "the monitors 127.0.0.1:1 did not answer"


def test_probe_stays_ready_while_readiness_follows_backend_health() -> None:
    unwell = Backend("ceph", "rbd", None, CAPABILITIES, cast(VolumeBackend, Unwell()), None)
    identity = IdentityService(Registry([unwell]), controller=True)
    assert identity.Probe(pb.ProbeRequest(), None).ready.value is True
    assert identity.ready() is False
