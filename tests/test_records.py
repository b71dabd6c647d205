"""The recorder: event stream -> task and event documents, at-least-once and idempotent."""

from __future__ import annotations

from megaflow.core import states
from megaflow.core.keys import Keys
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs
from megaflow.engine.episodes import EpisodeEngine
from megaflow.records import GROUP, Recorder
from megaflow.stores import open_metadata_store


def test_recorder_builds_task_documents(settings, redis_client):
    keys = Keys(settings.key_prefix)
    engine = EpisodeEngine(redis_client, settings, keys, lambda *a: None)
    batch, ids = engine.create_batch(validate_specs(demo_specs("fix")[:2]), "bob")
    ep = engine.load(ids[0])
    engine.advance(ep, keep_step=True, state=states.ADMITTED, phase="admitted", event_fields={"host": "h1"})
    engine.advance(ep, state=states.RUNNING, phase="env_ready")
    engine.advance(
        ep, state=states.SUCCEEDED, phase="finished", terminal=True, event_fields={"reward": 1.0, "cause": None}
    )
    store = open_metadata_store(settings.metadata_url, settings)
    rec = Recorder(redis_client, keys, store)
    assert rec.drain() == 7
    doc = store.get_task(ids[0])
    assert doc["state"] == states.SUCCEEDED and doc["host"] == "h1" and doc["reward"] == 1.0
    assert doc["user"] == "bob" and doc["batch_id"] == batch
    assert {"submitted", "queued", "admitted", "env_ready", "finished"} <= set(doc["phases"])
    assert doc["phases"]["submitted"] <= doc["phases"]["admitted"] <= doc["phases"]["finished"]
    assert [e["state"] for e in store.events(ids[0])][-1] == states.SUCCEEDED
    assert store.count_by_state(batch_id=batch) == {states.SUCCEEDED: 1, states.QUEUED: 1}
    # at-least-once: a second recorder re-reading every entry changes nothing
    redis_client.xgroup_setid(keys.events, GROUP, id="0")
    assert Recorder(redis_client, keys, store, consumer="recorder-2").drain() == 7
    assert len(store.events(ids[0])) == 5
    assert store.get_task(ids[0])["state"] == states.SUCCEEDED
    store.close()


def test_trim_drops_only_what_every_group_acknowledged(settings, redis_client):
    keys = Keys(settings.key_prefix)
    engine = EpisodeEngine(redis_client, settings, keys, lambda *a: None)
    store = open_metadata_store(settings.metadata_url, settings)
    rec = Recorder(redis_client, keys, store)
    redis_client.xgroup_create(keys.events, "other", id="0")  # a second reader, slower than the recorder
    # 200 episodes x 2 events: more than one stream node, so an approximate trim has whole nodes to drop
    engine.create_batch(validate_specs(demo_specs("fix")[:1] * 200), "bob")
    assert redis_client.xlen(keys.events) == 400
    assert rec.trim() == 0  # nothing delivered to anyone yet
    assert rec.drain() == 400
    assert rec.trim() == 0  # "other" has read nothing: everything stays
    # "other" reads all but acknowledges only the first 150: entries from its oldest pending one stay
    got = redis_client.xreadgroup("other", "c1", {keys.events: ">"}, count=1000)[0][1]
    redis_client.xack(keys.events, "other", *[i for i, _ in got[:150]])
    trimmed = rec.trim()
    assert 0 < trimmed <= 150
    left = [i for i, _ in redis_client.xrange(keys.events)]
    assert got[150][0] in left and left == [i for i, _ in got][-len(left) :]
    # all acknowledged: the stream is trimmed down to less than one node (approximate trimming)
    redis_client.xack(keys.events, "other", *[i for i, _ in got[150:]])
    rec.trim()
    assert redis_client.xlen(keys.events) < 100
    # a retention window keeps recorded entries while they are young
    engine.create_batch(validate_specs(demo_specs("fix")[:1] * 200), "bob")
    rec.drain()
    redis_client.xgroup_destroy(keys.events, "other")
    n = redis_client.xlen(keys.events)
    assert Recorder(redis_client, keys, store, retain_s=3600).trim() == 0
    assert redis_client.xlen(keys.events) == n
    assert rec.trim() > 0
    store.close()
