"""A store in an S3-compatible bucket (AWS S3, Ceph's RADOS gateway, MinIO, ...).

Each object is one S3 object under the store's prefix; a ``put`` is one PutObject, which
S3 makes atomic (a reader sees the old object or the new one, never part), so the store
keeps its promises without temporary names. The bucket is the operator's: the store never
creates or deletes it, and a missing bucket is a FAILED_PRECONDITION naming it.

Errors are classified once, here: the server unreachable or failing (after the client's
own retries) is UNAVAILABLE, refused credentials or permissions FAILED_PRECONDITION, a
full quota RESOURCE_EXHAUSTED. Messages name the bucket and endpoint, never the secret
key (the store does not keep it)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
from botocore import exceptions as boto  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from csi.backup.store import Stored
from csi.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

SETTINGS = frozenset({"endpoint", "bucket", "prefix", "region", "verifyTLS", "caBundle"})
"""The keys ``S3Settings.parse`` reads; a caller rejecting unknown keys allows these."""

# Relaxed bucket names: S3's rules, plus the upper case and underscores older Ceph and
# AWS buckets may have. Path-style addressing carries any of them.
BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
DEFAULT_REGION = "us-east-1"
"""What SigV4 signs with when no region is set; S3-compatible servers accept it."""

PAGE_SIZE = 1000
"""Keys per ListObjectsV2 page: S3's maximum."""
ATTEMPTS = 4
"""Tries of each request (the client's standard retry mode backs off between them)."""
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
"""Seconds without a byte from the server before a request is retried: a chunk of a few
MiB is written well within it on any link a backup can use."""

# Error codes that mean the credentials or the permissions are wrong: the operator must act.
DENIED = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "UserSuspended",
    }
)
# Error codes that mean "try again later" although their status is not 5xx.
TRANSIENT = frozenset({"RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError", "Throttling"})

# Client-side failures that a later try may not meet: the server unreachable, the
# connection cut, a body cut short or garbled on the way.
UNREACHABLE = (
    boto.ConnectionError,
    boto.HTTPClientError,
    boto.IncompleteReadError,
    boto.ChecksumError,
    boto.FlexibleChecksumError,
)


@dataclass(frozen=True)
class S3Settings:
    """Where a store's objects live: a bucket (and a prefix in it) at an endpoint."""

    endpoint: str
    """``https://host[:port]`` or ``http://host:port``; "" for AWS's own endpoint."""
    bucket: str
    prefix: str = ""
    """Keys live under it; a missing trailing "/" is added ("cluster-a" -> "cluster-a/")."""
    region: str = ""
    verify_tls: bool | str = True
    """Whether to check the server's certificate, or the path of the CA bundle to check it with."""

    def __post_init__(self) -> None:
        prefix = self.prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "endpoint", self.endpoint.rstrip("/"))

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint or 'AWS S3'}"

    @classmethod
    def parse(cls, settings: Mapping[str, Any], where: str) -> S3Settings:
        """The settings of a configuration entry (keys ``endpoint``, ``bucket``, ``prefix``,
        ``region``, ``verifyTLS``, ``caBundle``); ConfigError naming ``where`` for a bad
        or missing value. Other keys are the caller's (see SETTINGS)."""
        for key in ("endpoint", "bucket", "prefix", "region", "caBundle"):
            if key in settings and not isinstance(settings[key], str):
                raise ConfigError(f"{where}: {key!r} must be a string")
        endpoint: str = settings.get("endpoint", "")
        if endpoint:
            _check_endpoint(endpoint, where)
        bucket: str = settings.get("bucket", "")
        if not bucket:
            raise ConfigError(f"{where}: 'bucket' is required (an existing bucket: it is not created)")
        if not BUCKET.match(bucket) or ".." in bucket:
            raise ConfigError(f"{where}: 'bucket' {bucket!r} is not a valid bucket name")
        region: str = settings.get("region", "")
        if region and not re.fullmatch(r"[A-Za-z0-9_-]+", region):
            raise ConfigError(f"{where}: 'region' {region!r} is not a region name")
        verify = settings.get("verifyTLS", True)
        if not isinstance(verify, bool):
            raise ConfigError(f"{where}: 'verifyTLS' must be true or false")
        bundle: str = settings.get("caBundle", "")
        if bundle:
            if not verify:
                raise ConfigError(f"{where}: 'caBundle' is set but 'verifyTLS' is false; set one of them")
            if not bundle.startswith("/"):
                raise ConfigError(f"{where}: 'caBundle' must be an absolute path, not {bundle!r}")
        return cls(
            endpoint=endpoint,
            bucket=bucket,
            prefix=settings.get("prefix", ""),
            region=region,
            verify_tls=bundle or verify,
        )


def _check_endpoint(endpoint: str, where: str) -> None:
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018  (raises for a bad port)
    except ValueError:
        raise ConfigError(f"{where}: 'endpoint' is not a URL") from None
    if parts.username is not None or parts.password is not None:
        # never echoed: it would print the credentials it carries
        raise ConfigError(f"{where}: 'endpoint' must not carry credentials (they go in the secret)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: 'endpoint' must be http(s)://host[:port], not {endpoint!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: 'endpoint' must be http(s)://host[:port] without a path, not {endpoint!r}")


