"""Prometheus metrics of MegaFlow's state: real Redis, real Celery messages, a real HTTP server on
loopback, and a scrape of a running fleet. The text is checked with prometheus_client's parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from megaflow import Client
from megaflow.core import states
from megaflow.core.keys import Keys
from megaflow.core.settings import Settings
from megaflow.demo_tasks import demo_specs
from megaflow.engine.resources import ResourceManager
from megaflow.monitoring.metrics import CONTENT_TYPE, Exposition, collect, serve_metrics
from megaflow.workers.celery_app import create_app
from tests.helpers import wait_until


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """metric name -> {sorted label items: value}; fails if the text is not valid exposition format."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics: dict, metric: str, /, **labels: str) -> float:
    return metrics[metric][tuple(sorted(labels.items()))]


def scrape(port: int) -> dict:
    resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == CONTENT_TYPE
    return parse(resp.text)


def scrape_when_up(port: int, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> dict:
    """The first scrape that answers (the server may still be starting); a dead ``proc`` fails at once."""

    def attempt() -> dict | None:
        try:
            return scrape(port)
        except httpx.TransportError:
            assert proc is None or proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            return None

    return wait_until(attempt, timeout_s, what, 0.2)


def test_empty_redis_gives_zero_gauges(settings, redis_client):
    m = parse(collect(redis_client, settings, Keys(settings.key_prefix)))
    assert {value(m, "megaflow_queue_length", queue=q) for q in ("model", "agent", "env")} == {0}
    assert value(m, "megaflow_admission_backlog") == 0
    assert value(m, "megaflow_slots_used", tier="global", name="global") == 0
    assert value(m, "megaflow_slots_limit", tier="global", name="global") == settings.global_limit
    for s in (states.QUEUED, states.ADMITTED, states.ENV_STARTING, states.RUNNING, states.EVALUATING):
        assert value(m, "megaflow_episodes", state=s) == 0
    assert {dict(k)["state"] for k in m["megaflow_episodes"]}.isdisjoint(states.TERMINAL)


def test_gauges_follow_queues_slots_warm_pools_and_episodes(settings, redis_client):
    keys = Keys(settings.key_prefix)
    rm = ResourceManager(redis_client, settings, keys)
    rm.register_host("h1", capacity=3, images=["img:1"], warm={"img:1": 2, "img:2": 0}, disk_free_gb=12.5)
    rm.register_host("h2", capacity=5, images=[], warm={}, disk_free_gb=3.0)
    rm.drain_host("h2")
    rm.set_quota("alice", 2)
    rm.acquire("ep-a1", "alice", "h1")
    rm.acquire("ep-a2", "alice", "h1")
    rm.enqueue([{"episode_id": f"ep-q{i}", "user": "bob", "image": "img:1"} for i in range(4)])
    # live episodes as the engine keeps them: a member of `live` plus a state field in its hash
    now = time.time()
    for eid, state in (("ep-a1", states.RUNNING), ("ep-a2", states.EVALUATING), ("ep-gone", states.SUCCEEDED)):
        redis_client.zadd(keys.live, {eid: now})
        redis_client.hset(keys.episode(eid), "state", state)
    # real Celery messages on queues no worker consumes, one of them with a priority (another list)
    app = create_app(settings)
    try:
        for step in range(3):
            app.send_task("megaflow.agent.step", args=["ep-x", step], queue="agent")
        app.send_task("megaflow.agent.step", args=["ep-x", 9], queue="agent", priority=6)
        app.send_task("megaflow.env.exec", args=["ep-y", 1], queue="env.h1")
    finally:
        app.close()

    m = parse(collect(redis_client, settings, keys))
    assert value(m, "megaflow_queue_length", queue="agent") == 4
    assert value(m, "megaflow_queue_length", queue="env.h1") == 1
    assert value(m, "megaflow_queue_length", queue="env.h2") == 0
    assert value(m, "megaflow_queue_length", queue="model") == 0
    assert value(m, "megaflow_admission_backlog") == 4
    assert value(m, "megaflow_user_queued", user="bob") == 4
    assert value(m, "megaflow_slots_used", tier="global", name="global") == 2
    assert value(m, "megaflow_slots_used", tier="user", name="alice") == 2
    assert value(m, "megaflow_slots_limit", tier="user", name="alice") == 2
    assert value(m, "megaflow_slots_limit", tier="user", name="bob") == settings.user_limit
    assert value(m, "megaflow_slots_used", tier="host", name="h1") == 2
    assert value(m, "megaflow_slots_limit", tier="host", name="h1") == 3
    assert value(m, "megaflow_slots_limit", tier="host", name="h2") == 5
    assert value(m, "megaflow_warm_pool_size", host="h1", image="img:1") == 2
    assert value(m, "megaflow_env_host_drained", host="h2") == 1
    assert value(m, "megaflow_env_host_drained", host="h1") == 0
    assert value(m, "megaflow_env_host_up", host="h1") == 1
    assert value(m, "megaflow_env_host_disk_free_gigabytes", host="h1") == 12.5
    assert value(m, "megaflow_episodes", state=states.QUEUED) == 4
    assert value(m, "megaflow_episodes", state=states.RUNNING) == 1
    assert value(m, "megaflow_episodes", state=states.EVALUATING) == 1
    assert value(m, "megaflow_episodes", state=states.ADMITTED) == 0
    assert ("state", states.SUCCEEDED) not in {k[0] for k in m["megaflow_episodes"]}


def test_label_values_are_escaped():
    out = Exposition()
    odd = 'a "quoted" back\\slash\nnew line'
    out.family("x_total", "help with \\ and\nnewline", [({"name": odd}, 3), ({"name": "plain"}, 0.25)])
    m = parse(out.text())
    assert value(m, "x_total", name=odd) == 3
    assert value(m, "x_total", name="plain") == 0.25


def test_http_endpoint_serves_metrics_404_and_503(settings):
    server = serve_metrics(settings, port=0, address="127.0.0.1")
    try:
        m = scrape(server.port)
        assert value(m, "megaflow_admission_backlog") == 0
        assert httpx.get(f"http://127.0.0.1:{server.port}/nope", timeout=5).status_code == 404
        assert "/metrics" in httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5).text
    finally:
        server.close()
    dead = Settings.load(redis_url=f"redis://127.0.0.1:{free_port()}/0", state_dir=settings.state_dir)
    server = serve_metrics(dead, port=0, address="127.0.0.1")
    try:
        resp = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=15)
        assert resp.status_code == 503 and "Redis unavailable" in resp.text
    finally:
        server.close()


