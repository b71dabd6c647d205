"""Over-sampled rollout groups (keep k of n, cancel the rest) and trajectory-level model priority.

A host is registered by hand so episodes are admitted and hold real slots; the test plays the
workers' part by ending episodes itself, which fixes the order in which replicas finish.
"""

from __future__ import annotations

import threading

from megaflow import Client
from megaflow.core import states, wire
from megaflow.core.spec import validate_specs
from megaflow.engine.episodes import TRAJECTORY_PRIORITY, to_model
from megaflow.rollout import _Slot, choose_kept
from tests.helpers import wait_until


def specs(n: int) -> list[dict]:
    return [
        {
            "task_id": f"t{i}",
            "model": {"backend": "scripted", "replies": ["MEGAFLOW_SUBMIT"]},
            "eval": {"command": "true"},
        }
        for i in range(n)
    ]


def batch_eps(client: Client, batch_id: str) -> list[str]:
    wait_until(lambda: client.rt.redis.exists(client.rt.keys.batch_episodes(batch_id)), 60, f"batch {batch_id}", 0.02)
    return client.rt.engine.batch_ids(batch_id)


def finish(client: Client, episode_id: str, reward: float) -> None:
    ep = client.rt.engine.load(episode_id, history=False)
    assert client.rt.lifecycle.finish(
        ep, states.SUCCEEDED if reward else states.FAILED, reward=reward, cause=None if reward else states.CAUSE_TESTS
    )


def wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    wait_until(cond, timeout_s, what, 0.02)


def test_oversampled_group_keeps_k_cancels_the_rest_and_frees_their_slots(settings):
    s = settings.model_copy(update={"global_limit": 8, "user_limit": 8})
    with Client(s) as client:
        client.rt.resources.register_host("h1", capacity=8, images=[], warm={}, disk_free_gb=100.0)
        groups: list[dict] = []
        run = client.rollout(specs(4), replicas=2, oversample=4, grace=0.0, user="rl", timeout=30, trajectories=False)
        consumer = threading.Thread(target=lambda: groups.extend(run))
        consumer.start()
        ids = batch_eps(client, run.batch_id)
        g0, g2, g3 = ids[0:4], ids[8:12], ids[12:16]
        views = {v["episode_id"]: v for v in client.rt.engine.summaries(ids)}
        assert all(views[e]["state"] == states.ADMITTED for e in ids[:8])  # 8 slots: groups 0 and 1
        assert all(views[e]["state"] == states.QUEUED for e in g2 + g3)
        finish(client, g0[3], 1.0)
        finish(client, g0[2], 0.0)  # k = 2 finished: with grace 0 the group closes now
        wait_for(lambda: len(groups) == 1, "group 0")
        (group,) = groups
        assert group["index"] == 0 and group["kept"] == [2, 3] and group["rewards"] == [0.0, 1.0]
        assert [e["episode_id"] for e in group["episodes"]] == [g0[2], g0[3]]
        assert sorted(group["cancelled"]) == [g0[0], g0[1]] and group["censored"] == 2 and not group["masked"]
        after = {v["episode_id"]: v for v in client.rt.engine.summaries(ids)}
        assert [after[e]["state"] for e in g0[:2]] == [states.CANCELLED, states.CANCELLED]
        # the 2 finished and the 2 cancelled replicas' slots went at once to the oldest waiting group
        assert all(after[e]["state"] == states.ADMITTED for e in g2)
        assert all(after[e]["state"] == states.QUEUED for e in g3)
        assert client.rt.resources.capacity()["global"]["used"] == 8
        client.cancel(run.batch_id)  # end the rest; the consumer then closes every group
        consumer.join(60)
        assert not consumer.is_alive()
        assert client.rt.resources.capacity()["global"]["used"] == 0


