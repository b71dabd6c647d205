"""Role workers: ``megaflow worker model|agent|env``, each with the pool that suits its work.

- model: threads (I/O bound HTTP calls), many in flight
- agent: a small prefork pool (CPU-light decisions, isolated per process)
- env:   threads (Docker API calls); consumes ``env`` and its own ``env.<host>``; runs the host
         heartbeat (registration, lease renewal, warm pool, image eviction, reaper)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from megaflow.services import lifecycle, root as runtime
from megaflow.core import states
from megaflow.workers.app import AGENT_QUEUE, ENV_QUEUE, MODEL_QUEUE, create_app, env_host_queue
from megaflow.core.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("model", "agent", "env")


@dataclass
class RolePlan:
    """How one role's worker runs: pool kind, concurrency and queues."""

    role: str
    pool: str
    concurrency: int
    queues: list[str]
    name: str


def plan(role: str, settings: Settings, *, host: str | None = None, concurrency: int | None = None) -> RolePlan:
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}: choose one of {', '.join(ROLES)}")
    host = host or settings.host_name
    if role == "model":
        return RolePlan(role, "threads", concurrency or settings.model_concurrency, [MODEL_QUEUE], node_name(role, host))
    if role == "agent":
        return RolePlan(role, "prefork", concurrency or settings.agent_concurrency, [AGENT_QUEUE],
                        node_name(role, host))
    return RolePlan(role, "threads", concurrency or settings.env_concurrency, [ENV_QUEUE, env_host_queue(host)],
                    node_name(role, host))


def node_name(role: str, host: str) -> str:
    """The Celery node name of a role's worker on ``host`` (unique per fleet), e.g. env@env-1."""
    return f"{role}@{host}"


class Heartbeat(threading.Thread):
    """Reports the worker's health to Redis; on env workers also keeps the host registered."""

    def __init__(self, rt: runtime.Runtime, plan_: RolePlan):
        super().__init__(name="megaflow-heartbeat", daemon=True)
        self.rt = rt
        self.plan = plan_
        self.stop = threading.Event()
        self.interval = max(0.5, min(rt.settings.lease_s, rt.settings.host_ttl_s) / 4)
        self.maintain_every = max(self.interval, 10.0)

    def is_live(self, episode_id: str) -> bool:
        state = self.rt.redis.hget(self.rt.keys.episode(episode_id), "state")
        return state is not None and state not in states.TERMINAL

    def beat(self) -> None:
        rt = self.rt
        rt.redis.set(rt.keys.worker_health(self.plan.role, self.plan.name), json.dumps({
            "role": self.plan.role, "name": self.plan.name, "pid": os.getpid(), "host": socket.gethostname(),
            "queues": self.plan.queues, "concurrency": self.plan.concurrency, "ts": time.time(),
        }), ex=int(self.interval * 4) + 1)
        if self.plan.role == "env":
            report = rt.env_host.report()
            joined = rt.resources.register_host(
                rt.host, capacity=report.get("capacity", rt.settings.host_capacity),
                images=report.get("images", []), warm=report.get("warm", {}),
                disk_free_gb=report.get("disk_free_gb", 0.0))
            rt.resources.renew_host(rt.host)
            if joined:  # a host joining (or back after its heartbeat lapsed) is an admission event
                lifecycle.admit(rt)

    def run(self) -> None:
        last_maintain = 0.0
        while not self.stop.is_set():
            try:
                self.beat()
                if self.plan.role == "env":
                    if time.monotonic() - last_maintain > self.maintain_every:
                        last_maintain = time.monotonic()
                        self.rt.env_host.maintain(is_live=self.is_live)
            except Exception:
                log.exception("heartbeat failed; retrying")
            self.stop.wait(self.interval)


def run_worker(role: str, settings: Settings, *, host: str | None = None, concurrency: int | None = None,
               loglevel: str = "INFO") -> None:
    """Start one role's Celery worker in this process (blocks until it stops)."""
    p = plan(role, settings, host=host, concurrency=concurrency)
    app = create_app(settings)
    rt = runtime.configure(settings, role=role, host=host or settings.host_name, app=app)
    if role == "env":
        rt.env_host.maintain(is_live=Heartbeat(rt, p).is_live)  # reap what a crash left before taking work
    heartbeat = Heartbeat(rt, p)
    heartbeat.start()
    try:
        app.worker_main([
            "worker", "--queues", ",".join(p.queues), "--pool", p.pool, "--concurrency", str(p.concurrency),
            "--hostname", p.name, *(["--task-events"] if settings.task_events else []), "--loglevel", loglevel,
            "--without-gossip", "--without-mingle",
        ])
    finally:
        heartbeat.stop.set()
        if role == "env":
            rt.env_host.shutdown()  # warm containers of this worker go with it
