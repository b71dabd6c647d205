"""Env hosts apply the warm-pool sizes the elastic fleet publishes (``E:pools``), within their capacity.

The fitting rule is checked on its own; then a real env worker (Docker backend, real containers)
grows, caps and empties its warm pool as the published size changes, from its heartbeat alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from megaflow.core.keys import Keys
from megaflow.elastic.modes import published_pools
from megaflow.elastic.usage import ElasticKeys
from megaflow.engine.resources import ResourceManager
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.pool import WarmPool
from tests.helpers import wait_until


def _pool(settings) -> WarmPool:
    return WarmPool(settings, host="h", instance_id="i", containers=None, sessions=None, claims=None, images=None)


def test_published_sizes_are_fitted_to_the_host_capacity(settings):
    pool = _pool(settings.model_copy(update={"warm_pool_size": 2}))
    assert pool.size("a") == 2  # nothing published: the static setting
    assert pool.set_sizes({"a": 3, "b": 1}, capacity=8) == {"a": 3, "b": 1}
    assert pool.size("a") == 3 and pool.wanted() == {"a", "b"}
    # over capacity: one slot at a time to the images asking most, each published image gets one first
    assert pool.set_sizes({"a": 6, "b": 2, "c": 1}, capacity=4) == {"a": 2, "b": 1, "c": 1}
    assert pool.set_sizes({"a": 6, "b": 2}, capacity=0) == {}
    assert pool.set_sizes({}, capacity=4) == {} and pool.size("a") == 2 and pool.wanted() == set()


def _warm(res: ResourceManager, host: str) -> dict | None:
    row = next((h for h in res.hosts() if h["name"] == host and h["alive"]), None)
    return None if row is None else {k: int(v) for k, v in row["warm"].items() if int(v)}


def _containers(docker_client, host: str) -> int:
    return len(docker_client.api.containers(filters={"label": f"{L.HOST}={host}", "status": "running"}))


def test_env_worker_applies_the_published_pool_size(settings, redis_client, docker_client, sandbox_image, tmp_path):
    host = f"pools-{uuid.uuid4().hex[:6]}"
    s = settings.model_copy(
        update={
            "env_backend": {"type": "docker"},
            "default_image": sandbox_image,
            "env_mode": "ephemeral",
            "warm_pool_size": 0,
            "host_capacity": 3,
            "host_ttl_s": 10.0,
            "lease_s": 10.0,
            "metrics_port": 0,
        }
    )
    res = ResourceManager(redis_client, s, Keys(s.key_prefix))
    pools = ElasticKeys(s.key_prefix).pools
    log_path = tmp_path / f"{host}.log"

    def wait(cond, what: str, timeout_s: float = 120.0) -> None:
        wait_until(cond, timeout_s, lambda: f"{what}; warm={_warm(res, host)}\n{log_path.read_text()[-3000:]}", 0.3)

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megaflow", "worker", "env", "--host", host],
            env=dict(os.environ, **s.to_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1])),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait(lambda: _warm(res, host) == {}, "the host joins with no warm pool")
        redis_client.hset(pools, sandbox_image, 2)  # what publish_pools writes for a persistent image
        assert published_pools(redis_client, s.key_prefix) == {sandbox_image: 2}
        wait(lambda: _warm(res, host) == {sandbox_image: 2}, "pool of 2")
        assert _containers(docker_client, host) == 2
        redis_client.hset(pools, sandbox_image, 5)  # more than the host holds: capped at its capacity
        wait(lambda: _warm(res, host) == {sandbox_image: 3}, "pool capped at capacity 3")
        time.sleep(2 * s.host_ttl_s / 4)  # two more beats: it stays at the cap
        assert _warm(res, host) == {sandbox_image: 3} and _containers(docker_client, host) == 3
        redis_client.hdel(pools, sandbox_image)  # the image went ephemeral: its warm containers go
        wait(lambda: _warm(res, host) == {}, "pool emptied")
        wait(lambda: _containers(docker_client, host) == 0, "warm containers removed")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
        for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={host}"}):
            docker_client.api.remove_container(c["Id"], force=True)
    assert proc.returncode is not None


def test_sim_backend_models_the_warm_pool(settings):
    from megaflow.env_hosts.sim import SimHost

    s = settings.model_copy(update={"host_capacity": 3, "warm_pool_size": 1})
    host = SimHost({"warm_pool": True, "boot_latency_s": 0.2, "warm_latency_s": 0.0}, s, name="sim-pool")
    try:
        first = host.create("e1", "img:a", mode="persistent")  # nothing warm yet: it boots
        assert first.data["warm"] is False  # (its pool's refill boots meanwhile, in the background)

        def wait(cond) -> None:
            wait_until(cond, 20, lambda: f"the pool to settle: {host.report()}", 0.05)

        wait(lambda: host.report()["warm"] == {"img:a": 1})  # the static size, refilled in the background
        assert host.create("e2", "img:a", mode="persistent").data["warm"] is True
        assert host.set_pool_sizes({"img:a": 5, "img:b": 1}) == {"img:a": 2, "img:b": 1}  # fitted to capacity 3
        wait(lambda: host.report()["warm"] == {"img:a": 2, "img:b": 1})
        assert host.create("e3", "img:c", mode="ephemeral").data["warm"] is False
        # starts: e1's own boot, 3 refills of img:a (after e1, after e2, up to 2), 1 of img:b, e3's boot
        assert host.report()["sandbox_starts"] == host.starts == 6
    finally:
        host.shutdown()
