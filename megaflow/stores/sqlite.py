"""SQLite metadata store: the embedded default on one machine (``sqlite:///PATH``).

Documents are JSON text; the fields the CLI filters on (batch, user, state, created and
finished time) are copied into indexed columns. WAL mode and a busy timeout let several
processes (recorder, CLI, report) share one file; each thread of each process gets its own
connection, so a connection never crosses a fork or a thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megaflow.core.errors import ConfigError, ServiceUnavailableError
from megaflow.stores.common import check_event, check_task_doc, merge_task, stream_order

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    episode_id  TEXT PRIMARY KEY,
    batch_id    TEXT,
    user        TEXT,
    state       TEXT,
    created_at  REAL,
    finished_at REAL,
    doc         TEXT NOT NULL CHECK (json_valid(doc))
);
CREATE INDEX IF NOT EXISTS tasks_user_state ON tasks (user, state);
CREATE INDEX IF NOT EXISTS tasks_batch ON tasks (batch_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at);
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,
    episode_id  TEXT,
    batch_id    TEXT,
    stream_ms   INTEGER NOT NULL,
    stream_seq  INTEGER NOT NULL,
    doc         TEXT NOT NULL CHECK (json_valid(doc))
);
CREATE INDEX IF NOT EXISTS events_episode ON events (episode_id, stream_ms, stream_seq);
"""


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///PATH`` URL (``sqlite:////abs/path`` is absolute)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"MEGAFLOW_METADATA_URL: expected sqlite:///PATH, got {url!r}")
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigError(
            "MEGAFLOW_METADATA_URL: sqlite needs a file path (sqlite:////abs/path/megaflow.db); "
            "an in-memory database cannot be shared between threads and processes"
        )
    return path