def test_metrics_command_serves_and_stops_on_sigterm(settings, redis_client):
    port = free_port()
    env = dict(os.environ, **settings.to_env())
    proc = subprocess.Popen(
        [sys.executable, "-m", "megaflow", "metrics", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        m = scrape_when_up(port, 30, "megaflow metrics to start", proc)
        assert value(m, "megaflow_queue_length", queue="agent") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_once_prints_the_text(settings, monkeypatch):
    from typer.testing import CliRunner

    from megaflow.cli import app

    for name, v in settings.to_env().items():
        monkeypatch.setenv(name, v)
    result = CliRunner().invoke(app, ["metrics", "--once"])
    assert result.exit_code == 0, result.output
    assert value(parse(result.output), "megaflow_admission_backlog") == 0


def test_control_service_starts_the_endpoint_on_metrics_port(settings):
    from megaflow.control import Control
    from megaflow.services.root import Root as Runtime

    port = free_port()
    ctl = Control(Runtime(settings.model_copy(update={"metrics_port": port}), role="control"))
    t = threading.Thread(target=ctl.run, daemon=True)
    t.start()
    try:
        scrape_when_up(port, 20, "control to serve metrics")
    finally:
        ctl.stop.set()
        t.join(15)
    assert not t.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_scrape_of_a_running_fleet(fleet):
    """Gauges move while a batch runs on the shared fleet and settle when it ends."""
    server = serve_metrics(fleet, port=0, address="127.0.0.1")
    seen_live: set[str] = set()
    seen_user_slots = 0.0
    try:
        m = scrape(server.port)
        hosts = {dict(k)["name"] for k in m["megaflow_slots_limit"] if dict(k)["tier"] == "host"}
        assert {"env-1", "env-2"} <= hosts
        assert value(m, "megaflow_slots_limit", tier="host", name="env-1") == fleet.host_capacity
        assert value(m, "megaflow_env_host_up", host="env-2") == 1
        for host in ("env-1", "env-2"):  # what each env worker's heartbeat reports about its machine
            assert value(m, "megaflow_env_host_cpu_seconds", host=host) > 0
            assert value(m, "megaflow_env_host_memory_rss_bytes", host=host) > 10 * 2**20
            assert value(m, "megaflow_env_host_memory_available_bytes", host=host) > 0
            assert value(m, "megaflow_env_host_load1", host=host) >= 0
        assert {"env.env-1", "env.env-2", "agent", "model", "env"} <= {
            dict(k)["queue"] for k in m["megaflow_queue_length"]
        }
        with Client(fleet) as client:
            sub = client.submit(demo_specs("fix")[:1], user="metrics-test")

            def sample_until_done() -> bool:  # every scrape while the batch runs is checked
                nonlocal seen_user_slots
                if client.status(sub.batch_id)["done"] >= 1:
                    return True
                m = scrape(server.port)
                for labels, v in m["megaflow_episodes"].items():
                    if v > 0:
                        seen_live.add(dict(labels)["state"])
                key = (("name", "metrics-test"), ("tier", "user"))
                seen_user_slots = max(seen_user_slots, m["megaflow_slots_used"].get(key, 0))
                assert all(v >= 0 for fam in m.values() for v in fam.values())
                assert value(m, "megaflow_slots_used", tier="global", name="global") <= fleet.global_limit
                return False

            wait_until(sample_until_done, 180, "the batch to finish", 0.3)
        assert seen_user_slots == 1
        assert seen_live & {states.ADMITTED, states.ENV_STARTING, states.RUNNING, states.EVALUATING}, seen_live
        user_slots = (("name", "metrics-test"), ("tier", "user"))
        # slots are released just after the terminal state is written
        wait_until(
            lambda: scrape(server.port)["megaflow_slots_used"].get(user_slots, 0) == 0,
            20,
            "the user's slots to read 0",
            0.3,
        )
    finally:
        server.close()


# --- access (issue 17): basic auth from settings; beyond loopback only with credentials ------------
def with_credentials(settings: Settings, user: str = "prom", password: str = "s3cret-metrics") -> Settings:
    from pydantic import SecretStr

    return settings.model_copy(update={"metrics_user": user, "metrics_password": SecretStr(password)})


def test_credentials_are_enforced_when_configured(settings):
    server = serve_metrics(with_credentials(settings), port=0, address="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    try:
        for path in ("/metrics", "/", "/nope"):
            resp = httpx.get(base + path, timeout=10)
            assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Basic")
            assert "MEGAFLOW_METRICS_USER" in resp.text and "megaflow_" not in resp.text
        for auth in (("prom", "wrong"), ("other", "s3cret-metrics"), ("prom", "")):
            assert httpx.get(base + "/metrics", auth=auth, timeout=10).status_code == 401
        resp = httpx.get(base + "/metrics", auth=("prom", "s3cret-metrics"), timeout=10)
        assert resp.status_code == 200 and value(parse(resp.text), "megaflow_admission_backlog") == 0
    finally:
        server.close()


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.1.2.3", "metrics.example.internal"])
def test_beyond_loopback_without_credentials_refuses_to_start(settings, address):
    from megaflow.core.errors import ConfigError

    port = free_port()
    with pytest.raises(ConfigError, match="MEGAFLOW_METRICS_USER and MEGAFLOW_METRICS_PASSWORD"):
        serve_metrics(settings, port=port, address=address)
    with pytest.raises(httpx.TransportError):  # nothing was bound
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_half_set_credentials_are_refused_even_on_loopback(settings):
    from megaflow.core.errors import ConfigError

    half = settings.model_copy(update={"metrics_user": "prom"})
    with pytest.raises(ConfigError, match="both"):
        serve_metrics(half, port=0, address="127.0.0.1")
    with pytest.raises(ConfigError, match="':'"):
        serve_metrics(with_credentials(settings, user="a:b"), port=0, address="127.0.0.1")


def test_beyond_loopback_with_credentials_serves_them_only(settings):
    server = serve_metrics(with_credentials(settings), port=0, address="0.0.0.0")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, auth=("prom", "s3cret-metrics"), timeout=10).status_code == 200
    finally:
        server.close()


def test_metrics_command_and_control_refuse_an_open_address(settings, monkeypatch):
    from megaflow.control import Control
    from megaflow.core.errors import ConfigError
    from megaflow.services.root import Root as Runtime

    for name, v in settings.to_env().items():
        monkeypatch.setenv(name, v)
    proc = subprocess.run(
        [sys.executable, "-m", "megaflow", "metrics", "--port", str(free_port()), "--address", "0.0.0.0"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "MEGAFLOW_METRICS_USER and MEGAFLOW_METRICS_PASSWORD" in proc.stderr
    open_ = settings.model_copy(update={"metrics_port": free_port(), "metrics_address": "0.0.0.0"})
    ctl = Control(Runtime(open_, role="control"))
    with pytest.raises(ConfigError, match="MEGAFLOW_METRICS_USER"):
        ctl.run()  # refuses before starting anything
