"""Metadata and artifact stores, chosen by URL scheme; backends are imported only when chosen.

    open_metadata_store("sqlite:////var/lib/megaflow/megaflow.db")
    open_metadata_store("mongodb://user:pass@db1:27017/megaflow", settings)
    open_artifact_store("file:///var/lib/megaflow/artifacts")
    open_artifact_store("s3://bucket/prefix", settings)   # settings.s3_endpoint_url for MinIO

Call these in an entry point or after fork (worker_process_init), never at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaflow.core.errors import ConfigError
from megaflow.stores.base import ArtifactStore, MetadataStore
from megaflow.stores.common import redact_url

if TYPE_CHECKING:
    from megaflow.core.settings import Settings

__all__ = ["ArtifactStore", "MetadataStore", "open_artifact_store", "open_metadata_store"]


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def open_metadata_store(url: str, settings: Settings | None = None) -> MetadataStore:
    """The metadata store named by ``url``: ``sqlite:///PATH`` or ``mongodb://...``."""
    scheme = _scheme(url or "")
    if scheme == "sqlite":
        from megaflow.stores.sqlite import SQLiteMetadataStore

        return SQLiteMetadataStore(url)
    if scheme in ("mongodb", "mongodb+srv"):
        from megaflow.stores.mongo import MongoMetadataStore

        return MongoMetadataStore(url, ttl_days=settings.mongo_ttl_days if settings else None)
    raise ConfigError(
        f"MEGAFLOW_METADATA_URL: unknown metadata store {redact_url(url)!r}; "
        "use sqlite:////abs/path/megaflow.db or mongodb://user:pass@host:27017/megaflow"
    )


def open_artifact_store(url: str, settings: Settings | None = None) -> ArtifactStore:
    """The artifact store named by ``url``: ``file:///DIR`` or ``s3://bucket/prefix``."""
    scheme = _scheme(url or "")
    if scheme == "file":
        from megaflow.stores.local import LocalArtifactStore

        return LocalArtifactStore(url)
    if scheme == "s3":
        from megaflow.stores.s3 import S3ArtifactStore

        return S3ArtifactStore(
            url,
            endpoint_url=settings.s3_endpoint_url if settings else None,
            region=settings.s3_region if settings else None,
        )
    raise ConfigError(
        f"MEGAFLOW_ARTIFACTS_URL: unknown artifact store {redact_url(url)!r}; use file:///abs/dir or s3://bucket/prefix"
    )
