"""The episode engine against a real Redis: compare-and-set steps, duplicates, events."""

from __future__ import annotations

import json

import pytest

from megaflow.core import states, wire
from megaflow.core.errors import NotFoundError
from megaflow.core.keys import Keys
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs
from megaflow.engine.dispatch import RedisDispatcher
from megaflow.engine.episodes import EpisodeEngine, NextTask


@pytest.fixture
def engine(settings, redis_client):
    return EpisodeEngine(
        redis_client, settings, Keys(settings.key_prefix), RedisDispatcher(redis_client, settings.key_prefix)
    )


def queued(engine, queue: str) -> list[tuple[str, list]]:
    """(task, args) of the messages waiting on a broker queue, oldest first."""
    key = wire.broker_queue_key(engine.settings.key_prefix, queue)
    return [wire.decode_message(m) for m in reversed(engine.r.lrange(key, 0, -1))]


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


def test_spec_is_stored_without_defaults_and_loads_whole(engine, redis_client):
    plain = {"task_id": "t", "agent": {"max_steps": 7}, "workdir": "/repo", "eval": {"command": "true"}}
    specs = validate_specs(demo_specs("fix")[:2] + [plain])
    _, ids = engine.create_batch(specs, "alice")
    for eid, spec in zip(ids, specs):
        raw = redis_client.hget(engine.keys.episode(eid), "spec")
        assert len(raw) < len(spec.model_dump_json())
        assert engine.load(eid).spec == spec  # every default restored, every set value kept
    assert json.loads(redis_client.hget(engine.keys.episode(ids[2]), "spec")) == {
        "task_id": "t",
        "agent": {"max_steps": 7},
        "eval": {"command": "true"},
    }  # "/repo" is the default workdir


def test_advance_applies_once_and_sends_next(engine, redis_client):
    _, ids = make(engine, 1)
    ep = engine.load(ids[0])
    stale = engine.load(ids[0])
    nxt = NextTask("megaflow.agent.step", "agent")
    assert engine.advance(
        ep,
        history=[{"role": "user", "content": "hi"}],
        incr={"model_calls": 1},
        state=states.RUNNING,
        phase="env_ready",
        next_task=nxt,
    )
    assert queued(engine, "agent") == [("megaflow.agent.step", [ids[0], 1])]
    # a redelivered copy of the same step is dropped: no second history record, no second send
    assert not engine.advance(stale, history=[{"role": "user", "content": "hi"}], next_task=nxt)
    again = engine.load(ids[0])
    assert again.step == 1 and len(again.history) == 1 and again.num("model_calls") == 1
    assert "env_ready" in again.phase_times()
    assert len(queued(engine, "agent")) == 1


def test_claim_drops_stale_and_future_steps(engine):
    _, ids = make(engine, 1)
    ep = engine.load(ids[0])
    engine.advance(ep, next_task=NextTask("megaflow.model.complete", "model"))
    assert engine.claim(ids[0], 1) is not None  # the current step
    assert engine.claim(ids[0], 5) is None  # from the future: dropped
    # the task of step 0 redelivered after its advance: dropped, and nothing resent (the advance
    # enqueued the next task atomically, so a resend would only duplicate a step)
    assert engine.claim(ids[0], 0) is None
    assert queued(engine, "model") == [("megaflow.model.complete", [ids[0], 1])]


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


def test_wire_message_is_what_celery_sends(settings):
    """encode_message writes Celery's own protocol-2 message (headers at their default left out), so
    stock workers consume it."""
    from megaflow.workers.celery_app import create_app

    app = create_app(settings)
    args = ["ep-1", 3]
    ours = json.loads(wire.encode_message(settings.key_prefix, "megaflow.agent.step", args, "agent")[1])
    theirs = app.amqp.as_task_v2(
        "x",
        "megaflow.agent.step",
        args=args,
        kwargs={},
        argsrepr=wire.task_argsrepr("megaflow.agent.step", args, "agent"),
        ignore_result=True,
    )
    volatile = {"id", "root_id", "origin"}
    kept = {k: v for k, v in ours["headers"].items() if k not in volatile}
    assert kept == {k: theirs.headers[k] for k in kept}
    # every header left out is empty in Celery's message, so the worker's request reads the same
    left_out = {k: theirs.headers[k] for k in set(theirs.headers) - set(ours["headers"])}
    assert all(v in (None, 0, {}, [None, None]) for v in left_out.values()), left_out
    assert "body_encoding" not in ours["properties"]
    assert json.loads(ours["body"]) == json.loads(json.dumps(theirs.body))
    assert ours["content-type"] == "application/json"
    assert wire.decode_message(json.dumps(ours)) == ("megaflow.agent.step", args)
    app.close()


def test_admission_in_pipelined_chunks_admits_each_once_in_order(engine, redis_client, settings):
    """A batch larger than one admission chunk: every episode is admitted once, FIFO, with its
    first task sent; one cancelled while queued gets no task and gives its slot back."""
    from megaflow.engine.admission import admit
    from megaflow.engine.resources import ResourceManager

    s = settings.model_copy(update={"global_limit": 1000, "user_limit": 1000})
    resources = ResourceManager(redis_client, s, Keys(s.key_prefix))
    resources.register_host("h1", capacity=1000, images=[], warm={}, disk_free_gb=1)
    specs = validate_specs([{"task_id": f"t{i}", "eval": {"command": "true"}} for i in range(7)])
    _, ids = engine.create_batch(specs, "alice")
    more = validate_specs([{"task_id": f"u{i}", "eval": {"command": "true"}} for i in range(8)])
    _, ids2 = engine.create_batch(more, "alice")
    all_ids = ids + ids2
    resources.enqueue([{"episode_id": e, "user": "alice", "image": "img"} for e in all_ids])
    gone = engine.load(ids[3], history=False)
    assert engine.advance(gone, state=states.CANCELLED, terminal=True)
    assert admit(engine, resources, max_n=4) == len(all_ids) - 1  # four chunks, the last one short
    for eid in all_ids:
        ep = engine.load(eid, history=False)
        if eid == ids[3]:
            assert ep.state == states.CANCELLED and resources.placement(eid) is None
            continue
        assert (ep.state, ep.step, ep.host) == (states.ADMITTED, 0, "h1")
        assert resources.placement(eid)["host"] == "h1"
    sent = queued(engine, wire.env_host_queue("h1"))
    assert [args[0] for _, args in sent] == [e for e in all_ids if e != ids[3]]
    assert {task for task, _ in sent} == {wire.ENV_PROVISION}
    assert admit(engine, resources, max_n=4) == 0  # nothing left: nothing sent twice
    assert len(queued(engine, wire.env_host_queue("h1"))) == len(all_ids) - 1
