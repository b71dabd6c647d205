"""The composition root: every client and service of one process, built from Settings.

A worker builds one ``Root`` per process after fork (see ``megaflow.workers.tasks``); a Client
builds one for its calls. Each part is created on first use, so a process only opens what it needs
(an agent worker never talks to Docker, a client never loads a model backend), and each is typed,
so nothing is looked up by name at run time.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis
from redis.driver_info import DriverInfo

from megaflow.core.keys import Keys
from megaflow.core.settings import Settings
from megaflow.engine.dispatch import Dispatcher, RedisDispatcher
from megaflow.engine.episodes import EpisodeEngine
from megaflow.engine.resources import ResourceManager

if TYPE_CHECKING:
    from megaflow.env_hosts.base import EnvHost
    from megaflow.model_gateway.base import ModelBackend
    from megaflow.services.agent import AgentService
    from megaflow.services.env import EnvService
    from megaflow.services.lifecycle import Lifecycle
    from megaflow.services.model import ModelService
    from megaflow.stores.base import ArtifactStore, MetadataStore

ROLE_CONCURRENCY = {"model": "model_concurrency", "env": "env_concurrency", "agent": "agent_concurrency"}
# What every pooled connection tells Redis (CLIENT SETINFO) about its client library. Left to
# redis-py, each new connection reads the version from the package's metadata files (~0.4 CPU-ms,
# as much as the connect itself); a worker with hundreds of threads opens hundreds of connections.
DRIVER_INFO = DriverInfo(lib_version=redis.__version__)


class Root:
    """Clients and services of one process, each built on first use."""

    def __init__(
        self,
        settings: Settings,
        *,
        role: str = "client",
        host: str | None = None,
        dispatcher: Dispatcher | None = None,
        env_host: Any = None,
    ):
        self.settings = settings
        self.role = role
        self.host = host or settings.host_name
        self.keys = Keys(settings.key_prefix)
        self._dispatcher = dispatcher
        self._env_host = env_host
        self._lock = threading.Lock()
        self._backends: dict[str, ModelBackend] = {}

    # --- clients ---------------------------------------------------------------------------
    @cached_property
    def redis(self) -> redis.Redis:
        """One pool per process, sized to the role's concurrency up to ``redis_max_connections``: a
        thread waits for a connection (BlockingConnectionPool) instead of failing with
        MaxConnectionsError under load, and thousands of threads don't open thousands of connections.
        Bytes that are not UTF-8 (MegaFlow writes none; junk pushed onto a broker queue can hold them)
        read as U+FFFD instead of failing the whole read, e.g. the control's scan of every queue."""
        threads = int(getattr(self.settings, ROLE_CONCURRENCY.get(self.role, ""), 0) or 0)
        pool = redis.BlockingConnectionPool.from_url(
            self.settings.redis_url,
            decode_responses=True,
            encoding_errors="replace",
            health_check_interval=30,
            driver_info=DRIVER_INFO,
            max_connections=min(max(16, threads + 16), self.settings.redis_max_connections),
            timeout=30,
        )
        return redis.Redis(connection_pool=pool)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher or RedisDispatcher(self.redis, self.settings.key_prefix)

    @cached_property
    def engine(self) -> EpisodeEngine:
        return EpisodeEngine(self.redis, self.settings, self.keys, self.dispatcher)

    @cached_property
    def resources(self) -> ResourceManager:
        return ResourceManager(self.redis, self.settings, self.keys)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        from megaflow.stores import open_artifact_store

        return open_artifact_store(self.settings.artifacts_url, self.settings)

    @cached_property
    def metadata(self) -> MetadataStore:
        from megaflow.stores import open_metadata_store

        return open_metadata_store(self.settings.metadata_url, self.settings)

    @property
    def env_host(self) -> EnvHost:
        """This env host's backend (Docker, sim or a third-party one, from ``settings.env_backend``)."""
        if self._env_host is None:
            with self._lock:
                if self._env_host is None:
                    self._env_host = self._load_env_host()
        return self._env_host

    def _load_env_host(self) -> EnvHost:
        from megaflow.env_hosts.config import load_env_host

        return load_env_host(self.settings, name=self.host, redis=self.redis, keys=self.keys)

    def backend(self, name: str) -> ModelBackend:
        """The model backend called ``name`` (one instance per process)."""
        with self._lock:
            if name not in self._backends:
                from megaflow.model_gateway import load_backend

                self._backends[name] = load_backend(name, self.settings, self.redis)
            return self._backends[name]

    # --- services --------------------------------------------------------------------------
    @cached_property
    def lifecycle(self) -> Lifecycle:
        from megaflow.services.lifecycle import Lifecycle

        return Lifecycle(self)

    @cached_property
    def agent_service(self) -> AgentService:
        from megaflow.services.agent import AgentService

        return AgentService(self)

    @cached_property
    def model_service(self) -> ModelService:
        from megaflow.services.model import ModelService

        return ModelService(self)

    @cached_property
    def env_service(self) -> EnvService:
        from megaflow.services.env import EnvService

        return EnvService(self)

    def close(self) -> None:
        """Close the clients this process opened."""
        if "redis" in self.__dict__:
            self.redis.close()
            self.redis.connection_pool.disconnect()
