"""Contract tests: each test runs on every metadata backend or every artifact backend.

Metadata: sqlite (real file), mongomock, mongo (real mongod when MEGAFLOW_TEST_MONGO_URL is set).
Artifacts: file (real directory), s3 (moto server on loopback).
"""

from __future__ import annotations

import pytest

from megaflow.core.errors import NotFoundError, SpecError
from megaflow.stores import ArtifactStore, MetadataStore
from tests.stores_fixtures import artifact_store, metadata_store, s3_server  # noqa: F401  (fixtures)


def task(episode_id: str, **fields):
    return {"episode_id": episode_id, **fields}


# --- metadata store ------------------------------------------------------------------------------


def test_is_a_metadata_store(metadata_store):
    assert isinstance(metadata_store, MetadataStore)


def test_upsert_and_get(metadata_store):
    assert metadata_store.get_task("nope") is None
    metadata_store.upsert_task(
        task(
            "e1",
            batch_id="b1",
            user="ann",
            state="SUBMITTED",
            created_at=100.0,
            attempt=0,
            data={"nested": [1, 2]},
            phases={"submitted": 100.0},
        )
    )
    doc = metadata_store.get_task("e1")
    assert doc == {
        "episode_id": "e1",
        "batch_id": "b1",
        "user": "ann",
        "state": "SUBMITTED",
        "created_at": 100.0,
        "attempt": 0,
        "data": {"nested": [1, 2]},
        "phases": {"submitted": 100.0},
    }


def test_phases_merge_and_fields_overwrite(metadata_store):
    metadata_store.upsert_task(task("e1", state="SUBMITTED", created_at=100.0, phases={"submitted": 100.0}))
    metadata_store.upsert_task(task("e1", state="ADMITTED", phases={"queued": 101.0, "admitted": 102.0}))
    metadata_store.upsert_task(task("e1", state="RUNNING", host="h1", phases={"step_1": 105.0}))
    # a redelivered old write: fields overwrite, phases keep every key, created_at keeps the earliest
    metadata_store.upsert_task(task("e1", state="RUNNING", created_at=150.0, phases={"admitted": 102.0}))
    doc = metadata_store.get_task("e1")
    assert doc["state"] == "RUNNING" and doc["host"] == "h1" and doc["created_at"] == 100.0
    assert doc["phases"] == {"submitted": 100.0, "queued": 101.0, "admitted": 102.0, "step_1": 105.0}


def test_upsert_without_phases_or_created_at(metadata_store):
    metadata_store.upsert_task(task("e1", state="SUBMITTED"))
    doc = metadata_store.get_task("e1")
    assert doc["phases"] == {} and isinstance(doc["created_at"], float)
    metadata_store.upsert_task(task("e1", created_at=5.0))
    assert metadata_store.get_task("e1")["created_at"] == 5.0


def test_stale_write_merges_phases_but_moves_nothing_back(metadata_store):
    metadata_store.upsert_task(task("e1", state="SUBMITTED", updated_at=100.0, phases={"submitted": 100.0}))
    metadata_store.upsert_task(task("e1", state="RUNNING", host="h1", updated_at=110.0, phases={"env_ready": 110.0}))
    # an older event redelivered after newer ones
    metadata_store.upsert_task(task("e1", state="ADMITTED", host="h0", updated_at=105.0, phases={"admitted": 105.0}))
    doc = metadata_store.get_task("e1")
    assert doc["state"] == "RUNNING" and doc["host"] == "h1" and doc["updated_at"] == 110.0
    assert doc["phases"] == {"submitted": 100.0, "admitted": 105.0, "env_ready": 110.0}
    # same time again, or newer: applied
    metadata_store.upsert_task(task("e1", state="EVALUATING", updated_at=110.0))
    metadata_store.upsert_task(task("e1", state="SUCCEEDED", reward=1.0, updated_at=120.0, phases={"finished": 120.0}))
    doc = metadata_store.get_task("e1")
    assert doc["state"] == "SUCCEEDED" and doc["reward"] == 1.0 and len(doc["phases"]) == 4
    # a stale write to a new episode still creates it
    metadata_store.upsert_task(task("e2", state="QUEUED", updated_at=1.0))
    assert metadata_store.get_task("e2")["state"] == "QUEUED"


