"""A sim fleet sized by the autoscaler through the local provider: 1 host, up to 3 under load, back to 1.

No episode is lost or stranded, and no host is terminated while it holds a live episode (checked
independently at the moment of each termination, from the resource manager's own keys).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from megaflow import fleet
from megaflow.client import Client
from megaflow.core.keys import Keys
from megaflow.elastic import usage
from megaflow.elastic.autoscaler import Autoscaler
from megaflow.elastic.config import ElasticConfig
from megaflow.engine.resources import ResourceManager
from megaflow.report import build_report, fleet_over
from megaflow.stores import open_metadata_store

pytestmark = pytest.mark.fleet

CFG = {
    "min_hosts": 1,
    "max_hosts": 3,
    "cooldown_s": 0,
    "idle_s": 0.5,
    "boot_s": 0,
    "episode_s": 2,
    "target_wait_s": 2,
    "lag_threshold_s": 5,
    "prices": {"local": 0.05},
    "provider": {"type": "local", "name_prefix": "el"},
}


BURST = 16


def spec(i: int) -> dict:
    replies = ["step\n```bash\nwork 1\n```", "step\n```bash\nwork 2\n```", "MEGAFLOW_SUBMIT"]
    return {
        "task_id": f"el-{i}",
        "model": {"backend": "scripted", "replies": replies, "latency_s": 0.2},
        "agent": {"max_steps": 4},
        "eval": {"command": "evaluate"},
    }


class CheckedTerminate:
    """Wraps the provider's terminate: records a violation if the host holds a slot or a placement."""

    def __init__(self, scaler: Autoscaler, res: ResourceManager, r: redis.Redis, keys: Keys):
        self.inner = scaler.provider.terminate
        self.res, self.r, self.keys = res, r, keys
        self.violations: list[str] = []
        self.removed: list[str] = []
        scaler.provider.terminate = self

    def __call__(self, host, *args, **kwargs):
        import json

        held = [json.loads(v)["host"] for v in self.r.hvals(self.keys.res("held"))]
        used = [h["used"] + h["booting"] for h in self.res.hosts() if h["name"] == host.name]
        if host.name in held or any(used):
            self.violations.append(f"{host.name}: held={held.count(host.name)} used={used}")
        self.removed.append(host.name)
        return self.inner(host, *args, **kwargs)


def _serving(res: ResourceManager) -> set[str]:
    return {h["name"] for h in res.hosts() if h["alive"] and not h["drained"]}


