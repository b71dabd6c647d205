"""Reaper against the real Docker engine: an env worker killed with SIGKILL mid-episode leaves containers behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from megaflow.env_hosts import DockerHost
from megaflow.env_hosts import labels as L

CHILD = textwrap.dedent("""
    import json, sys, time
    import docker, redis
    from megaflow.env_hosts import DockerHost
    from megaflow.core.settings import Settings

    settings = Settings.load(env_mode="persistent", warm_pool_size=1)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    host = DockerHost(docker.from_env(), settings, name=sys.argv[1], redis_client=r)
    host.maintain()                                                  # one warm container
    eph = host.create("ep-dead", settings.default_image, labels={"run": "b1"})
    warm = host.create("ep-dead-warm", settings.default_image, labels={}, mode="persistent")
    host.execute(eph, "echo busy > /tmp/state", timeout=10)
    host.pool.refill()                                               # pool full again
    print(json.dumps({"eph": eph.id, "warm": warm.id,
                      "pool": [e.container_id for img in host.pool.wanted() for e in host.pool.entries(img)],
                      "owner": host.instance_id}), flush=True)
    time.sleep(600)                                                  # "mid-episode"
""")


@pytest.fixture
def host_name(docker_client, settings):
    name = f"t-env-{uuid.uuid4().hex[:8]}"
    yield name
    host = DockerHost(docker_client, settings, name=name)
    for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
        host.remove_container(c["Id"])
    host.disk.sweep(host.containers.list_all_ids)  # disk files of containers that stopped by themselves


def exists(docker_client, cid: str) -> bool:
    return bool(docker_client.api.containers(all=True, filters={"id": cid}))


def test_reaper_after_kill_9_of_an_env_worker(docker_client, sandbox_image, settings, redis_client, host_name):
    env = {
        **os.environ,
        **settings.to_env(),
        "MEGAFLOW_DEFAULT_IMAGE": sandbox_image,
        "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    child = subprocess.Popen([sys.executable, "-c", CHILD, host_name], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, "the child env worker did not start"
        made = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    # a live episode of this host, a container of another host, and a container without our labels
    live_host = DockerHost(
        docker_client, settings, name=host_name, redis_client=redis_client, is_live=lambda ep: ep == "ep-live"
    )
    live = live_host.create("ep-live", sandbox_image, labels={})
    other = DockerHost(docker_client, settings, name=host_name + "-other", redis_client=redis_client)
    foreign = other.create("ep-dead", sandbox_image, labels={})
    bare = docker_client.api.create_container(
        sandbox_image, ["sleep", "60"], labels={L.HOST: host_name, L.EPISODE: "ep-dead"}
    )["Id"]
    try:
        removed = set(live_host.maintain()["reaped"])
        assert {made["eph"], made["warm"]} <= removed  # episodes finished or unknown
        for cid in (made["eph"], made["warm"]):
            assert not exists(docker_client, cid)
        assert made["warm"] not in live_host.claims()
        # the dead worker's unclaimed warm containers stopped themselves (their runner lost its
        # owner's stream) and were auto-removed; without a runner the reaper takes them once the
        # owner key lapses
        deadline = time.monotonic() + 20
        while any(exists(docker_client, cid) for cid in made["pool"]):
            if time.monotonic() > deadline:
                redis_client.delete(live_host.keys.env(host_name, "owner", made["owner"]))
                assert set(made["pool"]) <= set(live_host.maintain()["reaped"])
                pytest.fail("the dead worker's warm containers did not stop by themselves")
            time.sleep(0.2)
        # never touched: the live episode, another host's container, a container without the label set
        assert exists(docker_client, live.id)
        assert exists(docker_client, foreign.id)
        assert exists(docker_client, bare)
    finally:
        other.close(foreign)
        docker_client.api.remove_container(bare, force=True)


def test_reaper_removes_containers_whose_lease_lapsed(docker_client, sandbox_image, settings, redis_client, host_name):
    host = DockerHost(docker_client, settings, name=host_name, redis_client=redis_client, is_live=lambda ep: True)
    expired = docker_client.api.create_container(
        sandbox_image,
        ["sleep", "60"],
        labels={
            L.MANAGED: "1",
            L.FLEET: settings.fleet_id,
            L.HOST: host_name,
            L.EPISODE: "ep-old",
            L.LEASE_EXPIRY: f"{time.time() - 1:.0f}",
        },
    )["Id"]
    other_fleet = docker_client.api.create_container(
        sandbox_image,
        ["sleep", "60"],
        labels={
            L.MANAGED: "1",
            L.FLEET: "another-fleet",
            L.HOST: host_name,
            L.EPISODE: "ep-old",
            L.LEASE_EXPIRY: f"{time.time() - 1:.0f}",
        },
    )["Id"]
    fresh = host.create("ep-new", sandbox_image, labels={})
    assert host.maintain()["reaped"] == [expired]
    assert exists(docker_client, fresh.id)
    assert exists(docker_client, other_fleet)  # same host name, another fleet on this engine: not ours
