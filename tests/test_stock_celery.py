"""Stock Celery against a running fleet: ``celery -A megaflow.workers inspect|worker`` work as Celery users expect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from megaflow import Client
from megaflow.core import states
from megaflow.demo_tasks import demo_specs
from megaflow.services.root import Root
from tests.helpers import wait_until

CELERY = [sys.executable, "-m", "celery", "-A", "megaflow.workers"]


def _env(settings) -> dict[str, str]:
    return dict(os.environ, **settings.to_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def test_inspect_ping_answers_from_every_fleet_worker(fleet):
    out = subprocess.run(
        [*CELERY, "inspect", "ping", "--timeout", "5"], env=_env(fleet), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for node in ("model@test-host", "agent@test-host", "env@env-1", "env@env-2"):
        assert node in out.stdout, out.stdout
    stats = subprocess.run(
        [*CELERY, "inspect", "stats", "--timeout", "5", "-d", "agent@test-host"],
        env=_env(fleet),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0 and "agent@test-host" in stats.stdout, stats.stdout


def test_stock_worker_joins_as_an_env_host_and_runs_episodes(fleet, tmp_path):
    root = Root(fleet)
    log = open(tmp_path / "stock-env.log", "w")
    proc = subprocess.Popen(
        [
            *CELERY,
            "worker",
            "-Q",
            "env,env.stock-1",
            "-P",
            "threads",
            "-c",
            "2",
            "-n",
            "env@stock-1",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ],
        env=_env(fleet),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def registered() -> bool:
            assert proc.poll() is None, (tmp_path / "stock-env.log").read_text()[-3000:]
            return "stock-1" in {h["name"] for h in root.resources.hosts()}

        wait_until(registered, 60, "the stock worker to register its env host", 0.2)
        for h in ("env-1", "env-2"):  # only the stock worker's host takes new episodes
            root.resources.drain_host(h)
        with Client(fleet) as client:
            sub = client.submit(demo_specs("fix")[:1], user="stock")
            client.wait(sub.batch_id, timeout=180)
            [result] = client.results(sub.batch_id)
        assert (result["state"], result["host"]) == (states.SUCCEEDED, "stock-1"), result
    finally:
        if "stock-1" in {h["name"] for h in root.resources.hosts()}:
            root.resources.drain_host("stock-1")  # leaving: admit nothing more there
        for h in ("env-1", "env-2"):
            root.resources.drain_host(h, drain=False)
        root.lifecycle.admit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        root.close()


def test_a_second_worker_for_a_served_env_host_name_refuses_to_start(fleet):
    """Two workers under one host name would share env.<host>: the second one exits before consuming."""
    for argv in (
        [sys.executable, "-m", "megaflow", "worker", "env", "--host", "env-1"],
        [*CELERY, "worker", "-Q", "env,env.env-1", "-P", "threads", "-n", "env@env-1", "--without-mingle"],
    ):
        out = subprocess.run(argv, env=_env(fleet), capture_output=True, text=True, timeout=120)
        assert out.returncode != 0, out.stdout + out.stderr
        assert "'env-1' is in use by another worker" in out.stdout + out.stderr, out.stdout + out.stderr
    root = Root(fleet)
    try:  # the fleet's own env-1 still beats and serves episodes
        assert root.redis.exists(root.keys.worker_health("env", "env@env-1"))
    finally:
        root.close()
    with Client(fleet) as client:
        sub = client.submit(demo_specs("fix")[:2], user="dup-host")
        client.wait(sub.batch_id, timeout=180)
        assert client.status(sub.batch_id)["counts"] == {states.SUCCEEDED: 2}


def test_redis_brokers_use_megaflows_transport_and_keep_their_scheme():
    """One Redis client per channel (megaflow.workers.transport) for redis://; the URL keeps its scheme,
    which Flower reads to pick its queue-length reader; other schemes keep kombu's transport."""
    from kombu.transport.redis import Transport as KombuRedis

    from megaflow.core.settings import Settings
    from megaflow.workers.celery_app import create_app
    from megaflow.workers.transport import Transport

    app = create_app(Settings.load(redis_url="redis://127.0.0.1:6379/0"))
    with app.connection() as conn:
        assert type(conn.transport) is Transport and conn.as_uri().startswith("redis://")
    app = create_app(Settings.load(redis_url="rediss://127.0.0.1:6380/0"))
    with app.connection() as conn:
        assert type(conn.transport) is KombuRedis
