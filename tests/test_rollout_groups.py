"""Rollout and resume bookkeeping on a real Redis, with episodes ended by hand instead of by workers.

No env host is registered, so nothing is admitted; the test plays the fleet's part by ending
episodes through the engine, which lets it choose exactly which attempt fails for infra.
"""

from __future__ import annotations

import threading

from megaflow import Client
from megaflow.core import states
from megaflow.demo_tasks import demo_specs
from tests.helpers import wait_until


def end(client: Client, episode_id: str, state: str, *, cause: str | None = None, reward: float | None = None):
    ep = client.rt.engine.load(episode_id)
    assert client.rt.engine.advance(
        ep,
        state=state,
        terminal=True,
        phase="finished",
        fields={"cause": cause or "", "reward": "" if reward is None else str(reward)},
    )


def batch_eps(client: Client, batch_id: str) -> list[str]:
    wait_until(lambda: client.rt.redis.exists(client.rt.keys.batch_episodes(batch_id)), 30, f"batch {batch_id}", 0.02)
    return client.rt.engine.batch_ids(batch_id)


def test_a_retry_that_succeeds_unmasks_the_group_and_groups_come_as_they_finish(settings):
    with Client(settings) as client:
        groups: list[dict] = []
        it = client.rollout(
            demo_specs("fix")[:2],
            replicas=2,
            user="rl",
            policy_version="p1",
            max_infra_retries=2,
            timeout=30,
            trajectories=False,
        )
        root = it.batch_id
        consumer = threading.Thread(target=lambda: groups.extend(it))
        consumer.start()
        g0a, g0b, g1a, g1b = batch_eps(client, root)
        end(client, g1a, states.SUCCEEDED, reward=1.0)
        end(client, g1b, states.FAILED, cause=states.CAUSE_TESTS, reward=0.0)
        end(client, g0a, states.SUCCEEDED, reward=1.0)
        end(client, g0b, states.FAILED, cause=states.CAUSE_INFRA)  # retried as a new episode
        wait_until(lambda: len(groups) >= 1, 30, "the first complete group", 0.05)
        assert [g["index"] for g in groups] == [1] and groups[0]["rewards"] == [1.0, 0.0]
        (retry,) = batch_eps(client, f"{root}-retry1")
        end(client, retry, states.FAILED, cause=states.CAUSE_INFRA)  # and once more
        (retry2,) = batch_eps(client, f"{root}-retry2")
        end(client, retry2, states.SUCCEEDED, reward=1.0)
        consumer.join(15)
        assert not consumer.is_alive()
        g0 = groups[1]
        assert g0["index"] == 0 and g0["rewards"] == [1.0, 1.0] and not g0["masked"]
        assert g0["episodes"][1]["attempts"] == 3 and g0["episodes"][1]["retried_from"] == [g0b, retry]
        assert g0["policy_version"] == "p1"
        assert client.rt.engine.load(retry2, history=False).fields["policy_version"] == "p1"
        final = client.final_results(root)
        assert [r["episode_id"] for r in final] == [g0a, retry2, g1a, g1b]


def test_resume_skips_finished_and_running_and_reruns_infra(settings):
    with Client(settings) as client:
        sub = client.submit(demo_specs("noop")[:4], user="batch")
        a, b, c, d = sub.episode_ids
        end(client, a, states.SUCCEEDED, reward=1.0)
        end(client, b, states.FAILED, cause=states.CAUSE_INFRA)
        end(client, c, states.TIMED_OUT, cause=states.CAUSE_TIMEOUT)  # the agent's budget: not re-run
        res = client.resume(sub.batch_id)  # d is still queued
        assert (res.skipped_finished, res.still_running, list(res.resubmitted)) == (2, 1, [b])
        assert res.rerun_batch == f"{sub.batch_id}-resume1"
        new = res.resubmitted[b]
        assert client.rt.engine.load(new, history=False).spec == client.rt.engine.load(b, history=False).spec
        assert client.rt.redis.hget(client.rt.keys.batch(res.rerun_batch), "user") == "batch"
        assert client.resume(sub.batch_id).resubmitted == {}  # the re-run is still queued: nothing to do
        end(client, new, states.SUCCEEDED, reward=1.0)
        assert [r["episode_id"] for r in client.final_results(sub.batch_id)] == [a, new, c, d]