class SQLiteMetadataStore:
    """MetadataStore on one SQLite file, safe from many threads and processes."""

    def __init__(self, url_or_path: str, *, timeout_s: float = 30.0):
        self.path = sqlite_path(url_or_path) if url_or_path.startswith("sqlite:") else url_or_path
        self.url = url_or_path
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []  # opened by this process, closed by close()
        self._pid = os.getpid()
        self._closed = False
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceUnavailableError(f"metadata store {self.path}: cannot create its directory: {exc}") from exc
        try:
            self._conn().executescript(f"BEGIN IMMEDIATE;{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        except sqlite3.OperationalError as exc:
            raise ServiceUnavailableError(f"metadata store {self.path}: cannot create the schema: {exc}") from exc

    # --- connections -----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        pid = os.getpid()
        if conn is not None and getattr(self._local, "pid", None) == pid:
            return conn
        if self._closed:
            raise ServiceUnavailableError(f"metadata store {self.path} is closed")
        self._forget_parent(pid)
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise ServiceUnavailableError(f"metadata store {self.path}: cannot open: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._local.conn, self._local.pid = conn, pid
        with self._lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the file's write lock from its first statement."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise ServiceUnavailableError(f"metadata store {self.path}: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise ServiceUnavailableError(f"metadata store {self.path}: {exc}") from exc

    # --- MetadataStore -----------------------------------------------------------------------------
    def upsert_task(self, doc: dict[str, Any]) -> None:
        episode_id = check_task_doc(doc)
        with self._write() as conn:
            self._upsert(conn, episode_id, doc)

    def record(self, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """``add_event`` and ``upsert_task`` of each (event, task document) pair, in one transaction
        (the recorder writes one batch of stream entries at a time: one commit instead of two per event)."""
        checked = [(check_event(ev), ev, check_task_doc(doc), doc) for ev, doc in pairs]
        with self._write() as conn:
            merged: dict[str, dict[str, Any]] = {}  # each episode read once and written once per batch
            for event_id, event, episode_id, doc in checked:
                self._insert_event(conn, event_id, event)
                old = merged[episode_id] if episode_id in merged else self._stored(conn, episode_id)
                merged[episode_id] = merge_task(old, doc)
            for episode_id, new in merged.items():
                self._write_task(conn, episode_id, new)

    @staticmethod
    def _stored(conn: sqlite3.Connection, episode_id: str) -> dict[str, Any] | None:
        row = conn.execute("SELECT doc FROM tasks WHERE episode_id = ?", (episode_id,)).fetchone()
        return json.loads(row["doc"]) if row else None

    def _upsert(self, conn: sqlite3.Connection, episode_id: str, doc: dict[str, Any]) -> None:
        self._write_task(conn, episode_id, merge_task(self._stored(conn, episode_id), doc))

    @staticmethod
    def _write_task(conn: sqlite3.Connection, episode_id: str, new: dict[str, Any]) -> None:
        finished = (new.get("phases") or {}).get("finished")
        conn.execute(
            "INSERT INTO tasks (episode_id, batch_id, user, state, created_at, finished_at, doc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (episode_id) DO UPDATE SET "
            "batch_id = excluded.batch_id, user = excluded.user, state = excluded.state, "
            "created_at = excluded.created_at, finished_at = excluded.finished_at, doc = excluded.doc",
            (
                episode_id,
                new.get("batch_id"),
                new.get("user"),
                new.get("state"),
                new.get("created_at"),
                finished,
                json.dumps(new),
            ),
        )

    def add_event(self, event: dict[str, Any]) -> bool:
        event_id = check_event(event)
        with self._write() as conn:
            return self._insert_event(conn, event_id, event)

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, event_id: str, event: dict[str, Any]) -> bool:
        ms, seq = stream_order(event)
        cur = conn.execute(
            "INSERT OR IGNORE INTO events (event_id, episode_id, batch_id, stream_ms, stream_seq, doc) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, event.get("episode_id"), event.get("batch_id"), ms, seq, json.dumps(event)),
        )
        return cur.rowcount == 1

    def get_task(self, episode_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT doc FROM tasks WHERE episode_id = ?", (episode_id,))
        return json.loads(rows[0]["doc"]) if rows else None

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
        where, args = self._where(batch_id=batch_id, user=user, state=state)
        if finished_after is not None:
            where.append("finished_at >= ?")
            args.append(finished_after)
        sql = "SELECT doc FROM tasks" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, episode_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [json.loads(r["doc"]) for r in self._query(sql, args)]

    def events(self, episode_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT doc FROM events WHERE episode_id = ? ORDER BY stream_ms, stream_seq, event_id", (episode_id,)
        )
        return [json.loads(r["doc"]) for r in rows]

    def count_by_state(self, *, batch_id: str | None = None, user: str | None = None) -> dict[str, int]:
        where, args = self._where(batch_id=batch_id, user=user)
        sql = "SELECT state, COUNT(*) AS n FROM tasks" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " GROUP BY state"
        return {r["state"]: r["n"] for r in self._query(sql, args)}

    def list_batches(self, *, user: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        where, args = self._where(user=user)
        where.append("batch_id IS NOT NULL")
        sql = (
            "SELECT batch_id, MIN(user) AS user, COUNT(*) AS total, MIN(created_at) AS created_at FROM tasks "
            "WHERE " + " AND ".join(where) + " GROUP BY batch_id ORDER BY created_at DESC, batch_id LIMIT ?"
        )
        args.append(int(limit))
        return [dict(r) for r in self._query(sql, args)]

    def _forget_parent(self, pid: int) -> None:
        if self._pid != pid:  # first use after a fork: the parent's lock and connections are not ours
            self._lock, self._conns, self._pid = threading.Lock(), [], pid

    def close(self) -> None:
        pid = os.getpid()
        self._forget_parent(pid)
        with self._lock:
            conns, self._conns = self._conns, []
            self._closed = True
        for conn in conns:
            conn.close()
        self._local = threading.local()

    @staticmethod
    def _where(**filters: Any) -> tuple[list[str], list[Any]]:
        where, args = [], []
        for column, value in filters.items():
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return where, args

    def __repr__(self) -> str:
        return f"SQLiteMetadataStore({self.path!r})"
