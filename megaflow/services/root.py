"""Per-process clients (Redis, Docker, stores, backends), built lazily after fork.

A worker calls ``configure(settings, role=..., host=...)`` once in its entry point; tasks call
``current()``. The runtime notices a fork (pid change) and rebuilds its clients, so no Redis or
MongoDB connection crosses a fork.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import Any

import redis

from megaflow.core.keys import Keys
from megaflow.core.settings import Settings


class Runtime:
    """Clients and services of one process, each built on first use."""

    def __init__(self, settings: Settings, *, role: str = "client", host: str | None = None, app: Any = None):
        self.settings = settings
        self.role = role
        self.host = host or settings.host_name
        self.keys = Keys(settings.key_prefix)
        self._app = app
        self._lock = threading.Lock()
        self._backends: dict[str, Any] = {}

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True, health_check_interval=30)

    @cached_property
    def app(self):
        if self._app is None:
            from megaflow.workers.app import create_app

            self._app = create_app(self.settings, register_tasks=False)
        return self._app

    def send(self, name: str, args: list[Any], queue: str) -> None:
        from megaflow.monitoring.flower import task_argsrepr

        self.app.send_task(name, args=args, queue=queue, argsrepr=task_argsrepr(name, args, queue))

    def encode(self, name: str, args: list[Any], queue: str) -> tuple[str, str]:
        """(broker list key, message) for a task the engine enqueues inside its advance script."""
        from megaflow.workers.app import encode_task_message
        from megaflow.monitoring.flower import task_argsrepr

        return encode_task_message(self.app, self.settings, name, args, queue, task_argsrepr(name, args, queue))

    @cached_property
    def engine(self):
        from megaflow.engine.episodes import EpisodeEngine

        return EpisodeEngine(self.redis, self.settings, self.keys, self.send, encode=self.encode)

    @cached_property
    def resources(self):
        from megaflow.engine.resources import ResourceManager

        return ResourceManager(self.redis, self.settings, self.keys)

    @cached_property
    def artifacts(self):
        from megaflow.stores import open_artifact_store

        return open_artifact_store(self.settings.artifacts_url, self.settings)

    @cached_property
    def metadata(self):
        from megaflow.stores import open_metadata_store

        return open_metadata_store(self.settings.metadata_url, self.settings)

    @cached_property
    def docker(self):
        import docker

        return docker.from_env(timeout=max(60, int(self.settings.boot_timeout_s)))

    @cached_property
    def env_host(self):
        from megaflow.env_hosts.docker_host import DockerHost

        return DockerHost(self.docker, self.settings, name=self.host, redis_client=self.redis, keys=self.keys)

    def backend(self, name: str):
        with self._lock:
            if name not in self._backends:
                from megaflow.model_gateway import load_backend

                self._backends[name] = load_backend(name, self.settings, self.redis)
            return self._backends[name]


_current: Runtime | None = None
_pid: int | None = None
_config: dict[str, Any] = {}


def configure(settings: Settings, **kwargs: Any) -> Runtime:
    """Set this process's runtime (called by entry points)."""
    global _current, _pid
    _config.clear()
    _config.update(settings=settings, **kwargs)
    _current = Runtime(settings, **kwargs)
    _pid = os.getpid()
    return _current


def current() -> Runtime:
    """This process's runtime, rebuilt after a fork."""
    global _current, _pid
    if _current is None:
        configure(Settings.load())
    elif _pid != os.getpid():
        _current = Runtime(**_config)
        _pid = os.getpid()
    assert _current is not None
    return _current
