"""The committed stubs are exactly what proto/generate.sh makes from the pinned CSI spec and
the pinned kubelet plugin-registration API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi.generated import csi_pb2 as pb
from csi.generated import pluginregistration_pb2 as registration_pb
from tests.support import require_tools

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "csi" / "generated"


def test_regeneration_reproduces_the_committed_stubs(tmp_path: Path) -> None:
    require_tools("go", "sha256sum")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True, env=env, timeout=600)
    produced = sorted(p.name for p in (tmp_path / "csi" / "generated").iterdir())
    assert produced == [
        "KUBELET_VERSION",
        "SPEC_VERSION",
        "csi_pb2.py",
        "csi_pb2.pyi",
        "csi_pb2_grpc.py",
        "pluginregistration_pb2.py",
        "pluginregistration_pb2.pyi",
        "pluginregistration_pb2_grpc.py",
    ]
    for name in produced:
        assert (tmp_path / "csi" / "generated" / name).read_bytes() == (GENERATED / name).read_bytes(), name


@pytest.mark.unit  # unlike the regeneration, which fetches the spec module
def test_wire_names_are_the_official_ones() -> None:
    assert pb.DESCRIPTOR.package == "csi.v1"
    assert {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()} >= {
        "csi.v1.Identity",
        "csi.v1.Controller",
        "csi.v1.Node",
    }
    assert (GENERATED / "SPEC_VERSION").read_text().strip() == "v1.12.0"


@pytest.mark.unit
def test_registration_wire_names_are_the_kubelets() -> None:
    """The kubelet dials /pluginregistration.Registration/GetInfo: the proto's package is
    ``pluginregistration`` (not ``...v1``), kept as released."""
    assert registration_pb.DESCRIPTOR.package == "pluginregistration"
    service = registration_pb.DESCRIPTOR.services_by_name["Registration"]
    assert [m.name for m in service.methods] == ["GetInfo", "NotifyRegistrationStatus"]
    assert [f.name for f in registration_pb.PluginInfo.DESCRIPTOR.fields] == [
        "type",
        "name",
        "endpoint",
        "supported_versions",
    ]
    assert (GENERATED / "KUBELET_VERSION").read_text().strip() == "v0.37.2"
