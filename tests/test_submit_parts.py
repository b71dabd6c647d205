"""A large submit is written and admitted part by part; a submit failing part way leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from megaflow import Client
from megaflow import client as client_mod
from megaflow.core.keys import Keys
from megaflow.demo_tasks import demo_specs
from megaflow.engine.episodes import EpisodeEngine


def specs(n: int) -> list[dict]:
    base = demo_specs("fix")[0]
    return [dict(base, task_id=f"t{i}") for i in range(n)]


@pytest.fixture
def parts_of_three(monkeypatch):
    monkeypatch.setattr(client_mod, "SUBMIT_PART", 3)


def fail_at(monkeypatch, start: int) -> None:
    """Make the engine's write of the part beginning at episode ``start`` fail as a lost Redis would."""
    real = EpisodeEngine.create_batch

    def create_batch(self, specs, user, batch_id=None, **kw):
        if kw.get("start", 0) == start:
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return real(self, specs, user, batch_id, **kw)

    monkeypatch.setattr(EpisodeEngine, "create_batch", create_batch)


def test_a_batch_longer_than_a_part_is_queued_and_admitted_part_by_part(settings, redis_client, parts_of_three):
    with Client(settings) as client:
        client.rt.resources.register_host("h1", capacity=100, images=[], warm={}, disk_free_gb=10.0)
        sub = client.submit(specs(7), user="alice", batch_id="big")
        keys = client.rt.keys
        assert sub.episode_ids == [f"big-{i:05d}" for i in range(7)]
        assert redis_client.lrange(keys.batch_episodes("big"), 0, -1) == sub.episode_ids
        batch = redis_client.hgetall(keys.batch("big"))
        assert batch["size"] == "7" and batch["written"] == "7" and batch["user"] == "alice"
        eps = [redis_client.hgetall(keys.episode(e)) for e in sub.episode_ids]
        assert [e["task_id"] for e in eps] == [f"t{i}" for i in range(7)]
        assert [e["index"] for e in eps] == [str(i) for i in range(7)]
        assert {e["state"] for e in eps} == {"ADMITTED"}
        assert client.rt.resources.queue_length() == 0
        # one submit call: the same t:submitted; each part queued when written, after the last was admitted
        assert len({e["t:submitted"] for e in eps}) == 1
        assert all(float(e["t:submitted"]) <= float(e["t:queued"]) <= float(e["t:admitted"]) for e in eps)
        assert float(eps[2]["t:admitted"]) <= float(eps[3]["t:queued"])
        assert float(eps[5]["t:admitted"]) <= float(eps[6]["t:queued"])
        status = client.status("big")
        assert status["counts"] == {"ADMITTED": 7} and "unwritten" not in status


def test_a_submit_failing_part_way_cancels_the_episodes_it_wrote(settings, redis_client, parts_of_three, monkeypatch):
    fail_at(monkeypatch, 6)
    with Client(settings) as client:
        client.rt.resources.register_host("h1", capacity=100, images=[], warm={}, disk_free_gb=10.0)
        with pytest.raises(redis.ConnectionError, match="injected"):
            client.submit(specs(8), user="alice", batch_id="half")
        keys = client.rt.keys
        ids = redis_client.lrange(keys.batch_episodes("half"), 0, -1)
        assert ids == [f"half-{i:05d}" for i in range(6)]  # two parts of three, nothing of the third
        for eid in ids:
            ep = redis_client.hgetall(keys.episode(eid))
            assert ep["state"] == "CANCELLED" and ep["terminal"] == "1", ep
            assert "the submit of batch half failed after 6 of 8 episodes" in ep["error"], ep["error"]
            assert "ConnectionError: Connection reset by peer (injected)" in ep["error"]
        assert client.rt.resources.queue_length() == 0
        assert not redis_client.hlen(keys.res() + ":held")  # every slot the admitted ones held is free again
        status = client.status("half")
        assert status["counts"] == {"CANCELLED": 6} and status["unwritten"] == 2  # the part it never wrote


def test_a_submit_whose_first_part_fails_leaves_nothing(settings, redis_client, parts_of_three, monkeypatch):
    fail_at(monkeypatch, 0)
    with Client(settings) as client:
        with pytest.raises(redis.ConnectionError, match="injected"):
            client.submit(specs(5), user="alice", batch_id="none")
    assert redis_client.keys("*") == []


SUBMITTER = """
import sys
from megaflow import Client
from megaflow.demo_tasks import demo_specs
base = demo_specs("fix")[0]
with Client() as client:
    client.rt.resources.register_host("h1", capacity=100000, images=[], warm={}, disk_free_gb=10.0)
    client.submit([dict(base, task_id=f"t{i}") for i in range(int(sys.argv[1]))], user="alice", batch_id="killed")
"""


def test_a_submitter_killed_part_way_leaves_every_written_episode_queued_or_admitted(settings, redis_client):
    env = dict(os.environ, MEGAFLOW_REDIS_URL=settings.redis_url, MEGAFLOW_STATE_DIR=settings.state_dir,
               MEGAFLOW_MAX_BATCH_EPISODES="20000", PYTHONPATH=os.getcwd())  # fmt: skip
    keys = Keys(settings.key_prefix)
    proc = subprocess.Popen([sys.executable, "-c", SUBMITTER, "20000"], env=env)
    try:
        deadline = time.monotonic() + 60
        while redis_client.llen(keys.batch_episodes("killed")) < 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no clean-up runs
    finally:
        proc.wait(10)
    ids = redis_client.lrange(keys.batch_episodes("killed"), 0, -1)
    assert 1000 <= len(ids) < 20000 and len(ids) % client_mod.SUBMIT_PART == 0, len(ids)  # whole parts only
    assert redis_client.hget(keys.batch("killed"), "written") == str(len(ids))
    pipe = redis_client.pipeline(transaction=False)
    for eid in ids:
        pipe.hget(keys.episode(eid), "state")
    states_ = pipe.execute()
    queued = set(redis_client.hkeys(keys.res() + ":queued"))
    held = set(redis_client.hkeys(keys.res() + ":held"))
    assert {s for s in states_} <= {"QUEUED", "ADMITTED"}
    for eid, state in zip(ids, states_):  # none stranded: each waits in the FIFO or holds its slots
        assert (eid in queued) if state == "QUEUED" else (eid in held), (eid, state)
    hashes = [k for k in redis_client.keys(keys.episode("killed-*")) if k.count(":") == keys.episode("x").count(":")]
    assert len(hashes) == len(ids)  # nothing written outside the list
    with Client(settings) as client:
        assert client.status("killed")["unwritten"] == 20000 - len(ids)