def test_created_at_defaults_to_the_earliest_time_seen(metadata_store):
    metadata_store.upsert_task(task("e1", state="QUEUED", updated_at=101.0, phases={"queued": 101.0}))
    assert metadata_store.get_task("e1")["created_at"] == 101.0
    metadata_store.upsert_task(task("e1", updated_at=99.0, phases={"submitted": 100.0}))  # stale, yet earlier
    assert metadata_store.get_task("e1")["created_at"] == 99.0
    metadata_store.upsert_task(task("e1", state="RUNNING", updated_at=200.0))
    assert metadata_store.get_task("e1")["created_at"] == 99.0


@pytest.mark.parametrize(
    "bad", [{}, {"episode_id": ""}, {"episode_id": "e", "phases": {"a.b": 1}}, {"episode_id": "e", "phases": [1]}]
)
def test_bad_task_doc_is_rejected(metadata_store, bad):
    with pytest.raises(SpecError):
        metadata_store.upsert_task(bad)


def test_add_event_is_idempotent_and_ordered(metadata_store):
    def ev(eid, state, ts):
        return {
            "event_id": eid,
            "episode_id": "e1",
            "batch_id": "b1",
            "user": "ann",
            "state": state,
            "ts": ts,
            "data": {"k": state},
        }

    assert metadata_store.add_event(ev("1790000000000-10", "RUNNING", 1790000000.0)) is True
    assert metadata_store.add_event(ev("1790000000000-9", "ENV_STARTING", 1790000000.0)) is True
    assert metadata_store.add_event(ev("1790000000001-0", "SUCCEEDED", 1790000000.001)) is True
    assert metadata_store.add_event(ev("1790000000000-10", "RUNNING", 1790000000.0)) is False
    assert metadata_store.add_event({"event_id": "1790000000000-0", "episode_id": "other", "ts": 1.0e9}) is True
    events = metadata_store.events("e1")
    assert [e["event_id"] for e in events] == ["1790000000000-9", "1790000000000-10", "1790000000001-0"]
    assert events[0] == ev("1790000000000-9", "ENV_STARTING", 1790000000.0)
    assert metadata_store.events("missing") == []
    with pytest.raises(SpecError):
        metadata_store.add_event({"episode_id": "e1"})


@pytest.fixture
def populated(metadata_store):
    rows = [
        # episode, batch, user, state, created, finished
        ("a1", "b1", "ann", "SUCCEEDED", 10.0, 20.0),
        ("a2", "b1", "ann", "FAILED", 11.0, 30.0),
        ("a3", "b1", "ann", "RUNNING", 12.0, None),
        ("c1", "b2", "bob", "SUCCEEDED", 50.0, 60.0),
        ("c2", "b2", "bob", "QUEUED", 51.0, None),
        ("d1", "b3", "ann", "SUCCEEDED", 40.0, 45.0),
        ("x1", None, "ann", "SUBMITTED", 5.0, None),
    ]
    for eid, batch, user, state, created, finished in reversed(rows):
        phases = {"submitted": created} | ({"finished": finished} if finished else {})
        metadata_store.upsert_task(task(eid, batch_id=batch, user=user, state=state, created_at=created, phases=phases))
    return metadata_store


def ids(docs):
    return [d["episode_id"] for d in docs]


def test_find_tasks_filters_and_order(populated):
    assert ids(populated.find_tasks()) == ["x1", "a1", "a2", "a3", "d1", "c1", "c2"]
    assert ids(populated.find_tasks(batch_id="b1")) == ["a1", "a2", "a3"]
    assert ids(populated.find_tasks(user="bob")) == ["c1", "c2"]
    assert ids(populated.find_tasks(user="ann", state="SUCCEEDED")) == ["a1", "d1"]
    assert ids(populated.find_tasks(finished_after=30.0)) == ["a2", "d1", "c1"]
    assert ids(populated.find_tasks(batch_id="b1", finished_after=25.0)) == ["a2"]
    assert ids(populated.find_tasks(limit=2)) == ["x1", "a1"]
    assert populated.find_tasks(limit=0) == []
    assert populated.find_tasks(batch_id="nope") == []
    assert "_id" not in populated.find_tasks(limit=1)[0]