def test_local_fleet_scales_out_and_in_without_losing_episodes(settings, redis_client, tmp_path):
    s = settings.model_copy(
        update={
            # work takes a second: one host alone needs ~30 s for the burst, so the scale-out to three
            # hosts (each a new worker process, slow to start on a loaded machine) always has a backlog
            "env_backend": {
                "type": "sim",
                "rules": [
                    {"match": "^work", "latency_s": 1.0, "exit_code": 0},
                    {"match": ".*", "latency_s": 0.3, "exit_code": 0},
                ],
            },
            "metrics_port": 0,
            "host_capacity": 2,
            "sweep_interval_s": 2.0,
            "lease_s": 10.0,
            "host_ttl_s": 5.0,
            "global_limit": 16,
            "user_limit": 16,
            "elastic": CFG,
        }
    )
    keys = Keys(s.key_prefix)
    res = ResourceManager(redis_client, s, keys)
    scaler = Autoscaler(redis_client, s, res, cfg=ElasticConfig.from_settings(s))
    check = CheckedTerminate(scaler, res, redis_client, keys)
    seen_max = 0

    def tick_until(cond, timeout_s: float, what: str) -> None:
        nonlocal seen_max
        deadline = time.monotonic() + timeout_s
        while not cond():
            scaler.tick()
            seen_max = max(seen_max, len(_serving(res)))
            if time.monotonic() > deadline:
                logs = Path(s.state_dir) / "logs"
                tails = {f.name: f.read_text()[-1500:] for f in logs.glob("el-*.log")}
                pytest.fail(f"{what} not reached in {timeout_s}s; hosts={res.hosts()} logs={tails}")
            time.sleep(0.5)

    # the control service's own autoscaler stays off: this test's scaler is the one that leads
    fleet.up(s.model_copy(update={"elastic": {**CFG, "enabled": False}}), env_hosts=0, wait_s=90, echo=lambda m: None)
    try:
        tick_until(lambda: len(_serving(res)) == 1, 60, "one host (min_hosts)")
        with Client(s) as client:
            burst = client.submit([spec(i) for i in range(BURST)], user="el")
            tick_until(lambda: client.status(burst.batch_id)["done"] == BURST, 240, "burst finished")
            tick_until(
                lambda: len(_serving(res)) == 1 and all(r["state"] == "active" for r in scaler.managed().values()),
                150,  # a stopped worker gets SIGKILL 20 s after its warm shutdown; slow on a loaded machine
                "back to one host",
            )
            trickle = client.submit([spec(100 + i) for i in range(2)], user="el")
            tick_until(lambda: client.status(trickle.batch_id)["done"] == 2, 60, "trickle finished")
            for b in (burst, trickle):
                st = client.status(b.batch_id)
                bad = [
                    (r["state"], r["cause"], r["error"])
                    for r in client.results(b.batch_id)
                    if r["state"] != "SUCCEEDED"
                ]
                assert st["counts"] == {"SUCCEEDED": st["total"]}, (st, bad)  # none lost, none failed
            # episodes placed on a host launched while they waited carry that in their own record
            launched = {e["host"] for e in usage.events(redis_client, scaler.keys) if e["kind"] == "launch"}
            notes = [ev for r in client.results(burst.batch_id) for ev in r["fleet"]]
            assert notes and all(ev["event"] == "host_launched" for ev in notes), notes
            assert {ev["host"] for ev in notes} <= launched - {"el-1"} and all(ev["reason"] for ev in notes)
        assert redis_client.hlen(keys.res("held")) == 0 and redis_client.hlen(keys.res("queued")) == 0  # none stranded
        assert seen_max == 3, seen_max
        assert check.violations == [] and len(check.removed) >= 2
        kinds = [e["kind"] for e in usage.events(redis_client, scaler.keys)]
        assert {"launch", "joined", "drain", "remove", "target"} <= set(kinds), kinds
        from megaflow.monitoring.metrics import collect

        text = collect(redis_client, s, keys)  # what the control service's /metrics serves
        assert 'megaflow_fleet_hosts{state="removed"}' in text and "megaflow_fleet_host_hours{" in text
        summary = usage.fleet_summary(redis_client, s.key_prefix, scaler.cfg)
        assert summary["host_hours"] > 0 and summary["cost"] == pytest.approx(summary["host_hours"] * 0.05)
        assert 0 < summary["used_share"] <= 1
        store = open_metadata_store(s.metadata_url, s)
        try:  # the batch report shows the fleet's decisions, utilisation and cost
            deadline = time.monotonic() + 90
            while len([d for d in store.find_tasks(batch_id=burst.batch_id) if d.get("state") == "SUCCEEDED"]) < BURST:
                assert time.monotonic() < deadline, "recorder did not catch up"
                time.sleep(0.2)
            page = build_report(store, burst.batch_id, tmp_path / "report", fleet=fleet_over(s)).read_text()
        finally:
            store.close()
        assert "Fleet: scaling, utilisation and cost" in page and "host-hours" in page and ">remove<" in page
        assert "Per-host utilisation (live episodes / slots" in page  # the per-host strip plot
        assert "Episodes touched by fleet decisions" in page and ">host_launched<" in page
    finally:
        scaler.close(stop_hosts=True)
        fleet.down(s, echo=lambda m: None)
        assert fleet.running(s) == {}  # autoscaled hosts have pid files beside the fleet's: none is left


class RecordingProvider:
    """Stands in for a cloud: remembers launches and terminations (hosts never register)."""

    def __init__(self):
        self.launched: list[str] = []
        self.terminated: list[str] = []

    def launch(self, n):
        from megaflow.elastic.providers import HostHandle

        out = [HostHandle(f"rec-{len(self.launched) + i}", f"i-{i}", "t", time.time()) for i in range(n)]
        self.launched += [h.name for h in out]
        return out

    def terminate(self, host):
        self.terminated.append(host.name)

    def alive(self, host):
        return True

    def close(self):
        pass


def test_only_one_autoscaler_acts_on_a_fleet(settings, redis_client):
    s = settings.model_copy(update={"elastic": {**CFG, "min_hosts": 2, "interval_s": 1}})
    res = ResourceManager(redis_client, s, Keys(s.key_prefix))
    first, second = RecordingProvider(), RecordingProvider()
    a = Autoscaler(redis_client, s, res, provider=first, cfg=ElasticConfig.from_settings(s))
    b = Autoscaler(redis_client, s, res, provider=second, cfg=ElasticConfig.from_settings(s))
    assert a.tick().target == 2 and first.launched == ["rec-0", "rec-1"]
    d = b.tick()
    assert (d.delta, d.reason, second.launched) == (0, "another autoscaler leads", [])
    assert redis_client.pttl(a.keys.leader) > 10_000  # a lease of at least 15 s, renewed by every tick
    a.close()  # resigns: the other one takes over at its next tick
    b.tick()
    assert b.leading and not a.leading and second.launched == []  # it adopts the two pending hosts


