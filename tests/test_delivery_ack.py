"""A step's broker message is acknowledged by the script that advances its episode.

Real Redis, MegaFlow's kombu transport and the engine in one process: the message is delivered
(kombu records it in the unacked hash and index), the step advances its episode, and the same
script removes the message from both; the worker's ack afterwards sends nothing to Redis. Any other
advance in the step leaves the message to the worker's ack, as before.
"""

from __future__ import annotations

import json

import pytest
from kombu import Connection

from megaflow.core import states, wire
from megaflow.core.keys import Keys
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs
from megaflow.engine import delivery
from megaflow.engine.dispatch import RedisDispatcher
from megaflow.engine.episodes import EpisodeEngine, to_host, to_model
from megaflow.workers import transport

pytestmark = pytest.mark.redis


@pytest.fixture
def engine(settings, redis_client):
    return EpisodeEngine(
        redis_client, settings, Keys(settings.key_prefix), RedisDispatcher(redis_client, settings.key_prefix)
    )


@pytest.fixture
def model_queue(settings, redis_server):
    """kombu consuming the model queue the way a worker does (MegaFlow's transport, acks_late)."""
    transport.install()
    opts = {"global_keyprefix": wire.broker_prefix(settings.key_prefix)}
    with Connection(redis_server.url, transport_options=opts) as conn:
        q = conn.SimpleQueue(wire.MODEL_QUEUE)
        yield q
        q.close()


@pytest.fixture
def evals(monkeypatch):
    """The unacked scripts the transport sends to Redis (append and remove), in order."""
    sent: list[str] = []
    real = transport.QoS._eval

    def spy(self, script, keys, *args):
        sent.append("append" if script == transport.APPEND_LUA else "remove")
        return real(self, script, keys, *args)

    monkeypatch.setattr(transport.QoS, "_eval", spy)
    return sent


def unacked(engine, tag: str) -> bool:
    index, hash_key = delivery.unacked_keys(engine.settings.key_prefix)
    in_index = engine.r.zscore(index, tag) is not None
    assert in_index == engine.r.hexists(hash_key, tag)  # the two always agree
    return in_index


def started(engine, n=2):
    """Episodes advanced to step 1 with a model task each (its message on the model queue)."""
    _, ids = engine.create_batch(validate_specs(demo_specs("fix")[:n]), "alice")
    for eid in ids:
        assert engine.advance(engine.load(eid), state=states.RUNNING, next_task=to_model())
    return ids


def test_the_steps_advance_acknowledges_its_own_message(engine, model_queue, evals):
    ids = started(engine, 1)
    msg = model_queue.get(timeout=5)
    tag = msg.delivery_tag
    assert msg.headers["task"] == wire.MODEL_COMPLETE and unacked(engine, tag)
    delivery.running(ids[0], 1, tag)
    try:
        assert engine.advance(engine.load(ids[0]), next_task=to_host(wire.ENV_EXEC, "h1"))
    finally:
        delivery.done()
    assert not unacked(engine, tag)  # gone with the advance, the next message queued in the same script
    assert engine.r.llen(wire.broker_queue_key(engine.settings.key_prefix, wire.env_host_queue("h1"))) == 1
    msg.ack()
    assert evals == ["append"]  # the worker's ack sent nothing
    assert not delivery.settled(tag)  # asked once, forgotten


def test_other_advances_leave_the_message_to_the_workers_ack(engine, model_queue, evals):
    ids = started(engine, 2)
    msg = model_queue.get(timeout=5)
    tag = msg.delivery_tag
    eid = msg.payload[0][0]
    other = next(i for i in ids if i != eid)
    delivery.running(eid, 1, tag)
    try:
        assert engine.advance(engine.load(other), next_task=to_model())  # another episode
        assert engine.advance(engine.load(eid), fields={"note": "x"}, keep_step=True)  # within the step
        stale = engine.load(eid)
        stale.fields["step"] = "0"
        assert not engine.advance(stale, next_task=to_model())  # a compare-and-set that fails
        assert unacked(engine, tag)
        delivery.done()
        assert engine.advance(engine.load(eid), next_task=to_model())  # after the step ended
        assert unacked(engine, tag)
    finally:
        delivery.done()
    msg.ack()
    assert evals == ["append", "remove"] and not unacked(engine, tag)


