"""A step's broker message is acknowledged by the script that advances its episode.

Real Redis, MegaFlow's kombu transport and the engine in one process: the message is delivered
(kombu records it in the unacked hash and index), the step advances its episode, and the same
script removes the message from both; the worker's ack afterwards sends nothing to Redis. Any other
advance in the step leaves the message to the worker's ack, as before.
"""

from __future__ import annotations

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
