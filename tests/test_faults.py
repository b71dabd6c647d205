"""Fault injection on a real fleet: one fault per test, every count 0 (bench/faults.py prints the figures).

One private redis-server (AOF, fsync every second) and one local fleet serve the module; each test
submits the demo batch, injects its fault once episodes are in flight, and checks that no episode
is lost, duplicated or ends wrong, and that no slot, container or stranded episode is left. The
Docker-engine restart runs on a fleet of its own whose env workers use a PRIVATE dockerd (own socket,
data root, exec root, pid file; no bridge, no iptables), never the machine's shared engine.
Host loss and the stall sweep are also checked without a fleet, on a plain Redis, at the end.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from bench.faults import BY_NAME, HEADER, Tier
from megaflow.control import Control, audit
from megaflow.core import states
from megaflow.core.settings import Settings
from megaflow.services.root import Root
from tests.helpers import wait_until

pytestmark = pytest.mark.faults

RECORDER_DOWN_S = float(os.environ.get("MEGAFLOW_FAULTS_RECORDER_DOWN_S", "15"))
EPISODES = int(os.environ.get("MEGAFLOW_FAULTS_EPISODES", "24"))


@pytest.fixture(scope="module")
def tier(sandbox_image):
    with Tier(episodes=EPISODES, recorder_down_s=RECORDER_DOWN_S, echo=lambda m: None) as t:
        print("\n" + HEADER)
        yield t


@pytest.mark.parametrize("name", [n for n, s in BY_NAME.items() if not s.private_docker])
def test_fault(tier, name):
    res = tier.run(BY_NAME[name])
    print(res.row())
    assert res.ok(), f"{res.row()}\n" + "\n".join(res.notes)
    assert res.recovery_s is not None, "episodes in flight at the fault never moved on"


def test_docker_engine_restart(sandbox_image):
    """The env workers' Docker engine (a private dockerd) restarted with a batch in flight."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("a private dockerd needs root and the dockerd binary")
    with Tier(episodes=EPISODES, echo=lambda m: None, private_docker=True) as t:
        res = t.run(BY_NAME["docker-restart"])
    print("\n" + HEADER + "\n" + res.row() + "\n" + "\n".join(res.notes))
    assert res.hit, "no container was running when the engine stopped: the fault hit nothing"
    assert res.ok(), f"{res.row()}\n" + "\n".join(res.notes)
    assert res.recovery_s is not None, "episodes in flight at the fault never moved on"


# --- host loss and stalls on a plain Redis (no workers: messages are written, never consumed) ------------
def _root(redis_server, tmp_path, **over) -> Root:
    s = Settings.load(
        redis_url=redis_server.url,
        state_dir=str(tmp_path / "state"),
        host_name="h1",
        host_ttl_s=2.0,  # short, yet long enough for a loaded machine between a beat and an admission
        lease_s=30,
        sweep_interval_s=0.2,
        stall_timeout_s=1.5,
        metrics_port=0,
        **over,
    )
    return Root(s, role="control")


def _beat(rt: Root, *hosts: str) -> None:
    for h in hosts:
        rt.resources.register_host(h, capacity=2, images=[], warm={}, disk_free_gb=10.0)


def _submit(rt: Root, n: int) -> list[str]:
    from megaflow.core.spec import validate_specs
    from megaflow.demo_tasks import demo_specs

    specs = validate_specs(demo_specs("fix")[:n])
    _bid, ids = rt.engine.create_batch(specs, "u1")
    rt.resources.enqueue([{"episode_id": e, "user": "u1", "image": "img"} for e in ids])
    return ids


def _sweep_until(ctl: Control, done, keep_alive: tuple[str, ...] = (), timeout: float = 30.0) -> None:

    def swept() -> bool:
        if done():
            return True
        _beat(ctl.rt, *keep_alive)
        ctl.sweep_once()
        return False

    wait_until(swept, timeout, "the sweeps to reach the condition")


