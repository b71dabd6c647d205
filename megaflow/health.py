"""Env host health: is a host fit to take episodes? Docker daemon, disk, image cache, worker ping.

``megaflow host health [NAME]`` and the playbook's health play call :func:`host_health`. Run on the
host itself (NAME omitted or equal to MEGAFLOW_HOST_NAME) it asks the local Docker engine; for
another host it reads what that host's env worker last registered in Redis. The worker ping goes
through the broker (Celery's ``inspect ping``) either way.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

from megaflow.core.settings import Settings

CHECKS = ("daemon", "disk", "image", "worker")


@dataclass
class Check:
    """One health check: its name, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str


def _local_docker(settings: Settings) -> tuple[Check, Check, Check]:
    """daemon, disk and image checks against the Docker engine of this machine."""
    import docker

    from megaflow.core.errors import MegaflowError

    try:
        client = docker.from_env(timeout=10)
    except docker.errors.DockerException as exc:  # no socket, refused
        free = shutil.disk_usage("/").free / 1024**3
        return (
            Check("daemon", False, f"no Docker engine reachable: {exc}"),
            _disk(free, settings),
            Check("image", False, "unknown: the Docker engine is down"),
        )
    try:
        version = client.version().get("Version", "?")
        root = client.info().get("DockerRootDir") or "/"
        try:
            free = shutil.disk_usage(root).free / 1024**3
        except OSError:  # the engine's data dir is not visible here (an engine reached through its socket)
            free = shutil.disk_usage("/").free / 1024**3
        from megaflow.env_hosts.images import image_present

        has_image = image_present(client, settings.default_image)
    except (docker.errors.DockerException, OSError, MegaflowError) as exc:  # requests' errors are OSErrors
        free = shutil.disk_usage("/").free / 1024**3
        return (
            Check("daemon", False, f"Docker engine error: {exc}"),
            _disk(free, settings),
            Check("image", False, "unknown: the Docker engine failed"),
        )
    finally:
        client.close()
    return (
        Check("daemon", True, f"Docker engine {version} answers"),
        _disk(free, settings),
        Check("image", has_image, f"{settings.default_image} {'present' if has_image else 'missing'}"),
    )


def _disk(free_gb: float, settings: Settings) -> Check:
    budget = settings.image_disk_budget_gb
    return Check("disk", free_gb >= budget, f"{free_gb:.1f} GB free, image budget {budget:g} GB")


def _registered(manager: Any, name: str, settings: Settings) -> tuple[dict[str, Any] | None, tuple[Check, ...]]:
    """daemon, disk and image checks from what the host's env worker last registered in Redis."""
    info = next((h for h in manager.hosts() if h["name"] == name), None)
    if info is None:
        missing = f"{name} never registered (no env worker has run there)"
        return None, (Check("daemon", False, missing), Check("disk", False, missing), Check("image", False, missing))
    age = info["heartbeat_age_s"]
    daemon = Check(
        "daemon",
        info["alive"],
        f"env worker heartbeat {age:.1f}s ago"
        + ("" if info["alive"] else f" (stale: over MEGAFLOW_HOST_TTL_S={settings.host_ttl_s:g})"),
    )
    # The set of images a host reports lives under the resource manager's keys.
    has_image = manager.host_has_image(name, settings.default_image)
    image = Check("image", has_image, f"{settings.default_image} {'reported' if has_image else 'not reported'}")
    return info, (daemon, _disk(info["disk_free_gb"], settings), image)


def _ping(settings: Settings, name: str, timeout_s: float) -> Check:
    import kombu.exceptions
    import redis

    from megaflow.core.wire import node_name
    from megaflow.workers.celery_app import create_app

    node = node_name("env", name)
    app = create_app(settings)
    try:
        started = time.monotonic()
        replies = app.control.ping(destination=[node], timeout=timeout_s)
        took = time.monotonic() - started
    except (OSError, kombu.exceptions.KombuError, redis.RedisError) as exc:  # the broker is down or refuses
        return Check("worker", False, f"inspect ping of {node} failed: {exc}")
    finally:
        app.close()
    answered = any(node in reply for reply in replies or [])
    return Check(
        "worker",
        answered,
        f"{node} answered inspect ping in {took:.1f}s"
        if answered
        else f"{node} did not answer inspect ping within {timeout_s:g}s",
    )


def host_health(settings: Settings, name: str | None = None, *, ping_timeout_s: float = 3.0) -> dict[str, Any]:
    """Every check of env host ``name`` (default: this host): {"host", "ok", "local", "drained", "checks"}."""
    import redis

    from megaflow.core.keys import Keys
    from megaflow.engine.resources.manager import ResourceManager

    name = name or settings.host_name
    local = name == settings.host_name
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10)
    try:
        manager = ResourceManager(client, settings, Keys(settings.key_prefix))
        info, remote = _registered(manager, name, settings)
        checks = list(_local_docker(settings) if local else remote)
    finally:
        client.close()
    checks.append(_ping(settings, name, ping_timeout_s))
    return {
        "host": name,
        "ok": all(c.ok for c in checks),
        "local": local,
        "registered": info is not None,
        "drained": bool(info and info["drained"]),
        "checks": [asdict(c) for c in checks],
    }
