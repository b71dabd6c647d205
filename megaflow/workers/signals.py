"""Worker signal handlers: a stock ``celery -A megaflow.workers worker`` behaves like ``megaflow worker``.

From the queues a worker consumes, it learns its role (``model``, ``agent``, ``env`` with its
``env.<host>``), then reports its health and, on an env host, registers the host, renews leases and
keeps the warm pool, exactly as the ``megaflow worker`` entry does.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from megaflow.core import wire

log = logging.getLogger(__name__)

_heartbeat: Any = None


def role_of(queues: list[str]) -> tuple[str, str | None]:
    """(role, env host) of a worker consuming ``queues``."""
    hosts = [h for h in (wire.host_of_queue(q) for q in queues) if h]
    if hosts:
        return "env", hosts[0]
    if wire.MODEL_QUEUE in queues:
        return "model", None
    if wire.AGENT_QUEUE in queues:
        return "agent", None
    return "worker", None


@signals.celeryd_after_setup.connect
def _after_setup(sender: str, instance: Any, **_: Any) -> None:
    from megaflow.workers import tasks

    if tasks._identity["role"] != "worker":  # megaflow worker named it already
        return
    queues = list(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    role, host = role_of(queues)
    tasks.set_identity(role, host)
    log.info("worker %s: role %s%s", sender, role, f" on env host {host}" if host else "")


@signals.worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    from megaflow.workers import process, tasks

    if _heartbeat is not None or tasks._identity["role"] == "worker":
        return
    _heartbeat = process.start_heartbeat(tasks.root(), sender.hostname if sender is not None else "worker")


@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop_and_shutdown()