def test_count_by_state(populated):
    assert populated.count_by_state() == {"SUCCEEDED": 3, "FAILED": 1, "RUNNING": 1, "QUEUED": 1, "SUBMITTED": 1}
    assert populated.count_by_state(batch_id="b1") == {"SUCCEEDED": 1, "FAILED": 1, "RUNNING": 1}
    assert populated.count_by_state(user="bob") == {"SUCCEEDED": 1, "QUEUED": 1}
    assert populated.count_by_state(batch_id="nope") == {}


def test_list_batches(populated):
    batches = populated.list_batches()
    assert batches == [
        {"batch_id": "b2", "user": "bob", "total": 2, "created_at": 50.0},
        {"batch_id": "b3", "user": "ann", "total": 1, "created_at": 40.0},
        {"batch_id": "b1", "user": "ann", "total": 3, "created_at": 10.0},
    ]
    assert [b["batch_id"] for b in populated.list_batches(user="ann")] == ["b3", "b1"]
    assert [b["batch_id"] for b in populated.list_batches(limit=1)] == ["b2"]
    assert populated.list_batches(limit=0) == []


# --- artifact store ------------------------------------------------------------------------------


def test_is_an_artifact_store(artifact_store):
    assert isinstance(artifact_store, ArtifactStore)


def test_artifact_round_trip(artifact_store):
    data = bytes(range(256)) * 10
    uri = artifact_store.put_bytes("b1/e1/trajectory.json", data, "application/json")
    assert uri.endswith("/b1/e1/trajectory.json") and uri.split("://")[0] in ("file", "s3")
    assert artifact_store.get_bytes(uri) == data
    assert artifact_store.get_bytes("b1/e1/trajectory.json") == data
    assert artifact_store.exists(uri) and artifact_store.exists("b1/e1/trajectory.json")
    # overwrite
    artifact_store.put_bytes("b1/e1/trajectory.json", b"v2")
    assert artifact_store.get_bytes(uri) == b"v2"
    artifact_store.put_bytes("empty", b"")
    assert artifact_store.get_bytes("empty") == b""


def test_missing_artifact(artifact_store):
    assert not artifact_store.exists("nope/x")
    with pytest.raises(NotFoundError):
        artifact_store.get_bytes("nope/x")
    with pytest.raises(KeyError):  # NotFoundError is also a KeyError
        artifact_store.get_bytes("nope/x")
    artifact_store.delete("nope/x")  # no error


def test_delete(artifact_store):
    uri = artifact_store.put_bytes("a/b.txt", b"x")
    artifact_store.delete(uri)
    assert not artifact_store.exists(uri)
    with pytest.raises(NotFoundError):
        artifact_store.get_bytes(uri)


def test_list_by_prefix(artifact_store):
    for key in ["b1/e1/traj.json", "b1/e1/patch.diff", "b1/e2/traj.json", "b10/e1/traj.json", "top.txt"]:
        artifact_store.put_bytes(key, b"x")
    assert artifact_store.list() == sorted(
        ["b1/e1/patch.diff", "b1/e1/traj.json", "b1/e2/traj.json", "b10/e1/traj.json", "top.txt"]
    )
    assert artifact_store.list("b1/") == ["b1/e1/patch.diff", "b1/e1/traj.json", "b1/e2/traj.json"]
    assert artifact_store.list("b1") == sorted(
        ["b1/e1/patch.diff", "b1/e1/traj.json", "b1/e2/traj.json", "b10/e1/traj.json"]
    )
    assert artifact_store.list("b1/e1/t") == ["b1/e1/traj.json"]
    assert artifact_store.list("zzz") == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_unsafe_keys_are_rejected(artifact_store, key):
    with pytest.raises(SpecError):
        artifact_store.put_bytes(key, b"x")


def test_foreign_uri_is_not_found(artifact_store):
    artifact_store.put_bytes("k", b"x")
    for uri in ("file:///etc/passwd", "s3://another-bucket/k", "http://example.com/k"):
        assert not artifact_store.exists(uri)
        with pytest.raises(NotFoundError):
            artifact_store.get_bytes(uri)
