"""What is particular to one backend: choice by URL, lazy imports, SQLite across processes, MongoDB
indexes and TTL, S3 multipart and endpoints, errors for unreachable stores."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megaflow.core.errors import ConfigError, NotFoundError, ServiceUnavailableError
from megaflow.core.settings import Settings
from megaflow.stores import open_artifact_store, open_metadata_store
from megaflow.stores.common import redact_url
from tests.stores_fixtures import (  # noqa: F401  (fixtures)
    METADATA_BACKENDS,
    MONGO_URL,
    drop_metadata_store,
    free_port,
    make_bucket,
    make_metadata_store,
    s3_server,
)

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


# --- choice by URL -------------------------------------------------------------------------------


def test_open_by_scheme(tmp_path):
    from megaflow.stores.local import LocalArtifactStore
    from megaflow.stores.sqlite import SQLiteMetadataStore

    meta = open_metadata_store(f"sqlite:///{tmp_path / 'a' / 'm.db'}")
    assert isinstance(meta, SQLiteMetadataStore) and (tmp_path / "a" / "m.db").exists()
    meta.close()
    art = open_artifact_store(f"file://{tmp_path / 'art'}")
    assert isinstance(art, LocalArtifactStore)


def test_default_settings_open_embedded_stores(tmp_path):
    settings = Settings.load(state_dir=str(tmp_path / "state"))
    meta = open_metadata_store(settings.metadata_url, settings)
    meta.upsert_task({"episode_id": "e"})
    meta.close()
    assert (tmp_path / "state" / "megaflow.db").exists()
    art = open_artifact_store(settings.artifacts_url, settings)
    assert art.put_bytes("k", b"x") == f"file://{tmp_path / 'state' / 'artifacts'}/k"


@pytest.mark.parametrize("url", ["postgres://u:secret@h/db", "redis://h", "", "/plain/path"])
def test_unknown_metadata_scheme_names_the_setting(url):
    with pytest.raises(ConfigError, match="MEGAFLOW_METADATA_URL") as info:
        open_metadata_store(url)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["gs://bucket/x", "", "ftp://u:secret@h/x", "file://relative/dir"])
def test_unknown_artifact_scheme_names_the_setting(url):
    with pytest.raises(ConfigError, match="MEGAFLOW_ARTIFACTS_URL") as info:
        open_artifact_store(url)
    assert "secret" not in str(info.value)


def test_sqlite_memory_is_refused():
    with pytest.raises(ConfigError, match="MEGAFLOW_METADATA_URL"):
        open_metadata_store("sqlite:///:memory:")


def test_redact_url():
    assert redact_url("mongodb://bob:pw@h:27017/db?x=1") == "mongodb://bob:***@h:27017/db?x=1"
    assert redact_url("mongodb://h:27017/db") == "mongodb://h:27017/db"


def test_backends_are_imported_lazily(tmp_path):
    code = (
        "import sys; from megaflow.stores import open_metadata_store, open_artifact_store;"
        f"open_metadata_store('sqlite:///{tmp_path}/m.db').close(); open_artifact_store('file://{tmp_path}/a');"
        "bad = [m for m in ('pymongo', 'boto3', 'botocore', 'mongomock') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --- SQLite --------------------------------------------------------------------------------------


def test_sqlite_wal_and_indexes(tmp_path):
    store = open_metadata_store(f"sqlite:///{tmp_path / 'm.db'}")
    conn = sqlite3.connect(tmp_path / "m.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def plan(sql, args=()):
        return " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    assert "tasks_user_state" in plan("SELECT doc FROM tasks WHERE user = ? AND state = ?", ("u", "s"))
    assert "tasks_batch" in plan("SELECT doc FROM tasks WHERE batch_id = ? ORDER BY created_at", ("b",))
    assert "tasks_finished" in plan("SELECT doc FROM tasks WHERE finished_at >= ?", (1.0,))
    assert "events_episode" in plan(
        "SELECT doc FROM events WHERE episode_id = ? ORDER BY stream_ms, stream_seq", ("e",)
    )
    conn.close()
    store.close()


def _sqlite_worker(path: str, worker: int, n: int) -> None:
    from megaflow.stores.sqlite import SQLiteMetadataStore

    store = SQLiteMetadataStore(f"sqlite:///{path}")
    for i in range(n):
        store.upsert_task({"episode_id": "shared", "state": f"w{worker}", "phases": {f"w{worker}_{i}": float(i)}})
        store.upsert_task({"episode_id": f"w{worker}-{i}", "batch_id": "b", "user": "u", "state": "QUEUED"})
        store.add_event({"event_id": f"{1000 + i}-{worker}", "episode_id": "shared", "ts": 1.0})
        store.add_event({"event_id": f"{1000 + i}-0", "episode_id": "shared", "ts": 1.0})  # all race on these
    store.close()


def test_sqlite_several_processes_and_threads_lose_no_write(tmp_path):
    path = str(tmp_path / "m.db")
    ctx = multiprocessing.get_context("spawn")  # fork from pytest's multi-threaded process can deadlock
    procs = [ctx.Process(target=_sqlite_worker, args=(path, w, 40)) for w in (1, 2, 3)]
    threads = [threading.Thread(target=_sqlite_worker, args=(path, w, 40)) for w in (4, 5)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for p in procs:
        p.join(120)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0
    for t in threads:
        t.join(60)
    store = open_metadata_store(f"sqlite:///{path}")
    doc = store.get_task("shared")
    assert len(doc["phases"]) == 5 * 40
    assert store.count_by_state(batch_id="b") == {"QUEUED": 5 * 40}
    assert len(store.events("shared")) == 40 * 6  # 5 workers' own events + the 40 they all raced on
    store.close()


def test_sqlite_store_used_after_fork_opens_its_own_connection(tmp_path):
    store = open_metadata_store(f"sqlite:///{tmp_path / 'm.db'}")
    store.upsert_task({"episode_id": "parent", "state": "A"})
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's connection
        code = 1
        try:
            store.upsert_task({"episode_id": "child", "state": "B"})
            code = 0 if store.get_task("parent")["state"] == "A" else 2
            store.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_task("child")["state"] == "B"
    store.close()


def test_sqlite_unwritable_place_is_service_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ServiceUnavailableError, match=str(blocker)):
        open_metadata_store(f"sqlite:///{blocker / 'sub' / 'm.db'}")


# --- MongoDB (mongomock here, a real mongod when MEGAFLOW_TEST_MONGO_URL is set) ---------------------

MONGO_KINDS = [k for k in METADATA_BACKENDS if k != "sqlite"]


@pytest.mark.parametrize("kind", MONGO_KINDS)
def test_mongo_indexes_and_ttl(kind, tmp_path):
    store = make_metadata_store(kind, tmp_path, ttl_days=2)
    try:
        store.ensure_indexes()
        tasks = store.tasks.index_information()
        assert {"user_state", "batch_created", "finished", "created"} <= set(tasks)
        assert tasks["user_state"]["key"] == [("user", 1), ("state", 1)]
        events = store.event_docs.index_information()
        assert events["events_ttl"]["expireAfterSeconds"] == 2 * 86400
        # a store opened later with another retention changes the index in place
        from megaflow.stores.mongo import MongoMetadataStore

        again = MongoMetadataStore(store.url, client=store.client, ttl_days=0.5)
        again.get_task("x")  # the first operation sets the indexes up
        assert store.event_docs.index_information()["events_ttl"]["expireAfterSeconds"] == 43200
        # stored events carry the datetime the TTL index reads, and callers never see it
        store.add_event({"event_id": "1-0", "episode_id": "e", "ts": time.time(), "created": "mine"})
        raw = store.event_docs.find_one({"_id": "1-0"})
        assert raw["_created"].year >= 2024
        assert store.events("e") == [{"event_id": "1-0", "episode_id": "e", "ts": raw["ts"], "created": "mine"}]
        del again
    finally:
        drop_metadata_store(store)


@pytest.mark.parametrize("kind", MONGO_KINDS)
def test_mongo_without_ttl_has_no_ttl_index(kind, tmp_path):
    store = make_metadata_store(kind, tmp_path)
    try:
        store.ensure_indexes()
        assert "events_ttl" not in store.event_docs.index_information()
    finally:
        drop_metadata_store(store)


def test_mongo_unreachable_is_service_unavailable_without_password():
    port = free_port()  # nothing listens there
    url = f"mongodb://bob:hunter2@127.0.0.1:{port}/megaflow?serverSelectionTimeoutMS=300"
    store = open_metadata_store(url, Settings.load(mongo_ttl_days=1))  # no I/O yet: fine before the server is up
    for call in (
        lambda: store.get_task("e"),
        lambda: store.upsert_task({"episode_id": "e"}),
        lambda: store.add_event({"event_id": "1-0"}),
        store.list_batches,
    ):
        with pytest.raises(ServiceUnavailableError) as info:
            call()
        assert f"127.0.0.1:{port}" in str(info.value) and "hunter2" not in str(info.value)
    store.close()


def test_mongo_bad_url_is_config_error():
    with pytest.raises(ConfigError, match="MEGAFLOW_METADATA_URL"):
        open_metadata_store("mongodb://bob:pw@/x")


@pytest.mark.skipif(not MONGO_URL, reason="MEGAFLOW_TEST_MONGO_URL not set")
def test_open_real_mongo_by_url():
    store = open_metadata_store(MONGO_URL, Settings.load(mongo_ttl_days=1))
    try:
        store.upsert_task({"episode_id": "probe-open", "state": "X"})
        assert store.get_task("probe-open")["state"] == "X"
        store.tasks.delete_one({"_id": "probe-open"})
    finally:
        store.close()


# --- S3 (moto server on loopback) -------------------------------------------------------------------


@pytest.fixture
def s3_store(s3_server):
    from megaflow.stores.s3 import S3ArtifactStore

    store = S3ArtifactStore(
        f"s3://{make_bucket(s3_server)}/runs/2026",
        endpoint_url=s3_server.endpoint,
        region="us-east-1",
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_attempts=2,
    )
    yield store
    store.close()


def test_s3_multipart_upload(s3_store):
    data = os.urandom(11 * MiB + 123)
    uri = s3_store.put_bytes("big/blob.bin", data)
    assert uri == f"{s3_store.url}/big/blob.bin"
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key="runs/2026/big/blob.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert head["ContentLength"] == len(data)
    assert s3_store.get_bytes(uri) == data


def test_s3_keys_live_under_the_prefix(s3_store):
    uri = s3_store.put_bytes("e1/patch.diff", b"diff", "text/x-diff")
    assert uri == f"s3://{s3_store.bucket}/runs/2026/e1/patch.diff"
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key="runs/2026/e1/patch.diff")
    assert head["ContentType"] == "text/x-diff"
    # an object beside the prefix is not part of the store
    s3_store.client.put_object(Bucket=s3_store.bucket, Key="runs/2026x/other", Body=b"x")
    assert s3_store.list() == ["e1/patch.diff"]


def test_s3_store_opened_from_settings(s3_server):
    bucket = make_bucket(s3_server)
    settings = Settings.load(artifacts_url=f"s3://{bucket}", s3_endpoint_url=s3_server.endpoint, s3_region="us-east-1")
    store = open_artifact_store(settings.artifacts_url, settings)
    assert store.put_bytes("k", b"v") == f"s3://{bucket}/k"
    assert store.get_bytes(f"s3://{bucket}/k") == b"v" and store.list() == ["k"]
    store.close()


def test_s3_missing_bucket_is_config_error(s3_server):
    from megaflow.stores.s3 import S3ArtifactStore

    store = S3ArtifactStore("s3://no-such-bucket-mf/x", endpoint_url=s3_server.endpoint, region="us-east-1")
    with pytest.raises(ConfigError, match="no-such-bucket-mf"):
        store.put_bytes("k", b"v")
    with pytest.raises((ConfigError, NotFoundError)):
        store.get_bytes("k")
    store.close()


def test_s3_unreachable_endpoint_is_service_unavailable(s3_server):
    from megaflow.stores.s3 import S3ArtifactStore

    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3ArtifactStore(
        "s3://bucket/p", endpoint_url=endpoint, region="us-east-1", max_attempts=1, connect_timeout_s=1
    )
    for call in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"), lambda: store.list()):
        with pytest.raises(ServiceUnavailableError, match=endpoint):
            call()
    store.close()


def test_s3_url_needs_a_bucket():
    from megaflow.stores.s3 import S3ArtifactStore

    with pytest.raises(ConfigError, match="MEGAFLOW_ARTIFACTS_URL"):
        S3ArtifactStore("s3:///prefix")


# --- local files -------------------------------------------------------------------------------------


def test_local_writes_are_atomic(tmp_path):
    store = open_artifact_store(f"file://{tmp_path / 'art'}")
    blobs = [bytes([i]) * (256 * 1024) for i in range(6)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                got = store.get_bytes("same/key")
            except NotFoundError:
                continue
            if got not in blobs:
                errors.append(AssertionError(f"torn read of {len(got)} bytes"))

    def writer(blob):
        for _ in range(5):
            store.put_bytes("same/key", blob)

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors
    assert store.get_bytes("same/key") in blobs
    assert sorted(p.name for p in (tmp_path / "art" / "same").iterdir()) == ["key"]  # no temp files left
    assert store.list() == ["same/key"]


class FlakyProxy:
    """A loopback HTTP proxy in front of moto that answers the first ``failures`` requests with 503."""

    def __init__(self, upstream: str, failures: int):
        import http.server
        import urllib.error
        import urllib.request

        proxy = self
        self.failures, self.seen = failures, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    err = b"<Error><Code>ServiceUnavailable</Code><Message>try again</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(
                    upstream + self.path, data=body or None, method=self.command, headers=headers
                )
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                except urllib.error.HTTPError as exc:
                    resp = exc
                payload = resp.read()
                self.send_response(resp.status)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("attempts, ok", [(3, True), (1, False)])
def test_s3_retries_transient_errors(s3_server, attempts, ok):
    from megaflow.stores.s3 import S3ArtifactStore

    bucket = make_bucket(s3_server)
    proxy = FlakyProxy(s3_server.endpoint, failures=2)
    store = S3ArtifactStore(f"s3://{bucket}/p", endpoint_url=proxy.endpoint, region="us-east-1", max_attempts=attempts)
    try:
        assert store.client.meta.config.retries["mode"] == "standard"
        if ok:
            assert store.put_bytes("k", b"v") == f"s3://{bucket}/p/k"
            assert proxy.seen == 3 and store.get_bytes("k") == b"v"
        else:
            with pytest.raises(ServiceUnavailableError, match=proxy.endpoint):
                store.put_bytes("k", b"v")
            assert proxy.seen == 1
    finally:
        store.close()
        proxy.close()


def test_local_store_in_a_directory_with_odd_characters(tmp_path):
    store = open_artifact_store(f"file://{tmp_path}/my%20art")  # the directory part is %-decoded
    uri = store.put_bytes("a b/c%41.txt", b"x")  # keys are taken as they are
    assert uri == f"file://{tmp_path / 'my art'}/a b/c%41.txt" and (tmp_path / "my art/a b/c%41.txt").exists()
    assert store.get_bytes(uri) == b"x" and store.list("a b/") == ["a b/c%41.txt"]


def test_a_recorded_batch_equals_its_events_upserted_one_by_one(tmp_path):
    """The SQLite store's ``record`` merges an episode's events within a batch; the result is the same."""
    events = [
        ({"event_id": "1-0", "episode_id": "e1", "ts": 1.0}, {"episode_id": "e1", "batch_id": "b", "state": "QUEUED",
                                                              "updated_at": 1.0, "phases": {"queued": 1.0}}),
        ({"event_id": "3-0", "episode_id": "e1", "ts": 3.0}, {"episode_id": "e1", "state": "RUNNING",
                                                              "updated_at": 3.0, "phases": {"step_1": 3.0}}),
        ({"event_id": "2-0", "episode_id": "e1", "ts": 2.0}, {"episode_id": "e1", "state": "ADMITTED", "host": "h",
                                                              "updated_at": 2.0, "phases": {"admitted": 2.0}}),
        ({"event_id": "4-0", "episode_id": "e2", "ts": 4.0}, {"episode_id": "e2", "batch_id": "b", "state": "QUEUED",
                                                              "updated_at": 4.0, "phases": {"queued": 4.0}}),
    ]  # fmt: skip
    batched = open_metadata_store(f"sqlite:///{tmp_path / 'batched.db'}")
    single = open_metadata_store(f"sqlite:///{tmp_path / 'single.db'}")
    batched.record(events[:1])  # the second batch merges onto what the first one stored
    batched.record(events[1:])
    for event, doc in events:
        single.add_event(event)
        single.upsert_task(doc)
    for eid in ("e1", "e2"):
        assert batched.get_task(eid) == single.get_task(eid)
    e1 = batched.get_task("e1")
    assert e1["state"] == "RUNNING" and "host" not in e1  # the late (redelivered) event moves nothing back
    assert e1["phases"] == {"queued": 1.0, "admitted": 2.0, "step_1": 3.0}
    assert [e["event_id"] for e in batched.events("e1")] == ["1-0", "2-0", "3-0"]
