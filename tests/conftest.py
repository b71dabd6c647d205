"""Shared fixtures: a real redis-server per test session on a free port, Docker, settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from megaflow.core.settings import Settings
from tests.helpers import wait_until

IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1:<port> that tests may stop and restart."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            pytest.fail("redis-server is not installed; run `make test`, which installs it")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
                return False

        wait_until(answers, 10, f"redis-server on port {self.port} to answer", 0.05)
        client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client on the session's redis-server, flushed before and after the test."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    try:
        client.flushall()
    except redis.ConnectionError:
        pass
    client.close()


def processes_of(state_dir: str) -> dict[int, str]:
    """Live processes started with ``MEGAFLOW_STATE_DIR=state_dir`` (fleet workers, autoscaled hosts).

    Returns pid -> command line.
    """
    want = f"MEGAFLOW_STATE_DIR={state_dir}".encode()
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return out


@pytest.fixture
def settings(redis_server, redis_client, tmp_path):
    """Settings pointing at the test redis-server and a per-test state directory.

    A process the test started with these settings and left running (a fleet worker, an autoscaled
    host) would go on acting on the session's Redis during later tests: it is killed at teardown
    and reported as a warning.
    """
    s = Settings.load(redis_url=redis_server.url, state_dir=str(tmp_path / "state"), host_name="test-host")
    yield s
    left = processes_of(s.state_dir)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    if left:
        import warnings

        warnings.warn(f"test left processes running (killed now): {sorted(left.values())}", stacklevel=1)


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_client():
    """A Docker SDK client; skips locally when no engine runs, fails in CI."""
    if not docker_available():
        if IN_CI:
            pytest.fail("no Docker engine: `make test` starts dockerd; it must run in CI")
        pytest.skip("no Docker engine running (start it with `make test`)")
    import docker

    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def sandbox_image(docker_client) -> str:
    """The locally built sandbox image (megaflow images build), built once if missing."""
    from megaflow.env_hosts.images import ensure_sandbox_image

    settings = Settings.load()
    return ensure_sandbox_image(docker_client, settings.default_image)


@pytest.fixture(scope="session")
def fleet_redis(tmp_path_factory):
    """A redis-server of its own for the shared fleet (tests that flush `redis_client` can't touch it)."""
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fleet(fleet_redis, sandbox_image, tmp_path_factory):
    """A real local fleet (control, model, agent and two env workers as processes) for the session.

    Yields its Settings. Tests share it: submit with a user name of their own, never flush its Redis.
    """
    from megaflow import fleet as fleet_mod

    settings = Settings.load(
        redis_url=fleet_redis.url,
        state_dir=str(tmp_path_factory.mktemp("fleet-state")),
        host_name="test-host",
        host_capacity=4,
        boot_concurrency=2,
        sweep_interval_s=2.0,
        lease_s=10.0,
        host_ttl_s=10.0,
        default_image=sandbox_image,
        metrics_port=0,
    )
    try:
        fleet_mod.up(settings, env_hosts=2, wait_s=120, echo=lambda m: None)
    except Exception:
        logs = Path(settings.state_dir) / "logs"
        for f in sorted(logs.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        fleet_mod.down(settings, echo=lambda m: None)
        raise
    yield settings
    fleet_mod.down(settings, echo=lambda m: None)


# --- test tiers ---------------------------------------------------------------------------------
# Every test gets one tier marker from the fixtures it uses (an explicit marker wins):
#   unit   no service at all            redis  a real redis-server (engine, resources, services)
#   docker real containers             fleet  real worker processes (Celery) on a real Redis
# Slow external tiers mark themselves: deploy (Ansible converge), faults, llama (llama.cpp server),
# mini (mini-swe-agent itself), swebench (the official harness package).
# `pytest -m "unit or redis"` is the fast tier; `make test` runs every tier.
TIERS = ("unit", "redis", "docker", "fleet", "deploy", "faults", "llama", "mini", "swebench")
_FIXTURE_TIER = (
    ("fleet", {"fleet", "fleet_redis"}),
    ("docker", {"docker_client", "sandbox_image"}),
    ("redis", {"redis_server", "redis_client", "settings"}),
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        names = set(getattr(item, "fixturenames", ()))
        tier = next((t for t, fixtures in _FIXTURE_TIER if names & fixtures), "unit")
        item.add_marker(getattr(pytest.mark, tier))