class S3Store:
    """A ``Store`` in an S3 bucket, through boto3 (whose clients are thread-safe)."""

    def __init__(
        self,
        settings: S3Settings,
        access_key: str,
        secret_key: str,
        *,
        page_size: int = PAGE_SIZE,
        attempts: int = ATTEMPTS,
    ) -> None:
        self.settings = settings
        self.page_size = page_size
        if not access_key or not secret_key:
            # boto3 would otherwise look for credentials elsewhere (environment, instance metadata)
            raise ConfigError(f"{self.where}: the S3 access key or secret key is empty")
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": attempts},
            signature_version="s3v4",
            # Path-style requests (host/bucket/key) reach any S3-compatible server without
            # DNS for each bucket; AWS itself is left to choose.
            s3={"addressing_style": "path" if settings.endpoint else "auto"},
            # Only the checksums S3 requires: the newer default (trailing CRC32 in
            # aws-chunked bodies) is refused by many S3-compatible servers. ``put`` sends
            # Content-MD5, which all of them check.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=settings.region or DEFAULT_REGION,
        )
        self._client: Any = session.client(
            "s3", endpoint_url=settings.endpoint or None, verify=settings.verify_tls, config=config
        )
        self._bucket_seen = False
        """Whether a request has found the bucket: a 404 from HeadObject then means the key."""

    @property
    def where(self) -> str:
        return self.settings.where

    def _key(self, key: str) -> str:
        if not key:
            raise InvalidArgument(f"an empty key in {self.where}")
        return self.settings.prefix + key

    def put(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            self._client.put_object(Bucket=self.settings.bucket, Key=self._key(key), Body=data, ContentMD5=md5)
        except (boto.BotoCoreError, boto.ClientError) as exc:
            self._fail(exc, "write", key)
        self._bucket_seen = True

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.settings.bucket, Key=self._key(key))
            with response["Body"] as body:
                data: bytes = body.read()
        except (boto.BotoCoreError, boto.ClientError) as exc:
            self._fail(exc, "read", key)
        self._bucket_seen = True
        return data

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.settings.bucket, Key=self._key(key))
        except boto.ClientError as exc:
            if _status(exc) != 404:
                self._fail(exc, "look up", key)
            # HEAD has no body to say whether the key or the bucket is missing
            self._check_bucket()
            return False
        except boto.BotoCoreError as exc:
            self._fail(exc, "look up", key)
        self._bucket_seen = True
        return True

    def delete(self, key: str) -> None:
        """One DeleteObject; S3 answers a missing key with success."""
        try:
            self._client.delete_object(Bucket=self.settings.bucket, Key=self._key(key))
        except boto.ClientError as exc:
            if _code(exc) != "NoSuchKey":
                self._fail(exc, "delete", key)
        except boto.BotoCoreError as exc:
            self._fail(exc, "delete", key)

    def sweep(self, before: float) -> int:
        """Nothing to sweep: a PutObject is atomic, and no multipart upload is begun."""
        return 0

    def list(self, prefix: str = "") -> Iterator[Stored]:
        """ListObjectsV2, page by page. S3 lists keys in the order of their UTF-8 bytes,
        which is the order of Python's strings: the listing streams in key order."""
        base = self.settings.prefix
        request: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": base + prefix, "MaxKeys": self.page_size}
        while True:
            try:
                page = self._client.list_objects_v2(**request)
            except (boto.BotoCoreError, boto.ClientError) as exc:
                self._fail(exc, "list", prefix + "*")
            self._bucket_seen = True
            for entry in page.get("Contents", ()):
                yield Stored(entry["Key"][len(base) :], int(entry["Size"]), entry["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token

    def _check_bucket(self) -> None:
        """Raise unless the bucket exists and is ours to read; once per store."""
        if self._bucket_seen:
            return
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except (boto.BotoCoreError, boto.ClientError) as exc:
            if isinstance(exc, boto.ClientError) and _status(exc) == 404:
                self._no_bucket(exc)
            self._fail(exc, "look up", "the bucket")
        self._bucket_seen = True

    def _no_bucket(self, exc: Exception) -> NoReturn:
        raise FailedPrecondition(
            f"S3 bucket {self.settings.bucket!r} does not exist at {self.settings.endpoint or 'AWS S3'}:"
            " create it (the store does not)"
        ) from exc

    def _fail(self, exc: boto.BotoCoreError | boto.ClientError, doing: str, key: str) -> NoReturn:
        """Raise the domain error for a failed request on ``key``."""
        what = f"cannot {doing} {key!r} in {self.where}"
        if isinstance(exc, boto.ClientError):
            code, status = _code(exc), _status(exc)
            detail = f"{code}: {_message(exc)}" if _message(exc) else code
            if code == "NoSuchBucket":
                self._no_bucket(exc)
            if code in ("NoSuchKey", "404") or (status == 404 and doing == "read"):
                raise NotFound(f"no object {key!r} in {self.where}") from exc
            if code == "QuotaExceeded":
                raise ResourceExhausted(f"{what}: the quota is used up ({detail})") from exc
            if code in DENIED or status in (401, 403):
                raise FailedPrecondition(
                    f"{what}: access denied ({detail}); check the credentials and the bucket's policy"
                ) from exc
            if code in TRANSIENT or status >= 500:
                raise Unavailable(f"{what}: the server failed ({detail}); retry later") from exc
            raise FailedPrecondition(f"{what}: the server refused ({detail})") from exc
        if isinstance(exc, boto.SSLError):
            raise FailedPrecondition(f"{what}: TLS failed ({exc}); check verifyTLS and caBundle") from exc
        if isinstance(exc, UNREACHABLE):
            raise Unavailable(f"{what}: {exc}") from exc
        raise exc


def _code(exc: boto.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(_status(exc))


def _status(exc: boto.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _message(exc: boto.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))
