"""Worker signal handlers: a stock ``celery -A megaflow.workers worker`` behaves like ``megaflow worker``.

From the queues a worker consumes, it learns its role (``model``, ``agent``, ``env`` with its
``env.<host>``), then reports its health and, on an env host, registers the host, renews leases and
keeps the warm pool, exactly as the ``megaflow worker`` entry does.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals

from megaflow.core import wire

log = logging.getLogger(__name__)

_heartbeat: Any = None


def survive_broker_loss() -> None:
    """Keep a worker alive when Redis goes away with messages delivered to it and not yet acknowledged.

    On a lost connection kombu closes the channel and tries to put those messages back on their
    queues over the connection that is gone, and later acks or rejects them on the closed channel;
    with kombu 5.x both raise an AttributeError deep in its connection set-up, which Celery treats as
    unrecoverable, and the worker exits. Here a closed channel raises a connection error instead (which
    kombu and Celery handle), and the put-back is skipped with one line: the messages stay in the
    broker's unacknowledged set and are redelivered after the visibility timeout (and the control
    service's stall sweep re-sends any step whose message was lost with the connection).
    """
    import redis
    from kombu.transport import redis as kombu_redis

    qos, channel = kombu_redis.QoS, kombu_redis.Channel
    if getattr(qos.restore_unacked, "_megaflow", False):
        return
    original = qos.restore_unacked
    connparams = channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        # an ack or reject of a message delivered on a channel whose connection was lost: a connection
        # error (which kombu and Celery handle), not an AttributeError (which stops the worker)
        if self.connection is None or getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection this message came on is gone")
        return connparams(self, asynchronous)

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except Exception as exc:  # the connection is gone: nothing can be put back over it
            log.warning(
                "broker connection lost with %d unacknowledged message(s); they are redelivered after "
                "the visibility timeout (%s: %s)",
                len(self._delivered),
                type(exc).__name__,
                str(exc).splitlines()[0][:160] if str(exc) else "",
            )
            self._delivered.clear()
            return None

    restore_unacked._megaflow = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked  # type: ignore[method-assign]
    channel._connparams = _connparams  # type: ignore[method-assign]


@signals.worker_init.connect
def _init(**_: Any) -> None:
    survive_broker_loss()


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
    from megaflow.workers import process, tasks

    if tasks._identity["role"] == "worker":  # a stock `celery worker`: its queues tell the role
        queues = list(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
        role, host = role_of(queues)
        tasks.set_identity(role, host)
        log.info("worker %s: role %s%s", sender, role, f" on env host {host}" if host else "")
    if tasks._identity["role"] == "env":  # before it consumes anything: one worker per env host name
        rt = tasks.root()
        why = process.host_name_taken(rt.redis, rt.settings.key_prefix, sender, rt.host)
        if why:  # Celery swallows exceptions in signal handlers and a SystemExit ends it with status 0
            log.critical(why)
            print(f"megaflow: {why}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(2)  # bad input (the CLI's exit status); nothing was consumed yet


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
