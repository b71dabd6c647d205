"""The episode engine against a real Redis: compare-and-set steps, duplicates, events."""

from __future__ import annotations

import json

import pytest

from megaflow.core import states
from megaflow.demo_tasks import demo_specs
from megaflow.engine.episodes import EpisodeEngine, NextTask
from megaflow.core.errors import NotFoundError
from megaflow.core.keys import Keys
from megaflow.core.spec import validate_specs


@pytest.fixture
def engine(settings, redis_client):
    sent: list[tuple[str, list, str]] = []
    eng = EpisodeEngine(redis_client, settings, Keys(settings.key_prefix), lambda n, a, q: sent.append((n, a, q)))
    eng.sent = sent  # type: ignore[attr-defined]
    return eng


def make(engine, n=2):
    return engine.create_batch(validate_specs(demo_specs("fix")[:n]), "alice")


def test_create_batch_writes_episodes_and_events(engine, redis_client):
    batch, ids = make(engine, 3)
    assert engine.batch_ids(batch) == ids
    ep = engine.load(ids[0])
    assert (ep.state, ep.step, ep.user, ep.batch_id) == (states.QUEUED, 0, "alice", batch)
    assert ep.spec.task_id == demo_specs("fix")[0]["task_id"]
    events = [json.loads(f["e"]) for _, f in redis_client.xrange(engine.keys.events)]
    assert [e["state"] for e in events] == [states.SUBMITTED, states.QUEUED] * 3


def test_advance_applies_once_and_sends_next(engine, redis_client):
    _, ids = make(engine, 1)
    ep = engine.load(ids[0])
    stale = engine.load(ids[0])
    nxt = NextTask("megaflow.agent.step", "agent")
    assert engine.advance(ep, history=[{"role": "user", "content": "hi"}], incr={"model_calls": 1},
                          state=states.RUNNING, phase="env_ready", next_task=nxt)
    assert engine.sent == [("megaflow.agent.step", [ids[0], 1], "agent")]
    # a redelivered copy of the same step is dropped: no second history record, no second send
    assert not engine.advance(stale, history=[{"role": "user", "content": "hi"}], next_task=nxt)
    again = engine.load(ids[0])
    assert again.step == 1 and len(again.history) == 1 and again.num("model_calls") == 1
    assert "env_ready" in again.phase_times()
    assert len(engine.sent) == 1


def test_claim_drops_stale_and_resends_lost_next(engine):
    _, ids = make(engine, 1)
    ep = engine.load(ids[0])
    engine.advance(ep, next_task=NextTask("megaflow.model.complete", "model"))
    engine.sent.clear()
    assert engine.claim(ids[0], 1) is not None  # the current step
    assert engine.claim(ids[0], 5) is None  # from the future: dropped
    assert engine.sent == []
    # the task of step 0 redelivered after its advance: its next task is sent again (crash repair)
    assert engine.claim(ids[0], 0) is None
    assert engine.sent == [("megaflow.model.complete", [ids[0], 1], "model")]


def test_terminal_marks_batch_done_and_stops_everything(engine, redis_client):
    batch, ids = make(engine, 2)
    ep = engine.load(ids[0])
    assert engine.advance(ep, state=states.SUCCEEDED, phase="finished", terminal=True, fields={"reward": "1.0"})
    assert redis_client.smembers(engine.keys.batch_done(batch)) == {ids[0]}
    assert redis_client.ttl(engine.keys.episode(ids[0])) > 0
    assert engine.claim(ids[0], ep.step) is None
    assert not engine.advance(engine.load(ids[0]), state=states.FAILED, terminal=True)
    views = engine.summaries(ids)
    assert [v["state"] for v in views] == [states.SUCCEEDED, states.QUEUED]
    assert views[0]["reward"] == 1.0


def test_unknown_ids(engine):
    with pytest.raises(NotFoundError):
        engine.load("nope")
    with pytest.raises(NotFoundError):
        engine.batch_ids("nope")
    assert engine.claim("nope", 0) is None


def test_advance_enqueues_next_task_atomically(settings, redis_client):
    from megaflow.workers.app import create_app, encode_task_message

    app = create_app(settings, register_tasks=False)
    keys = Keys(settings.key_prefix)
    eng = EpisodeEngine(redis_client, settings, keys, lambda *a: pytest.fail("must not send separately"),
                        encode=lambda n, a, q: encode_task_message(app, settings, n, a, q))
    _, ids = eng.create_batch(validate_specs(demo_specs("fix")[:1]), "alice")
    ep, stale = eng.load(ids[0]), eng.load(ids[0])
    assert eng.advance(ep, next_task=NextTask("megaflow.agent.step", "agent"))
    assert not eng.advance(stale, next_task=NextTask("megaflow.agent.step", "agent"))
    assert eng.claim(ids[0], 0) is None  # a redelivered step 0: dropped, and nothing resent
    queued = redis_client.lrange(f"{settings.key_prefix}:celery:agent", 0, -1)
    assert len(queued) == 1  # the duplicate advance enqueued nothing
    msg = json.loads(queued[0])
    assert msg["headers"]["task"] == "megaflow.agent.step"
    assert msg["properties"]["delivery_info"]["routing_key"] == "agent"
    import base64

    assert json.loads(base64.b64decode(msg["body"]))[0] == [ids[0], 1]
    app.close()
