"""Per-person submitters against a real redis-server with ACL users (issue 17, Access).

Alice and Bob each have their own Redis user (``megaflow acl add-user``). Alice can submit, read and
cancel her own batches (through the control service's request server) and nothing else: neither her
Client, nor the CLI, nor raw Redis commands with her credentials reach Bob's batch, the quotas, the
hosts or the broker.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis

from megaflow.client import Client
from megaflow.core import states
from megaflow.core.errors import NotFoundError, SpecError
from megaflow.core.keys import Keys
from megaflow.core.wire import broker_prefix, broker_queue_key
from megaflow.demo_tasks import demo_specs
from megaflow.security import acl
from megaflow.security.identity import add_person
from megaflow.security.requests import RequestServer
from megaflow.services.root import Root

PASSWORDS = {r: f"pw-{r}-0123456789" for r in acl.ROLES}
KEYS = Keys("mf")


@pytest.fixture
def people(redis_server, redis_client, settings):
    """Role users, persons alice and bob, and the control service's request server and recorder in threads."""
    from megaflow.cli.main import person_handler
    from megaflow.records import Recorder

    acl.apply(redis_client, "mf", PASSWORDS)
    urls = {
        p: acl.role_url(redis_server.url, p, add_person(redis_client, "mf", p, f"{p}-secret")) for p in ("alice", "bob")
    }
    ctl_url = acl.role_url(redis_server.url, acl.user_name("mf", "control"), PASSWORDS["control"])
    rt = Root(settings.model_copy(update={"redis_url": ctl_url}), role="control")
    stop = threading.Event()
    server = RequestServer(rt.redis, rt.keys, person_handler(Client.on_root(rt)))
    threads = [
        threading.Thread(target=server.run, args=(stop,), daemon=True),
        threading.Thread(target=Recorder(rt.redis, rt.keys, rt.metadata).run, args=(stop,), daemon=True),
    ]
    for t in threads:
        t.start()
    clients = {p: Client(settings.model_copy(update={"redis_url": u})) for p, u in urls.items()}
    yield urls, clients
    stop.set()
    for t in threads:
        t.join(10)
    for c in clients.values():
        c.close()
    rt.redis.close()
    redis_client.execute_command("ACL", "DELUSER", *(acl.user_name("mf", r) for r in acl.ROLES), "alice", "bob")


def specs(n: int = 2):
    return demo_specs("fix", grading="exit_code")[:n]


def test_a_person_does_everything_on_their_own_batches(people, redis_client):
    _, clients = people
    alice = clients["alice"]
    sub = alice.submit(specs(3), user="alice")
    assert redis_client.hget(KEYS.batch(sub.batch_id), "user") == "alice"  # the owner, recorded at submit
    assert len(sub.episode_ids) == 3
    status = alice.status(sub.batch_id)
    assert status["total"] == 3 and status["done"] == 0
    rows = alice.results(sub.batch_id)
    assert sorted(r["episode_id"] for r in rows) == sorted(sub.episode_ids)
    with pytest.raises(NotFoundError, match="no trajectory yet"):  # her own episode: served, just not finished
        alice.trajectory(sub.episode_ids[0])
    assert alice.cancel(sub.batch_id) == 3
    final = alice.wait(sub.batch_id, timeout=60)
    assert final["done"] == 3 and final["counts"] == {states.CANCELLED: 3}
    with pytest.raises(SpecError, match="not the Redis user you authenticated as"):
        alice.submit(specs(1), user="bob")


def test_a_person_cannot_read_or_cancel_another_persons_batch_through_the_client(people, redis_client):
    _, clients = people
    bob_batch = clients["bob"].submit(specs(2), user="bob")
    alice = clients["alice"]
    for op in (alice.status, alice.results, alice.cancel, alice.wait):
        with pytest.raises(NotFoundError, match="none of alice's batches"):
            op(bob_batch.batch_id)
    with pytest.raises(NotFoundError, match="none of alice's episodes"):
        alice.trajectory(bob_batch.episode_ids[0])
    with pytest.raises(NotFoundError, match="none of alice's batches"):
        alice.status("no-such-batch")  # an unknown batch answers the same: nothing leaks about others' ids
    for eid in bob_batch.episode_ids:  # Bob's episodes untouched
        assert redis_client.hget(KEYS.episode(eid), "terminal") != "1"
    assert clients["bob"].status(bob_batch.batch_id)["done"] == 0


