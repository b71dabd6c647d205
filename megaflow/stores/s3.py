"""S3 artifact store (``s3://bucket/prefix``) through boto3, for AWS, MinIO and other S3-compatible stores.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws, instance roles). Requests retry in botocore's "standard" mode; blobs above
``multipart_threshold`` are uploaded in parts. Create the store after fork.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, TypeVar

from megaflow.core.errors import ConfigError, NotFoundError, ServiceUnavailableError
from megaflow.stores.local import check_key

T = TypeVar("T")
MiB = 1024 * 1024

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix`` (the prefix has no leading or trailing slash)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"MEGAFLOW_ARTIFACTS_URL: expected s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"MEGAFLOW_ARTIFACTS_URL: no bucket in {url!r} (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


class S3ArtifactStore:
    """ArtifactStore on an S3 bucket under a key prefix; URIs are ``s3://bucket/prefix/KEY``.

    ``max_attempts`` counts every try of one request (1: no retry); retried are throttling, 5xx
    and connection errors, with botocore's standard back-off. Blobs of ``multipart_threshold``
    bytes or more go up in ``multipart_chunksize`` parts, ``max_concurrency`` at a time.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        client: Any = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url
        where = f" at {endpoint_url}" if endpoint_url else ""
        self._where = f"artifact store {self.url}{where}"
        self._owns_client = client is None
        if client is None:
            options: dict[str, Any] = {
                "retries": {"mode": "standard", "total_max_attempts": max_attempts},  # the first try included
                "connect_timeout": connect_timeout_s,
                "read_timeout": read_timeout_s,
                "max_pool_connections": max(10, max_concurrency * 2),
            }
            if endpoint_url:
                # Path-style addressing and checksums only when required: what MinIO, Ceph and
                # most other S3-compatible servers accept.
                options["s3"] = {"addressing_style": "path"}
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options)
            )
        self.client = client
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )

    # --- addressing ------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, uri_or_key: str) -> str:
        if uri_or_key.startswith("s3://"):
            root = self.url.rstrip("/") + "/"
            if not uri_or_key.startswith(root):
                raise NotFoundError(f"artifact {uri_or_key} is not in the store {self.url}")
            return check_key(uri_or_key[len(root) :])
        if "://" in uri_or_key:
            raise NotFoundError(f"artifact {uri_or_key} is not in the store {self.url}")
        return check_key(uri_or_key)

    def uri(self, key: str) -> str:
        """The URI of ``key`` in this store."""
        return f"{self.url.rstrip('/')}/{check_key(key)}"

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from botocore import exceptions as bex

        try:
            return fn(*args, **kwargs)
        except (
            bex.EndpointConnectionError,
            bex.ConnectTimeoutError,
            bex.ReadTimeoutError,
            bex.ConnectionClosedError,
        ) as exc:
            raise ServiceUnavailableError(f"{self._where} is unreachable: {exc}") from exc
        except bex.NoCredentialsError as exc:
            raise ConfigError(
                f"MEGAFLOW_ARTIFACTS_URL: no AWS credentials for {self.url}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from exc
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                where = f" at {self.endpoint_url}" if self.endpoint_url else ""
                raise ConfigError(f"MEGAFLOW_ARTIFACTS_URL: bucket {self.bucket!r} does not exist{where}") from exc
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise ConfigError(
                    f"MEGAFLOW_ARTIFACTS_URL: access to {self.url} denied ({code}); check the AWS credentials"
                ) from exc
            if code in ("SlowDown", "ServiceUnavailable", "InternalError", "500", "503"):
                raise ServiceUnavailableError(f"{self._where} failed after retries: {exc}") from exc
            raise

    # --- ArtifactStore ---------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        key = check_key(key)
        self._call(
            self.client.upload_fileobj,
            io.BytesIO(data),
            self.bucket,
            self._full(key),
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer,
        )
        return self.uri(key)

    def get_bytes(self, uri_or_key: str) -> bytes:
        from botocore.exceptions import ClientError

        key = self._key(uri_or_key)
        buf = io.BytesIO()
        try:
            self._call(self.client.download_fileobj, self.bucket, self._full(key), buf, Config=self.transfer)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_CODES:
                raise NotFoundError(f"artifact {key} not found in {self.url}") from None
            raise
        return buf.getvalue()

    def exists(self, uri_or_key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            key = self._key(uri_or_key)
        except NotFoundError:
            return False
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_CODES:
                return False
            raise
        return True

    def delete(self, uri_or_key: str) -> None:
        try:
            key = self._key(uri_or_key)
        except NotFoundError:
            return
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._full(key))

    def list(self, prefix: str = "") -> list[str]:
        full = self._full(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._call(run)

    def close(self) -> None:
        """Release the HTTP connection pool (of a client this store made)."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"S3ArtifactStore({self.url!r}, endpoint_url={self.endpoint_url!r})"
