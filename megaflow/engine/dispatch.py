"""How the engine hands work to the services: the Dispatcher interface and its Redis implementation.

The engine never imports Celery. ``RedisDispatcher`` writes Celery-compatible messages straight
onto the broker's Redis lists (see ``megaflow.core.wire``), so Celery workers consume them as if
``send_task`` had sent them; ``encode`` gives the message to the advance script, which pushes it
atomically with the state change.

Keys owned: the broker's queue lists ``<prefix>:celery:<queue>``.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis

from megaflow.core import wire


class Dispatcher(Protocol):
    """Sends a task by name to a queue; encodes one for the engine's atomic advance."""

    def send(self, name: str, args: list[Any], queue: str) -> None:
        """Enqueue task ``name`` with JSON ``args`` on ``queue`` now."""

    def encode(self, name: str, args: list[Any], queue: str, priority: int = 0) -> tuple[str, str]:
        """(Redis list key, message) for the advance script to LPUSH (``priority``: 0 most urgent .. 9)."""


class RedisDispatcher:
    """Enqueues tasks by pushing Celery-format messages onto the broker's Redis lists."""

    def __init__(self, redis_client: redis.Redis, key_prefix: str):
        self.r = redis_client
        self.prefix = key_prefix

    def encode(self, name: str, args: list[Any], queue: str, priority: int = 0) -> tuple[str, str]:
        return wire.encode_message(self.prefix, name, args, queue, priority)

    def send(self, name: str, args: list[Any], queue: str) -> None:
        key, message = self.encode(name, args, queue)
        self.r.lpush(key, message)
