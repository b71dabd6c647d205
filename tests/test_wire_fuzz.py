"""Junk on the broker's queues: a running fleet drops it with a log line and goes on with real work.

A real fleet (Redis, the control process, Celery workers per service on the ``sim`` env backend)
gets, on every queue its workers consume, messages that are not what MegaFlow writes: bytes that
are not JSON, JSON that is not a kombu envelope, a pickle content type, an unknown task, a known
task with arguments of every wrong shape, steps of episodes that do not exist. Then a batch is
submitted: every episode must still succeed, every worker must still be up, and no junk may stay
in the broker (queued, or unacknowledged to come back after the visibility timeout).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from megaflow import Client, fleet
from megaflow.core import states, wire
from megaflow.demo_tasks import demo_specs
from megaflow.workers import transport


def envelope(task: str, args, *, content_type: str = "application/json", body: str | None = None, **props) -> str:
    """A kombu Redis envelope around a Celery protocol-2 message (as encode_message writes it)."""
    _key, raw = wire.encode_message("x", task, [], wire.MODEL_QUEUE)
    env = json.loads(raw)
    env["content-type"] = content_type
    env["body"] = body if body is not None else json.dumps([args, {}, {}])
    env["properties"].update(props)
    return json.dumps(env)


def junk() -> list[str | bytes]:
    step_tasks = (wire.MODEL_COMPLETE, wire.AGENT_STEP, wire.ENV_PROVISION, wire.ENV_EXEC, wire.ENV_EVALUATE)
    out: list[str | bytes] = [
        b"\x00\xff not json at all",
        "[1, 2, 3]",
        "{}",
        '{"body": 5}',
        envelope(wire.MODEL_COMPLETE, ["e", 1], content_type="application/x-python-serialize"),
        envelope("megaflow.no_such_task", ["e", 1]),
        envelope(wire.MODEL_COMPLETE, None, body="not json"),
        envelope(wire.MODEL_COMPLETE, None, body="@@@", body_encoding="base64"),
        envelope(wire.MODEL_COMPLETE, None, body=base64.b64encode(b"[[], {}, {}]").decode(), body_encoding="base64"),
        envelope(wire.ENV_CLOSE, ["e", "not a handle"]),
        envelope(wire.ENV_PREFETCH, [[1, 2]]),
    ]
    bad_args = ([], ["only-id"], ["", 1], [123, 1], ["e", -1], ["e", "1"], ["e", True], ["x" * 300, 1], ["no-such", 3])
    out += [envelope(task, args) for task in step_tasks for args in bad_args]
    return out


@pytest.mark.redis
def test_the_control_reads_queues_holding_junk(settings, redis_client):
    """The stall check reads every queue and the unacked hash: junk there (nobody consuming yet) is skipped."""
    from megaflow import control
    from megaflow.services.root import Root

    rt = Root(settings, role="control")
    good_key, good = wire.encode_message(settings.key_prefix, wire.MODEL_COMPLETE, ["ep-1", 3], wire.MODEL_QUEUE)
    redis_client.lpush(good_key, good, *junk())
    prefix = wire.broker_prefix(settings.key_prefix)
    redis_client.hset(prefix + "unacked", mapping={"t1": "\x00 not json", "t2": "[1]", "t3": json.dumps([{}, "", 5])})
    raw = __import__("redis").Redis.from_url(settings.redis_url)
    raw.lpush(good_key, b"\xff\xfe not utf-8")
    pending = control.pending_tasks(rt)  # well-formed step messages count, whatever episode they name
    assert ("ep-1", 3) in pending and all(isinstance(e, str) and isinstance(n, int) for e, n in pending)
    assert control.audit(rt, []) == []


@pytest.mark.fleet
def test_junk_on_every_queue_is_dropped_and_real_work_goes_on(settings, redis_client):
    s = settings.model_copy(
        update={
            "env_backend": {"type": "sim", "preset": "demo"},
            "metrics_port": 0,
            "sweep_interval_s": 1,
        }
    )
    fleet.up(s, env_hosts=1, wait_s=120, echo=lambda m: None)
    try:
        up = fleet.running(s)
        queues = [*wire.QUEUES, *(wire.env_host_queue(h["name"]) for h in _hosts(s))]
        messages = junk()
        for q in queues:
            key = wire.broker_queue_key(s.key_prefix, q)
            redis_client.lpush(key, *messages)
        with Client(s) as client:
            sub = client.submit(demo_specs("fix", grading="exit_code")[:4], user="fuzz")
            client.wait(sub.batch_id, timeout=180)
            res = client.results(sub.batch_id)
            assert [r["state"] for r in res] == [states.SUCCEEDED] * 4, [(r["state"], r.get("error")) for r in res]
        # every worker survived it all, and nothing of the junk is left to come back
        assert fleet.running(s) == up
        prefix = wire.broker_prefix(s.key_prefix)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [q for q in queues if redis_client.llen(wire.broker_queue_key(s.key_prefix, q))]
            unacked = redis_client.hlen(prefix + "unacked")
            if not left and not unacked:
                break
            time.sleep(0.5)
        assert not left and not unacked, (left, redis_client.hvals(prefix + "unacked")[:3])
        # what kombu could not have made a message of is kept aside for a look (five items per queue);
        # the rest were messages Celery refused or tasks that refused their arguments, logged by the worker
        assert redis_client.llen(prefix + transport.UNDELIVERABLE) == 5 * len(queues)
    finally:
        fleet.down(s, echo=lambda m: None)


def _hosts(s) -> list[dict]:
    from megaflow.services.root import Root

    rt = Root(s, role="client")
    deadline = time.monotonic() + 30
    while not (hosts := [h for h in rt.resources.hosts() if h["alive"]]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hosts, "no env host registered"
    return hosts
