"""Persistent mode against the real Docker engine: warm pool fill, hand-out with liveness check, refill, trim."""

from __future__ import annotations

import time
import uuid

import pytest

from megaflow.env_hosts import DockerHost
from megaflow.env_hosts import labels as L
from tests.helpers import wait_until


@pytest.fixture
def warm_host(docker_client, sandbox_image, settings, redis_client):
    name = f"t-env-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"env_mode": "persistent", "warm_pool_size": 2, "default_image": sandbox_image})
    host = DockerHost(docker_client, s, name=name, redis_client=redis_client)
    yield host
    host.shutdown()
    for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
        host.remove_container(c["Id"])
    host.disk.sweep(host.containers.list_all_ids)  # disk files of auto-removed warm containers


def wait_for(predicate, timeout=20.0):
    wait_until(predicate, timeout, getattr(predicate, "__name__", "a condition"))


def test_pool_fills_hands_out_and_refills(warm_host, docker_client, sandbox_image, redis_client):
    host = warm_host
    host.maintain()
    assert host.report()["warm"] == {sandbox_image: 2}
    warm_ids = {e.container_id for e in host.pool.entries(sandbox_image)}

    started = time.perf_counter()
    handle = host.create("ep-w1", sandbox_image, labels={"run": "b1"}, mode="persistent")
    took = time.perf_counter() - started
    assert handle.data["warm"] is True and handle.id in warm_ids and handle.mode == "persistent"
    assert took < 0.5
    claim = host.claims()[handle.id]
    assert claim["episode_id"] == "ep-w1" and claim["labels"] == {L.RUN: "b1"}
    assert redis_client.hexists(host.keys.env(host.name, "claims"), handle.id)
    assert host.execute(handle, "echo warm", timeout=10).output == "warm\n"

    wait_for(lambda: host.report()["warm"].get(sandbox_image) == 2)  # refilled in the background
    host.close(handle)  # a used container is removed, never put back
    wait_for(lambda: not docker_client.api.containers(all=True, filters={"id": handle.id}))
    assert handle.id not in host.claims()
    assert handle.id not in {e.container_id for e in host.pool.entries(sandbox_image)}


def test_liveness_check_skips_a_dead_warm_container(warm_host, docker_client, sandbox_image):
    host = warm_host
    host.maintain()
    first, second = list(host.pool.entries(sandbox_image))
    docker_client.api.kill(first.container_id)  # dies while waiting in the pool
    docker_client.api.wait(first.container_id, timeout=20)
    handle = host.create("ep-w2", sandbox_image, labels={}, mode="persistent")
    assert handle.id == second.container_id
    wait_for(lambda: not docker_client.api.containers(all=True, filters={"id": first.container_id}))
    assert host.execute(handle, "true", timeout=10).exit_code == 0


def test_empty_pool_boots_a_fresh_container(warm_host, sandbox_image):
    host = warm_host
    handle = host.create("ep-w3", sandbox_image, labels={}, mode="persistent")
    assert handle.data["warm"] is False and handle.mode == "persistent"
    assert host.execute(handle, "echo ok", timeout=10).output == "ok\n"
    wait_for(lambda: host.report()["warm"].get(sandbox_image) == 2)


def test_idle_warm_containers_are_replaced_and_unwanted_pools_dropped(warm_host, docker_client, sandbox_image):
    host = warm_host
    host.maintain()
    old = {e.container_id for e in host.pool.entries(sandbox_image)}
    for e in host.pool.entries(sandbox_image):
        e.started -= host.settings.warm_idle_s + 1  # pretend they idled too long
    counts = host.maintain()
    assert counts["warm_trimmed"] == 2 and counts["warm_started"] == 2
    new = {e.container_id for e in host.pool.entries(sandbox_image)}
    assert not (old & new)
    for cid in old:
        wait_for(lambda cid=cid: not docker_client.api.containers(all=True, filters={"id": cid}))

    # an image asked for in persistent mode gets a pool; nobody asks for it again -> pool dropped
    host.pool.want("megaflow-pool-extra:none", at=time.time() - host.settings.warm_idle_s - 1)
    host.pool.trim()
    assert "megaflow-pool-extra:none" not in host.pool.wanted()
    assert sandbox_image in host.pool.wanted()  # the default image stays pinned in persistent mode


def test_warm_container_whose_runner_died_is_not_handed_out(warm_host, docker_client, sandbox_image):
    host = warm_host
    host.maintain()
    entries = list(host.pool.entries(sandbox_image))
    assert all(e.container_id in host.exec_sessions for e in entries)
    for e in entries:  # the runner dies while its container waits in the pool
        exec_id = docker_client.api.exec_create(e.container_id, ["pkill", "-f", "python3 -u -c"])["Id"]
        docker_client.api.exec_start(exec_id)
    handle = host.create("ep-w4", sandbox_image, labels={}, mode="persistent")
    assert not handle.data["warm"] and handle.id not in {e.container_id for e in entries}
    for e in entries:
        wait_for(lambda e=e: not docker_client.api.containers(all=True, filters={"id": e.container_id}))
    r = host.execute(handle, "echo via-exec", timeout=10)
    assert (r.exit_code, r.output) == (0, "via-exec\n")
