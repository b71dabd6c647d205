"""A local fleet on one machine: ``megaflow up`` / ``megaflow down``.

It checks Redis and the Docker engine, then starts one process per service: the control service,
a model worker, an agent worker and two or more env workers with distinct host names (each one
an "env host" with its own queue), logging to STATE_DIR/logs and tracked by pid files. Each process
gets only its role's secrets (:func:`megaflow.security.roles.role_env`) and, once `megaflow acl apply`
ran, its role's own Redis user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from megaflow.core.errors import ServiceUnavailableError
from megaflow.core.settings import Settings
from megaflow.env_hosts.config import uses_docker
from megaflow.security import acl
from megaflow.security.roles import role_env, role_of


@dataclass
class Proc:
    """One fleet process: its name and command-line arguments after ``python -m megaflow``."""

    name: str
    args: list[str]
    node: str | None = None  # the Celery node name it answers pings as


def fleet_plan(settings: Settings, env_hosts: int = 2) -> list[Proc]:
    from megaflow.core.wire import node_name

    procs = [
        Proc("control", ["control"]),
        Proc("model", ["worker", "model"], node_name("model", settings.host_name)),
        Proc("agent", ["worker", "agent"], node_name("agent", settings.host_name)),
    ]
    procs += [
        Proc(f"env-{i}", ["worker", "env", "--host", f"env-{i}"], node_name("env", f"env-{i}"))
        for i in range(1, env_hosts + 1)
    ]
    return procs


def _dirs(settings: Settings) -> tuple[Path, Path]:
    base = Path(settings.state_dir)
    pids, logs = base / "fleet", base / "logs"
    pids.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    return pids, logs


def check_services(settings: Settings, *, docker_needed: bool | None = None) -> None:
    """Fail with a clear message when Redis or (for the docker env backend) the Docker engine is not reachable."""
    if docker_needed is None:
        docker_needed = uses_docker(settings)
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        raise ServiceUnavailableError(
            f"Redis is not reachable at MEGAFLOW_REDIS_URL: {exc}. Start redis-server (`make demo` does)."
        ) from None
    if docker_needed:
        try:
            import docker

            d = docker.from_env(timeout=10)
            d.ping()
            d.close()
        except Exception as exc:
            raise ServiceUnavailableError(
                f"the Docker engine is not reachable ({exc}). Start dockerd (`make demo` does)."
            ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def running(settings: Settings) -> dict[str, int]:
    """Fleet processes alive now: name -> pid."""
    pids, _ = _dirs(settings)
    out = {}
    for f in pids.glob("*.pid"):
        try:
            pid = int(f.read_text().strip())
        except ValueError:
            continue
        if _alive(pid):
            out[f.stem] = pid
        else:
            f.unlink(missing_ok=True)
    return out


def up(settings: Settings, *, env_hosts: int = 2, wait_s: float = 60.0, echo=print) -> dict[str, int]:
    """Start the fleet's processes that are not running; wait until every worker answers."""
    if env_hosts < 0:
        raise ValueError("env_hosts must be at least 0 (0: env hosts come from the autoscaler, megaflow.elastic)")
    check_services(settings)
    pids, logs = _dirs(settings)
    alive = running(settings)
    env = dict(os.environ, **settings.to_env())
    passwords = _acl_passwords(settings)
    started = []
    for proc in fleet_plan(settings, env_hosts):
        if proc.name in alive:
            continue
        with open(logs / f"{proc.name}.log", "ab") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(
                [sys.executable, "-m", "megaflow", *proc.args],
                env=role_env(role_of(proc.args), env, passwords=passwords),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (pids / f"{proc.name}.pid").write_text(str(p.pid))
        started.append(proc.name)
    if started:
        echo(f"starting {', '.join(started)} (logs in {logs})")
    try:
        wait_ready(settings, fleet_plan(settings, env_hosts), wait_s)
    except BaseException:
        if started:  # leave nothing half-started behind
            down(settings, echo=echo)
        raise
    return running(settings)


def _acl_passwords(settings: Settings) -> dict[str, str] | None:
    """The role passwords when `megaflow acl apply` ran from this state dir (the users are created again:
    Redis forgets them on a restart unless it has an aclfile), else None (every role uses MEGAFLOW_REDIS_URL)."""
    if acl.load_passwords(settings.state_dir) is None:
        return None
    passwords = acl.ensure_passwords(settings.state_dir)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        acl.apply(client, settings.key_prefix, passwords)
    finally:
        client.close()
    return passwords


def wait_ready(settings: Settings, procs: list[Proc], wait_s: float) -> None:
    """Wait until every worker answers a Celery ping, env hosts are registered and control reports."""
    from megaflow.core.keys import Keys
    from megaflow.workers.celery_app import create_app

    app = create_app(settings)
    keys = Keys(settings.key_prefix)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    nodes = {p.node for p in procs if p.node}
    hosts = {p.node.split("@", 1)[1] for p in procs if p.node and p.node.startswith("env@")}
    want_control = any(p.name == "control" for p in procs)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            replies = app.control.ping(timeout=1.0) or []
            seen = {name for reply in replies for name in reply}
            control_ok = not want_control or bool(r.exists(keys.worker_health("control", "control")))
            registered = _registered_hosts(r, keys, settings)
            if nodes <= seen and control_ok and hosts <= registered:
                return
            dead = [p.name for p in procs if p.name not in running(settings)]
            if dead:
                raise ServiceUnavailableError(
                    f"fleet process(es) {dead} exited at start; see {Path(settings.state_dir) / 'logs'}"
                )
            if time.monotonic() > deadline:
                missing = sorted(nodes - seen) + sorted(f"host {h}" for h in hosts - registered)
                missing += [] if control_ok else ["control"]
                raise ServiceUnavailableError(
                    f"fleet not ready after {wait_s:.0f}s; missing {missing}; "
                    f"see logs in {Path(settings.state_dir) / 'logs'}"
                )
    finally:
        r.close()
        app.close()


def _registered_hosts(r: redis.Redis, keys, settings: Settings) -> set[str]:
    from megaflow.engine.resources import ResourceManager

    return {h["name"] for h in ResourceManager(r, settings, keys).hosts()}


def down(settings: Settings, *, timeout_s: float = 20.0, echo=print) -> list[str]:
    """Stop every fleet process: SIGTERM (warm shutdown), then SIGKILL after ``timeout_s``."""
    alive = running(settings)
    for pid in alive.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in alive.values()):
        time.sleep(0.2)
    for name, pid in alive.items():
        if _alive(pid):
            echo(f"{name} (pid {pid}) did not stop in {timeout_s:.0f}s; killing it")
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    pids, _ = _dirs(settings)
    for f in pids.glob("*.pid"):
        f.unlink(missing_ok=True)
    return sorted(alive)
