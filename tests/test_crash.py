"""A worker killed with SIGKILL mid-batch loses no episode: its steps are redelivered and finish."""

from __future__ import annotations

import os
import signal
import time

import pytest

from megaflow import Client, fleet
from megaflow.core import states
from megaflow.core.settings import Settings
from megaflow.demo_tasks import demo_specs
from tests.helpers import wait_until


@pytest.mark.parametrize(
    "inline,victim_names",
    [(False, ("agent", "env-1")), (True, ("model", "env-1"))],
    ids=["agent-service-decisions", "inline-decisions"],
)
def test_kill_9_deciding_workers_loses_no_episode(
    redis_server, redis_client, sandbox_image, tmp_path, inline, victim_names
):
    """Kill -9 the workers that decide (the agent worker, or with MEGAFLOW_AGENT_INLINE the model worker)
    and the env worker while episodes are mid-flight: every episode still ends SUCCEEDED."""
    # short limits so the visibility timeout (the redelivery delay after a crash) is under a minute
    s = Settings.load(
        redis_url=redis_server.url,
        state_dir=str(tmp_path / "state"),
        host_name="crash-host",
        default_image=sandbox_image,
        command_timeout_s=5,
        eval_timeout_s=8,
        model_timeout_s=3,
        model_max_retries=0,
        boot_timeout_s=6,
        pull_timeout_s=6,
        visibility_timeout_s=45,
        episode_budget_s=120,
        container_lifetime_s=200,
        episode_guard_s=300,
        lease_s=10,
        host_ttl_s=10,
        sweep_interval_s=2,
        host_capacity=3,
        metrics_port=0,
        agent_inline=inline,
    )
    fleet.up(s, env_hosts=1, wait_s=120, echo=lambda m: None)
    try:
        with Client(s) as client:
            specs = demo_specs("fix")[:6]
            for spec in specs:  # a second per reply: episodes stay RUNNING long enough to be seen there
                spec["model"]["latency_s"] = 1.0
            sub = client.submit(specs, user="crash")
            victims = {name: pid for name, pid in fleet.running(s).items() if name in victim_names}
            wait_until(  # kill once episodes are mid-flight
                lambda: sum(v["state"] == states.RUNNING for v in client.results(sub.batch_id)) >= 2,
                60,
                lambda: f"2 episodes RUNNING at once: {client.results(sub.batch_id)}",
                0.2,
            )
            for pid in victims.values():
                os.killpg(pid, signal.SIGKILL)
            time.sleep(1)
            assert not any(n in fleet.running(s) for n in victims)
            fleet.up(s, env_hosts=1, wait_s=120, echo=lambda m: None)  # starts what is missing
            client.wait(sub.batch_id, timeout=240)
            res = client.results(sub.batch_id)
            assert [r["state"] for r in res] == [states.SUCCEEDED] * 6, res
            # containers the killed env worker left behind are reaped once their episodes are over
            import docker

            d = docker.from_env()
            deadline = time.monotonic() + 60
            while True:
                left = [
                    c
                    for c in d.containers.list(
                        all=True, filters={"label": f"megaflow.fleet={s.fleet_id}"}, ignore_removed=True
                    )
                    if c.labels.get("megaflow.episode")
                ]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(2)
            d.close()
            assert left == [], [c.name for c in left]
    finally:
        fleet.down(s, echo=lambda m: None)
