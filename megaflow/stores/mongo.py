"""MongoDB metadata store for clusters (``mongodb://user:pass@host:27017/megaflow``).

Collections in the URL's database (default ``megaflow``):
  tasks   one document per episode, ``_id`` = episode_id; indexes (user, state),
          (batch_id, created_at), phases.finished, created_at
  events  one document per event, ``_id`` = event_id; index (episode_id, stream order);
          with ``ttl_days`` a TTL index on ``_created`` (the event's ``ts`` as a datetime) expires
          events older than that

Writes are idempotent: tasks upsert with $set (dotted ``phases.<k>`` keys, so phases merge) and
$min on created_at, and a stale write (older ``updated_at``) merges only its phases; events insert
by ``_id`` and a duplicate is reported, not raised. Create the store after fork (PyMongo clients
must not cross one); it connects, and creates its indexes, on the first operation.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from megaflow.core.errors import ConfigError, ServiceUnavailableError
from megaflow.stores.common import (
    STICKY_MIN_FIELDS,
    check_event,
    check_task_doc,
    created_candidate,
    redact_url,
    stream_order,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

TTL_INDEX = "events_ttl"
# Fields the store adds to event documents for ordering and expiry; never returned.
_EVENT_INTERNAL = ("_id", "_sms", "_sseq", "_created")


def _pymongo_errors() -> tuple[type[BaseException], ...]:
    from pymongo import errors

    return (errors.ConnectionFailure, errors.ServerSelectionTimeoutError, errors.ConfigurationError)


class MongoMetadataStore:
    """MetadataStore on MongoDB (or any client with PyMongo's API, e.g. mongomock in tests)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_days: float | None = None,
        client: Any = None,
        server_selection_timeout_ms: int = 10_000,
    ):
        self.url = url
        self.safe_url = redact_url(url)
        self.ttl_days = ttl_days
        from pymongo import uri_parser

        try:
            parsed = uri_parser.parse_uri(url, warn=True)
        except Exception as exc:  # InvalidURI, ConfigurationError, ValueError
            raise ConfigError(f"MEGAFLOW_METADATA_URL: bad MongoDB URL {self.safe_url!r}: {exc}") from exc
        db_name = parsed["database"] or "megaflow"
        if client is None:
            from pymongo import MongoClient

            options: dict[str, Any] = {"connect": False, "tz_aware": True}
            if "serverSelectionTimeoutMS" not in parsed["options"]:  # options in the URL win
                options["serverSelectionTimeoutMS"] = server_selection_timeout_ms
            if "appname" not in parsed["options"]:
                options["appname"] = "megaflow"
            client = MongoClient(url, **options)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        self.db = client[db_name]
        self.tasks = self.db["tasks"]
        self.event_docs = self.db["events"]
        self._indexed = False
        self._index_lock = threading.Lock()

    def ensure_indexes(self) -> None:
        """Create the indexes (and TTL) once; done by the first operation, so the constructor does no I/O."""
        with self._index_lock:
            if not self._indexed:
                self._guard(self._ensure_indexes)
                self._indexed = True

    # --- plumbing --------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._indexed:
            self.ensure_indexes()
        return self._guard(fn, *args, **kwargs)

    def _guard(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn``, turning PyMongo's connection and auth failures into MegaFlow errors."""
        try:
            return fn(*args, **kwargs)
        except _pymongo_errors() as exc:
            raise ServiceUnavailableError(f"metadata store {self.safe_url} is unreachable: {exc}") from exc
        except Exception as exc:
            code = getattr(exc, "code", None)
            from pymongo.errors import OperationFailure

            if isinstance(exc, OperationFailure) and code in (13, 18):  # Unauthorized, AuthenticationFailed
                raise ConfigError(
                    f"MEGAFLOW_METADATA_URL: MongoDB refused the credentials of {self.safe_url}: {exc}"
                ) from exc
            raise

    def _ensure_indexes(self) -> None:
        from pymongo.errors import OperationFailure

        self.tasks.create_index([("user", 1), ("state", 1)], name="user_state")
        self.tasks.create_index([("batch_id", 1), ("created_at", 1)], name="batch_created")
        self.tasks.create_index([("phases.finished", 1)], name="finished")
        self.tasks.create_index([("created_at", 1)], name="created")
        self.event_docs.create_index([("episode_id", 1), ("_sms", 1), ("_sseq", 1)], name="episode_order")
        existing = self.event_docs.index_information()
        if self.ttl_days is None:
            return  # an existing TTL index is left alone: retention is switched off by dropping it on purpose
        seconds = int(self.ttl_days * 86400)
        current = existing.get(TTL_INDEX, {}).get("expireAfterSeconds")
        if current is None:
            self.event_docs.create_index([("_created", 1)], name=TTL_INDEX, expireAfterSeconds=seconds)
        elif current != seconds:
            try:
                self.db.command(
                    {"collMod": self.event_docs.name, "index": {"name": TTL_INDEX, "expireAfterSeconds": seconds}}
                )
            except NotImplementedError:  # mongomock has no collMod
                self.event_docs.drop_index(TTL_INDEX)
                self.event_docs.create_index([("_created", 1)], name=TTL_INDEX, expireAfterSeconds=seconds)
            except OperationFailure as exc:  # e.g. a user without collMod rights: keep working, say so
                log.warning("could not change the events TTL to %s days on %s: %s", self.ttl_days, self.safe_url, exc)

    @staticmethod
    def _task_out(doc: dict[str, Any] | None) -> dict[str, Any] | None:
        if doc is None:
            return None
        doc.pop("_id", None)
        return doc

    @staticmethod
    def _event_out(doc: dict[str, Any]) -> dict[str, Any]:
        for key in _EVENT_INTERNAL:
            doc.pop(key, None)
        return doc

    @staticmethod
    def _match(**filters: Any) -> dict[str, Any]:
        return {k: v for k, v in filters.items() if v is not None}

    # --- MetadataStore ---------------------------------------------------------------------------
    def upsert_task(self, doc: dict[str, Any]) -> None:
        from pymongo.errors import DuplicateKeyError

        episode_id = check_task_doc(doc)
        phases = {f"phases.{k}": t for k, t in (doc.get("phases") or {}).items()}
        fields = {k: v for k, v in doc.items() if k not in ("phases", "_id") and k not in STICKY_MIN_FIELDS}
        created = {"created_at": created_candidate(doc)}
        full: dict[str, Any] = {"$min": created, "$set": {**fields, **phases}}
        if not phases:
            full["$setOnInsert"] = {"phases": {}}
        if not full["$set"]:
            del full["$set"]
        updated_at = doc.get("updated_at")
        if not isinstance(updated_at, (int, float)):
            self._call(self.tasks.update_one, {"_id": episode_id}, full, upsert=True)
            return
        # Apply the fields only if nothing newer is stored; when something is, the upsert collides
        # with the existing _id and only the phases (and created_at) are merged.
        fresh = {"_id": episode_id, "updated_at": {"$not": {"$gt": updated_at}}}
        try:
            self._call(self.tasks.update_one, fresh, full, upsert=True)
        except DuplicateKeyError:
            stale: dict[str, Any] = {"$min": created}
            if phases:
                stale["$set"] = phases
            self._call(self.tasks.update_one, {"_id": episode_id}, stale)

    def add_event(self, event: dict[str, Any]) -> bool:
        from pymongo.errors import DuplicateKeyError

        event_id = check_event(event)
        ms, seq = stream_order(event)
        ts = event.get("ts")
        created = (
            dt.datetime.fromtimestamp(float(ts), dt.UTC) if isinstance(ts, (int, float)) else dt.datetime.now(dt.UTC)
        )
        doc = {**event, "_id": event_id, "_sms": ms, "_sseq": seq, "_created": created}
        try:
            self._call(self.event_docs.insert_one, doc)
        except DuplicateKeyError:
            return False
        return True

    def get_task(self, episode_id: str) -> dict[str, Any] | None:
        return self._task_out(self._call(self.tasks.find_one, {"_id": episode_id}))

    def find_tasks(
        self,
        *,
        batch_id: str | None = None,
        user: str | None = None,
        state: str | None = None,
        finished_after: float | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        if limit is not None and limit <= 0:
            return []
        query = self._match(batch_id=batch_id, user=user, state=state)
        if finished_after is not None:
            query["phases.finished"] = {"$gte": finished_after}

        def run() -> list[dict[str, Any]]:
            cursor = self.tasks.find(query).sort([("created_at", 1), ("_id", 1)])
            if limit is not None:
                cursor = cursor.limit(int(limit))
            return [self._task_out(d) for d in cursor]  # type: ignore[misc]

        return self._call(run)

    def events(self, episode_id: str) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            cursor = self.event_docs.find({"episode_id": episode_id}).sort([("_sms", 1), ("_sseq", 1), ("_id", 1)])
            return [self._event_out(d) for d in cursor]

        return self._call(run)

    def count_by_state(self, *, batch_id: str | None = None, user: str | None = None) -> dict[str, int]:
        pipeline = [
            {"$match": self._match(batch_id=batch_id, user=user)},
            {"$group": {"_id": "$state", "n": {"$sum": 1}}},
        ]
        return {r["_id"]: r["n"] for r in self._call(lambda: list(self.tasks.aggregate(pipeline)))}

    def list_batches(self, *, user: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        match: dict[str, Any] = {"batch_id": {"$ne": None}, **self._match(user=user)}
        pipeline = [
            {"$match": match},
            {
                "$group": {
                    "_id": "$batch_id",
                    "user": {"$min": "$user"},
                    "total": {"$sum": 1},
                    "created_at": {"$min": "$created_at"},
                }
            },
            {"$sort": {"created_at": -1, "_id": 1}},
            {"$limit": int(limit)},
        ]
        rows = self._call(lambda: list(self.tasks.aggregate(pipeline)))
        return [
            {"batch_id": r["_id"], "user": r["user"], "total": r["total"], "created_at": r["created_at"]} for r in rows
        ]

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"MongoMetadataStore({self.safe_url!r})"