def test_lost_host_episodes_move_then_end_as_infra_after_max_attempts(redis_server, redis_client, tmp_path):
    rt = _root(redis_server, tmp_path, infra_max_attempts=2)
    ctl = Control(rt)
    ctl.back_at = time.monotonic() - 60  # no settling period: the test starts with Redis up
    ids = _submit(rt, 2)
    _beat(rt, "h1")  # after building the specs (slow: the harness loads), within the 2 s host TTL
    assert rt.lifecycle.admit() == 2
    assert {rt.engine.load(e, history=False).host for e in ids} == {"h1"}
    rt.resources.drain_host("h1", True)  # being drained (scale in) when it is lost: its record says so
    # h1 stops beating; h2 joins: the episodes move to h2 as attempt 2, steps moved on, slots re-taken there
    steps = {e: rt.engine.load(e, history=False).step for e in ids}
    per_attempt = {"agent_state": '{"phase": "waiting"}', "agent_request": "{}", "installed_started": "1"}
    for e in ids:  # what the first attempt's agent knew (its program ran in h1's container)
        redis_client.hset(rt.keys.episode(e), mapping={**per_attempt, "submission": "diff"})
    _sweep_until(ctl, lambda: all(rt.engine.load(e, history=False).host == "h2" for e in ids), keep_alive=("h2",))
    for e in ids:
        ep = rt.engine.load(e, history=False)
        assert ep.state == states.ADMITTED and ep.num("attempt") == 2 and ep.step > steps[e]
        assert rt.resources.placement(e)["host"] == "h2"
        assert not set(ep.fields) & {*per_attempt, "submission"}, ep.fields  # the new attempt's agent starts over
        [move] = ep.fleet_events()  # the episode's own record of the move (results, status, report)
        assert (move["event"], move["from_host"], move["attempt"]) == ("moved", "h1", 2)
        assert move["reason"].endswith(f"lost (no heartbeat for {rt.settings.host_ttl_s:g}s) while draining"), move
        assert rt.engine.summaries([e])[0]["fleet"] == [move]
    assert "h1" in rt.resources.host_loss.lost()
    # h2 is lost too: out of attempts, each ends FAILED (infra) with its slots freed
    _sweep_until(ctl, lambda: all(rt.engine.load(e, history=False).terminal for e in ids))
    for e in ids:
        ep = rt.engine.load(e, history=False)
        assert (ep.state, ep.fields["cause"]) == (states.FAILED, states.CAUSE_INFRA), ep.fields
        assert [m["from_host"] for m in ep.fleet_events()] == ["h1"]  # the last loss ended it: no move
        assert rt.resources.placement(e) is None
    assert audit(rt, ids) == []
    rt.close()


def test_stalled_episode_gets_its_next_task_again(redis_server, redis_client, tmp_path):
    rt = _root(redis_server, tmp_path)
    ctl = Control(rt)
    ctl.back_at = time.monotonic() - 60
    _beat(rt, "h1")
    (eid,) = _submit(rt, 1)
    rt.lifecycle.admit()
    queue = rt.keys.prefix + ":celery:env.h1"
    assert redis_client.llen(queue) == 1
    assert audit(rt, [eid]) == []
    redis_client.delete(queue)  # the provision message is lost (as with Redis's last second of writes)
    assert audit(rt, [eid]) == [eid]
    _sweep_until(ctl, lambda: redis_client.llen(queue) == 1, keep_alive=("h1",))
    assert audit(rt, [eid]) == []
    rt.close()


def test_no_host_judged_lost_right_after_redis_comes_back(redis_server, redis_client, tmp_path):
    rt = _root(redis_server, tmp_path)
    ctl = Control(rt)  # just started (as after an outage): heartbeats get time to arrive
    _beat(rt, "h1")
    ids = _submit(rt, 1)
    rt.lifecycle.admit()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # h1's beat is older than its TTL now
        ctl.sweep_once()
        time.sleep(0.1)
    assert rt.engine.load(ids[0], history=False).host == "h1"
    assert rt.resources.host_loss.lost() == {}
    rt.close()


class SlowUpkeepHost:
    """An env backend whose upkeep pass hangs until released (container removals on a loaded machine)."""

    backend = "slow"

    def __init__(self):
        self.in_pass = threading.Event()
        self.release = threading.Event()

    def report(self) -> dict:
        return {"capacity": 2, "images": [], "warm": {}, "disk_free_gb": 10.0}

    def maintain(self, is_live=None) -> dict:
        self.in_pass.set()
        self.release.wait(120)
        return {}


def test_a_slow_upkeep_pass_does_not_hold_the_heartbeat(redis_server, redis_client, tmp_path):
    """A beat held past host_ttl_s by the host's upkeep got the host judged lost and its episodes moved."""
    from megaflow.workers.process import Heartbeat

    env_host = SlowUpkeepHost()
    rt = Root(_root(redis_server, tmp_path).settings, role="env", host="h1", env_host=env_host)
    hb = Heartbeat(rt, "env@h1", [], 1)
    hb.maintain_every = 0.5
    hb.start()
    try:
        assert env_host.in_pass.wait(30), "no upkeep pass started"
        stuck_since = time.time()
        key = rt.keys.worker_health("env", "env@h1")

        def beat_after_a_ttl() -> bool:
            assert env_host.in_pass.is_set() and not env_host.release.is_set()
            return float(json.loads(redis_client.get(key) or "{}").get("ts", 0)) > stuck_since + rt.settings.host_ttl_s

        wait_until(beat_after_a_ttl, 30, "a beat more than host_ttl_s into the hanging upkeep pass")
        assert [h["alive"] for h in rt.resources.hosts() if h["name"] == "h1"] == [True]
    finally:
        env_host.release.set()
        hb.stop.set()
        hb.join(10)
        rt.close()