def test_local_provider_stops_hosts_started_by_an_earlier_control(settings):
    from megaflow.elastic.config import LocalProviderConfig
    from megaflow.elastic.providers import LocalProvider

    s = settings.model_copy(update={"env_backend": {"type": "sim"}, "metrics_port": 0})
    first = LocalProvider(s, LocalProviderConfig(name_prefix="adopt"))
    [h] = first.launch(1)
    second = LocalProvider(s, LocalProviderConfig(name_prefix="adopt"))  # a restarted control service
    try:
        deadline = time.monotonic() + 20  # /proc/PID/cmdline is empty for a moment after exec
        while not second.alive(h):
            assert time.monotonic() < deadline, "the worker never showed up in /proc"
            time.sleep(0.1)
        assert second.usage(h).get("rss_mb", 0) > 0
        second.terminate(h, timeout_s=20)
        assert not second.alive(h)
    finally:
        first.close()


def test_megaflow_down_stops_autoscaled_local_hosts(settings):
    """A host the control service's autoscaler started has a pid file beside the fleet's: `down` stops it."""
    from megaflow.elastic.config import LocalProviderConfig
    from megaflow.elastic.providers import LocalProvider

    s = settings.model_copy(update={"env_backend": {"type": "sim"}, "metrics_port": 0})
    provider = LocalProvider(s, LocalProviderConfig(name_prefix="auto"))
    [h] = provider.launch(1)
    again = LocalProvider(s, LocalProviderConfig(name_prefix="auto"))  # a restarted control: the name is taken
    try:
        assert fleet.running(s) == {"auto-1": int(h.ref)}
        assert again._next_name() == "auto-2"
        assert fleet.down(s, echo=lambda m: None) == ["auto-1"]
        assert fleet.running(s) == {} and not provider.alive(h)
    finally:
        provider.close()


def test_fleet_gauges_on_a_real_metrics_endpoint(settings, redis_client):
    """The control service's /metrics (served on loopback) shows the fleet: hosts by state, target,
    pending launches, queue, per-host used slots, host-hours and cost, published warm pools."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from megaflow.monitoring.metrics import serve_metrics

    s = settings.model_copy(update={"elastic": {**CFG, "min_hosts": 2, "prices": {"t": 3.6}}})
    res = ResourceManager(redis_client, s, Keys(s.key_prefix))
    provider = RecordingProvider()
    scaler = Autoscaler(redis_client, s, res, provider=provider, cfg=ElasticConfig.from_settings(s))
    scaler.tick()  # launches rec-0 and rec-1 (min_hosts)
    res.register_host("rec-0", capacity=2, images=[], warm={}, disk_free_gb=5.0)
    res.register_host("static-1", capacity=2, images=[], warm={}, disk_free_gb=5.0)
    health = {"usage": {"cpu_s": 3.5, "rss_mb": 120.0, "load1": 0.7, "mem_available_mb": 2048.0}}
    redis_client.set(Keys(s.key_prefix).worker_health("env", "env@rec-0"), json.dumps(health))  # its heartbeat
    scaler.tick()  # rec-0 joined, rec-1 still pending
    (row,) = [json.loads(x) for x in redis_client.lrange(scaler.keys.samples("rec-0"), -1, -1)]
    assert (row["load1"], row["mem_available_mb"], row["used"]) == (0.7, 2048.0, 0)  # the utilisation series
    redis_client.hset(usage.ElasticKeys(s.key_prefix).pools, "img:1", 3)
    server = serve_metrics(s, port=0, address="127.0.0.1")
    try:
        resp = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    finally:
        server.close()
    assert resp.status_code == 200, resp.text
    m: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for smp in family.samples:
            m.setdefault(smp.name, {})[tuple(sorted(smp.labels.items()))] = smp.value
    by_state = {dict(k)["state"]: v for k, v in m["megaflow_fleet_hosts"].items()}
    assert by_state == {"launching": 1, "active": 1, "draining": 0, "removed": 0}
    assert m["megaflow_fleet_pending_launches"][()] == 1
    assert m["megaflow_fleet_serving_hosts"][()] == 2  # rec-0 and the static host
    assert m["megaflow_fleet_target_hosts"][()] == 2 and m["megaflow_fleet_queue_length"][()] == 0
    used = {dict(k)["host"]: dict(k)["instance_type"] for k in m["megaflow_fleet_host_used_slots"]}
    assert used == {"rec-0": "t", "static-1": "static"}
    hours = m["megaflow_fleet_host_hours"][(("instance_type", "t"),)]
    assert hours > 0 and m["megaflow_fleet_cost"][(("instance_type", "t"),)] == pytest.approx(hours * 3.6)
    assert m["megaflow_fleet_warm_pool_target"][(("image", "img:1"),)] == 3
    scaler.close()
