from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening.harness import PROFILES, Profile, local_profile, lvm_profile, nfs_profile, rbd_profile


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Profile]:
    """Each hardening test runs once per backend; rbd brings the session's Ceph cluster
    and must leave its pool as it found it; nfs brings the session's NFS server, and
    removes its folders from the export afterwards; lvm brings a volume group of its own;
    local-routed brings the session's API server. A test that a known defect
    of the backend fails every time is marked xfail(strict=True) with it as the reason."""
    if request.param == "rbd":
        ceph = request.getfixturevalue("ceph")
        request.getfixturevalue("clean_pool")
        made = rbd_profile(tmp_path, ceph)
    elif request.param == "nfs":
        made = nfs_profile(tmp_path, request.getfixturevalue("nfs_server"))
    elif request.param == "lvm":
        made = lvm_profile(tmp_path)
    elif request.param == "local-routed":
        made = local_profile(tmp_path, request.getfixturevalue("api_server"))
    else:
        made = local_profile(tmp_path)
    defect = made.known_defects.get(request.node.originalname)
    if defect:
        request.applymarker(pytest.mark.xfail(strict=True, reason=defect))
    try:
        yield made
    finally:
        made.close()
