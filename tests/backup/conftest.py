"""The backup tests' S3 server: a RADOS gateway in front of the session's Ceph cluster,
started only by the tests that ask for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.ceph import CephCluster, RadosGateway
from tests.support import require_tools


@dataclass(frozen=True)
class S3Server:
    """An S3 endpoint with a user and an empty bucket of that user's."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    gateway: RadosGateway
    """For more users (``create_user``) and the gateway's log."""


@pytest.fixture(scope="session")
def rgw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One gateway for the session; each test keeps to its own prefix in the bucket."""
    require_tools("radosgw", "radosgw-admin")  # before the cluster starts for nothing
    cluster: CephCluster = request.getfixturevalue("ceph")
    gateway = RadosGateway(cluster, tmp_path_factory.mktemp("rgw"))
    try:
        gateway.start()
        tag = uuid.uuid4().hex[:8]
        access_key, secret_key = gateway.create_user(f"cairn-{tag}")
        bucket = f"backups-{tag}"
        import boto3  # type: ignore[import-untyped]

        boto3.session.Session().client(
            "s3",
            endpoint_url=gateway.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield S3Server(gateway.endpoint, access_key, secret_key, bucket, gateway)
    finally:
        gateway.stop()
