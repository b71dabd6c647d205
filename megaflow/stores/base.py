"""Store protocols: the metadata store (task and event documents) and the artifact store.

Backends are chosen by URL scheme (``sqlite:///``, ``mongodb://``; ``file://``, ``s3://``) and
imported lazily. Every backend passes the same contract tests (tests/test_stores_contract.py).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

# A task document (one per episode), keyed by "episode_id". Top-level fields the engine writes:
#   episode_id, batch_id, user, task_id, state, attempt, reward, cause, host, image, mode,
#   artifact_uri, steps, prompt_tokens, completion_tokens, policy_version, error,
#   created_at, updated_at (unix seconds, float)
#   phases: {"submitted": t, "queued": t, "admitted": t, "env_ready": t, "step_1": t, ...,
#            "evaluating": t, "finished": t}   (merged key by key on every upsert)
# An event document, keyed by "event_id" (the Redis stream entry id):
#   event_id, episode_id, batch_id, user, state, ts, data (dict)


@runtime_checkable
class MetadataStore(Protocol):
    """Task and event documents; every write is idempotent (the recorder is at-least-once)."""

    def upsert_task(self, doc: dict[str, Any]) -> None:
        """Insert or merge a task document by ``doc["episode_id"]``; ``phases`` merges key-wise."""

    def add_event(self, event: dict[str, Any]) -> bool:
        """Store an event document; False when ``event_id`` was stored already."""

    def get_task(self, episode_id: str) -> dict[str, Any] | None:
        """The task document, or None."""

    def find_tasks(
        self,
        *,
        batch_id: str | None = None,
        user: str | None = None,
        state: str | None = None,
        finished_after: float | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Task documents matching every given filter, oldest first (by created_at)."""

    def events(self, episode_id: str) -> list[dict[str, Any]]:
        """Event documents of one episode in stream order."""

    def count_by_state(self, *, batch_id: str | None = None, user: str | None = None) -> dict[str, int]:
        """{state: count} over the matching task documents."""

    def list_batches(self, *, user: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """[{batch_id, user, total, created_at}] newest first."""

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class ArtifactStore(Protocol):
    """Blobs (trajectories, patches, logs) addressed by key; returns URIs that name the blob."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` under ``key``; return its URI (file://... or s3://...)."""

    def get_bytes(self, uri_or_key: str) -> bytes:
        """The bytes stored under a URI returned by put_bytes, or under a key."""

    def exists(self, uri_or_key: str) -> bool:
        """Whether the blob exists."""

    def delete(self, uri_or_key: str) -> None:
        """Remove the blob (no error when missing)."""

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``."""