def _slot(replica: int, admitted: float | None, finished: float | None, reward: float = 1.0) -> _Slot:
    view = None
    if finished is not None:
        view = {
            "state": states.SUCCEEDED,
            "cause": None,
            "reward": reward,
            "phases": {"admitted": admitted, "finished": finished},
        }
    return _Slot(0, replica, f"e{replica}", None, result=view)  # type: ignore[arg-type]


def test_kept_subset_is_lowest_indices_finished_by_the_deadline_not_first_to_finish():
    # replicas 3 and 2 finish first (t=10, 11); replica 0 at t=13; replica 1 is the straggler.
    members = [_slot(0, 0.0, 13.0), _slot(1, 0.0, None), _slot(2, 0.0, 11.0), _slot(3, 0.0, 10.0)]
    # deadline = T_k + grace * (T_k - start) = 11 + 0.5 * 11 = 16.5
    assert choose_kept(members, 2, 0.5, now=12.0) is None  # k finished, deadline not reached: wait
    kept = choose_kept(members, 2, 0.5, now=16.6)
    assert [s.replica for s in kept] == [0, 2]  # first-k-to-finish would have kept [2, 3]
    assert [s.replica for s in choose_kept(members, 2, 0.0, now=11.0)] == [0, 2]
    assert [s.replica for s in choose_kept(members[1:], 2, 0.0, now=11.0)] == [2, 3]  # grace 0: first to finish
    assert choose_kept(members[1:], 3, 0.5, now=1e9) is None  # fewer than k finished: wait for them
    everyone = [_slot(r, 0.0, 5.0 + r) for r in range(4)]
    assert [s.replica for s in choose_kept(everyone, 2, 0.5, now=0.0)] == [0, 1]  # all final: close at once


def test_trajectory_priority_sends_model_steps_of_longer_trajectories_first(settings):
    with Client(settings) as client:
        engine, r = client.rt.engine, client.rt.redis
        spec = validate_specs(specs(1))[0]
        flagged = spec.model_copy(update={"metadata": {"priority": TRAJECTORY_PRIORITY}})
        _, (plain, fast) = engine.create_batch([spec, flagged], "u")
        for eid, calls in ((plain, 0), (fast, 0), (fast, 3)):
            ep = engine.load(eid, history=False)
            ep.fields["model_calls"] = str(calls)
            assert engine.advance(ep, next_task=to_model())
        prefix = settings.key_prefix
        plain_key = wire.broker_queue_key(prefix, wire.MODEL_QUEUE)
        assert r.llen(plain_key) == 2  # the unflagged episode, and the flagged one after 3 calls (priority 0)
        assert r.llen(wire.broker_queue_key(prefix, wire.MODEL_QUEUE, 9)) == 1  # its first call: least urgent
        assert wire.broker_queue_key(prefix, wire.MODEL_QUEUE, 7) == plain_key + "\x06\x166"  # kombu's step
        assert [wire.trajectory_priority(c) for c in range(5)] == [9, 6, 3, 0, 0]


def test_scripted_reply_latency_overrides_the_section_and_is_checked():
    import pytest

    from megaflow.model_gateway.base import ModelRequest
    from megaflow.model_gateway.errors import ModelRequestError
    from megaflow.model_gateway.scripted import ScriptedBackend

    replies = [{"content": "slow", "latency_s": 0.05}, "plain"]
    backend = ScriptedBackend()
    first = backend.complete(ModelRequest(messages=[], model={"replies": replies, "latency_s": 0}, call_index=0))
    assert first.content == "slow" and first.latency_s >= 0.05 and "latency_s" not in first.message
    second = backend.complete(ModelRequest(messages=[], model={"replies": replies, "latency_s": 0}, call_index=1))
    assert second.content == "plain"
    with pytest.raises(ModelRequestError, match=r"model\.replies\.0\.latency_s"):
        backend.complete(
            ModelRequest(messages=[], model={"replies": [{"content": "x", "latency_s": -1}]}, call_index=0)
        )