def test_a_forged_request_is_judged_by_the_stream_it_came_on(people, redis_server):
    """Alice writing a request by hand (claiming to be bob) still acts as alice: the name comes from the key."""
    urls, clients = people
    bob_batch = clients["bob"].submit(specs(1), user="bob")
    raw = redis.Redis.from_url(urls["alice"], decode_responses=True)
    args = json.dumps({"batch_id": bob_batch.batch_id, "user": "bob"})
    raw.xadd(KEYS.user("alice", "req"), {"op": "cancel", "rid": "forged1", "args": args})
    got = raw.blpop([KEYS.user("alice", "rep", "forged1")], timeout=30)
    assert got is not None
    assert json.loads(got[1])["error"]["type"] == "NotFoundError"
    submit = json.dumps({"specs": specs(1), "batch_id": "alice-b1"})
    answers = []
    for rid in ("sub1", "sub2"):  # the same submit served twice (a replay) makes one batch
        raw.xadd(KEYS.user("alice", "req"), {"op": "submit", "rid": rid, "args": submit})
        got = raw.blpop([KEYS.user("alice", "rep", rid)], timeout=30)
        assert got is not None
        answers.append(json.loads(got[1]))
    assert answers[0]["result"]["batch_id"] == "alice-b1"
    assert answers[1]["error"]["type"] == "SpecError" and "already exists" in answers[1]["error"]["message"]
    raw.close()
    assert clients["bob"].status(bob_batch.batch_id)["counts"].get(states.CANCELLED, 0) == 0


def test_raw_redis_with_a_persons_credentials_reaches_nothing_of_the_fleet(people, redis_client):
    urls, clients = people
    bob_batch = clients["bob"].submit(specs(1), user="bob")
    eid = bob_batch.episode_ids[0]
    raw = redis.Redis.from_url(urls["alice"], decode_responses=True)
    refused = [
        lambda: raw.hgetall(KEYS.batch(bob_batch.batch_id)),
        lambda: raw.lrange(KEYS.batch_episodes(bob_batch.batch_id), 0, -1),
        lambda: raw.hgetall(KEYS.episode(eid)),
        lambda: raw.lrange(KEYS.history(eid), 0, -1),
        lambda: raw.hset(KEYS.episode(eid), "terminal", "1"),
        lambda: raw.hset(KEYS.res("quotas"), "alice", 1000),
        lambda: raw.sadd(KEYS.res("drained"), "test-host"),
        lambda: raw.xadd(KEYS.user("bob", "req"), {"op": "cancel", "rid": "x", "args": "{}"}),
        lambda: raw.blpop([KEYS.user("bob", "rep", "x")], timeout=1),
        lambda: raw.lpush(broker_queue_key("mf", "agent"), "{}"),
        lambda: raw.hgetall(broker_prefix("mf") + "unacked"),
        lambda: raw.xrange(KEYS.events),
        lambda: raw.smembers(KEYS.persons),
        lambda: raw.scan(0, match="*"),
        lambda: raw.keys("*"),
        lambda: raw.eval("return redis.call('GET', KEYS[1])", 1, KEYS.res("quotas")),
        lambda: raw.publish("anything", "x"),
        lambda: raw.flushall(),
        lambda: raw.execute_command("ACL", "SETUSER", "alice", "~*"),
    ]
    for i, attempt in enumerate(refused):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"attempt {i} was allowed")
    raw.close()
    assert redis_client.hget(KEYS.episode(eid), "terminal") != "1"
    assert redis_client.hget(KEYS.res("quotas"), "alice") is None


def test_the_cli_as_a_person(people, redis_client, settings, capsys):
    from megaflow.cli.errors import run
    from megaflow.cli.main import app

    urls, clients = people
    bob_batch = clients["bob"].submit(specs(1), user="bob")
    env = {"MEGAFLOW_REDIS_URL": urls["alice"], "MEGAFLOW_STATE_DIR": settings.state_dir}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        capsys.readouterr()
        assert run(app, ["cancel", bob_batch.batch_id]) != 0
        assert "none of alice's batches" in capsys.readouterr().err
        assert run(app, ["trajectory", bob_batch.episode_ids[0]]) != 0
        assert "none of alice's episodes" in capsys.readouterr().err
        assert run(app, ["quota", "set", "alice", "1000"]) != 0
        assert run(app, ["host", "drain", "test-host"]) != 0
        own = clients["alice"].submit(specs(1), user="alice")
        assert run(app, ["status", bob_batch.batch_id]) != 0  # the records, too, only of her own batches
        assert "none of alice's batches" in capsys.readouterr().err
        assert run(app, ["status", own.batch_id, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["batch_id"] == own.batch_id
        deadline = time.monotonic() + 60  # the recorder writes the records a moment after the submit
        while True:
            assert run(app, ["status", "--json"]) == 0
            listed = json.loads(capsys.readouterr().out)["batches"]
            if listed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [b["batch_id"] for b in listed] == [own.batch_id]  # bob's batch (recorded too) is not listed
        from megaflow.status import overview

        assert bob_batch.batch_id in {b["batch_id"] for b in overview(settings)["batches"]}  # the operator's view
        assert run(app, ["cancel", own.batch_id, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["cancelling"] == 1
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert redis_client.hget(KEYS.res("quotas"), "alice") is None
    assert clients["bob"].status(bob_batch.batch_id)["done"] == 0
