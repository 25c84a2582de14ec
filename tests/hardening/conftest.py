from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening.harness import PROFILES, Profile, local_profile, rbd_profile


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest, tmp_path: Path) -> Profile:
    """Each hardening test runs once per backend; rbd brings the session's Ceph cluster
    and must leave its pool as it found it."""
    if request.param == "rbd":
        ceph = request.getfixturevalue("ceph")
        request.getfixturevalue("clean_pool")
        return rbd_profile(tmp_path, ceph)
    return local_profile(tmp_path)