def test_a_message_acknowledged_by_its_advance_is_not_requeued_by_a_reject(engine, model_queue, evals):
    """A worker lost after the advance (prefork's reject with requeue) must not run the step again."""
    ids = started(engine, 1)
    msg = model_queue.get(timeout=5)
    delivery.running(ids[0], 1, msg.delivery_tag)
    try:
        assert engine.advance(engine.load(ids[0]), next_task=to_model())
    finally:
        delivery.done()
    msg.reject(requeue=True)
    nxt = model_queue.get(timeout=5)  # the next step's message, not this one again
    assert nxt.delivery_tag != msg.delivery_tag
    assert engine.load(ids[0]).step == 2
    nxt.ack()
    assert engine.r.llen(wire.broker_queue_key(engine.settings.key_prefix, wire.MODEL_QUEUE)) == 0
    assert evals == ["append", "append", "remove"]  # the reject sent nothing


@pytest.fixture
def deferred(monkeypatch):
    """A worker whose steps run in the consuming process (a thread pool)."""
    monkeypatch.setattr(delivery, "defer_appends", True)
    yield
    delivery._records.clear()


def test_a_deferred_delivery_is_recorded_by_its_steps_first_read(engine, model_queue, evals, deferred):
    ids = started(engine, 1)
    msg = model_queue.get(timeout=5)
    tag = msg.delivery_tag
    assert not unacked(engine, tag)  # held: the consumer sent nothing
    delivery.running(ids[0], 1, tag)
    try:
        ep = engine.claim(ids[0], 1)
        assert ep is not None and unacked(engine, tag)  # the read wrote it, as kombu would have
        _index, hash_key = delivery.unacked_keys(engine.settings.key_prefix)
        envelope, exchange, routing_key = json.loads(engine.r.hget(hash_key, tag))
        assert envelope == msg._raw and routing_key == wire.MODEL_QUEUE and exchange is not None
        engine.load(ids[0])  # a second read writes nothing more
        assert engine.advance(ep, next_task=to_model())
    finally:
        delivery.done()
    assert not unacked(engine, tag)
    msg.ack()
    assert evals == [] and not delivery._records  # no EVAL for this delivery at all


def test_a_deferred_delivery_never_read_is_dropped_or_restored_from_memory(engine, model_queue, evals, deferred):
    ids = started(engine, 3)
    queue_key = wire.broker_queue_key(engine.settings.key_prefix, wire.MODEL_QUEUE)
    first = model_queue.get(timeout=5)  # its task fails before reading its episode: acked (rejected)
    first.ack()
    assert not unacked(engine, first.delivery_tag) and not delivery._records
    second = model_queue.get(timeout=5)  # a lost worker's prefork child: requeued
    second.reject(requeue=True)  # back on the queue (behind the third, as kombu requeues)
    third, again = model_queue.get(timeout=5), model_queue.get(timeout=5)
    assert again.delivery_tag == second.delivery_tag and again.payload == second.payload
    assert third.delivery_tag not in (first.delivery_tag, second.delivery_tag)
    assert evals == []
    # a warm shutdown with deliveries held (prefetched, not started): kombu restores them to the queue
    model_queue.channel.close()  # what a worker's warm shutdown does: kombu's restore_unacked_once
    left = engine.r.llen(queue_key)
    assert left == 2, left  # `third` and `again`, both back
    assert {wire.decode_message(m)[1][0] for m in engine.r.lrange(queue_key, 0, -1)} <= set(ids)
    assert not delivery._records and engine.r.hlen(delivery.unacked_keys(engine.settings.key_prefix)[1]) == 0


def test_deliveries_that_cannot_wait_are_appended_at_once(engine, model_queue, evals, deferred, settings):
    """Tasks that are not steps, and steps with a countdown (they wait in the worker), keep kombu's append."""
    ids = started(engine, 1)
    msg = model_queue.get(timeout=5)
    msg.ack()
    key, raw = wire.encode_message(settings.key_prefix, wire.ENV_CLOSE, [ids[0], {"id": "x"}], wire.MODEL_QUEUE)
    env = json.loads(raw)
    engine.r.lpush(key, raw)
    env["headers"]["eta"] = "2026-01-01T00:00:00+00:00"
    env["properties"]["delivery_tag"] = "eta-tag"
    engine.r.lpush(key, json.dumps(env))
    for _ in range(2):
        m = model_queue.get(timeout=5)
        assert unacked(engine, m.delivery_tag)
        m.ack()
    assert evals == ["append", "remove", "append", "remove"]
