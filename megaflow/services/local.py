"""Episodes driven in one process, without Celery: the in-process dispatcher's consumer.

``LocalRunner`` pops the broker's Redis queue lists that the engine writes to, decodes each
message (JSON only) and runs the service step it names, under the same never-strand guard as the
Celery tasks. The engine, resource manager, admission and services all run for real over a real
Redis; only the Celery worker processes are left out. Tests of those layers use it, and so can a
single-machine tool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from megaflow.core import states, wire
from megaflow.services.guard import RETRYABLE, run_step

if TYPE_CHECKING:
    from megaflow.services.root import Root

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4


class LocalRunner:
    """Runs every queued task of a fleet in this process: agent and model work on ``root``, env work
    on the root of the env host its queue names."""

    def __init__(self, root: Root, env_roots: dict[str, Root]):
        self.root = root
        self.env_roots = env_roots
        self.handled: dict[str, int] = {}
        self._attempts: dict[str, int] = {}
        queues = [wire.AGENT_QUEUE, wire.MODEL_QUEUE] + [wire.env_host_queue(h) for h in env_roots]
        # every priority list of every queue, most urgent first (kombu's order: step 0 first)
        pairs = [
            (q, wire.broker_queue_key(root.settings.key_prefix, q, p)) for p in wire.PRIORITY_STEPS for q in queues
        ]
        self._queues = [q for q, _ in pairs]
        self._keys = [k for _, k in pairs]

    def register_hosts(self) -> None:
        """Register every env host with the resource manager (what an env worker's heartbeat does)."""
        for name, r in self.env_roots.items():
            report = r.env_host.report()
            r.resources.register_host(
                name,
                capacity=report.get("capacity", r.settings.host_capacity),
                images=report.get("images", []),
                warm=report.get("warm", {}),
                disk_free_gb=report.get("disk_free_gb", 0.0),
            )
        self.root.lifecycle.admit()

    def run_one(self, timeout_s: float = 0.2) -> bool:
        """Run the next queued task, if one arrives within ``timeout_s``; False if none did."""
        item = self.root.redis.brpop(self._keys, timeout=timeout_s)
        if not item:
            return False
        key, message = str(item[0]), str(item[1])
        name, args = wire.decode_message(message)
        queue = self._queues[self._keys.index(key)]
        self.handled[name] = self.handled.get(name, 0) + 1
        try:
            self._dispatch(name, args, queue)
        except RETRYABLE as exc:
            n = self._attempts[message] = self._attempts.get(message, 0) + 1
            if n >= MAX_ATTEMPTS:
                raise
            log.warning("task %s %s failed (%s); retrying", name, args, exc)
            self.root.redis.lpush(key, message)
        return True

    def _dispatch(self, name: str, args: list[Any], queue: str) -> None:
        host = wire.host_of_queue(queue)
        env = self.env_roots[host].env_service if host else None
        if name == wire.ENV_CLOSE and env:
            env.close(args[0], args[1])
            return
        if name == wire.ENV_PREFETCH and env:
            env.prefetch(args[0])
            return
        if name == wire.MODEL_GATEWAY_CALL:
            from megaflow.services.episode_gateway import EpisodeGateway

            EpisodeGateway(self.root).serve_call(args[0], args[1])
            return
        episode_id, step = args
        steps: dict[str, tuple[str, Callable[[], str]]] = {
            wire.AGENT_STEP: ("agent", lambda: self.root.agent_service.step(episode_id, step)),
            wire.MODEL_COMPLETE: ("model", lambda: self.root.model_service.step(episode_id, step)),
        }
        if env is not None:
            steps.update(
                {
                    wire.ENV_PROVISION: ("provision", lambda: env.provision(episode_id, step)),
                    wire.ENV_EXEC: ("exec", lambda: env.execute(episode_id, step)),
                    wire.ENV_EVALUATE: ("evaluate", lambda: env.evaluate(episode_id, step)),
                }
            )
        if name not in steps:
            raise ValueError(f"no local handler for task {name} on queue {queue}")
        kind, fn = steps[name]
        owner = self.env_roots[host] if host else self.root
        result = run_step(owner, kind, episode_id, step, fn, on_env_host=host is not None)
        if result == "boot_busy":  # the host's boot limiter is full: try again shortly
            time.sleep(0.05)
            self.root.dispatcher.send(name, args, queue)

    def run_until_done(self, batch_id: str, *, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Run tasks until every episode of the batch is final; return their results."""
        engine = self.root.engine
        ids = engine.batch_ids(batch_id)
        deadline = time.monotonic() + timeout_s
        while self.root.redis.scard(self.root.keys.batch_done(batch_id)) < len(ids):
            if time.monotonic() > deadline:
                views = engine.summaries(ids)
                live = [v["episode_id"] + ":" + v["state"] for v in views if v["state"] not in states.TERMINAL]
                raise TimeoutError(f"batch {batch_id} not done after {timeout_s}s; live: {live[:10]}")
            self.run_one()
        while self.run_one(timeout_s=0.05):  # the close tasks the last episodes sent
            pass
        return engine.summaries(ids)
